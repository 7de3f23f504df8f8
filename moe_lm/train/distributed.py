"""Process-group setup from whatever started the processes: torchrun, the deepspeed launcher, SLURM, or nothing.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
under `srun` without a launcher the same facts come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
SLURM_NODELIST (the master is the first node of the allocation). A plain `python`/`moe-lm` call is a world of
one on a free local port. Initialisation has a timeout, so a rank that cannot reach the master fails with a
message naming the address instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moe_lm.config.schema import ConfigError, ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun/deepspeed (env://), slurm, or single."""


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist expression -> host names: "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank, world and master address from the launcher's environment variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                       environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)), "env")
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodes = expand_nodelist(environ.get("SLURM_STEP_NODELIST", environ.get("SLURM_NODELIST", "localhost")))
        job_port = 20000 + int(environ.get("SLURM_JOB_ID", 0)) % 10000  # same on every task of a job
        return DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)),
                       environ.get("MASTER_ADDR", nodes[0]), int(environ.get("MASTER_PORT", job_port)), "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def check_layout(parallel: ParallelConfig, world_size: int, num_experts: int) -> None:
    """Parallel-layout rules that need the world size; every rank raises the same error before any collective."""
    if world_size % parallel.ep_size != 0:
        raise ConfigError("parallel.ep_size", f"world size {world_size} is not divisible by ep_size={parallel.ep_size}")
    if num_experts % parallel.ep_size != 0:
        raise ConfigError("parallel.ep_size",
                          f"model.moe.num_experts={num_experts} is not divisible by ep_size={parallel.ep_size}")


def _skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory op (~1 min) on CPU at every fresh init; it only serves inference
    all-reduce, which training never calls. Internal API, hence the guard."""
    torch_backend = sys.modules.get("deepspeed.comm.torch")
    if torch_backend is not None and hasattr(torch_backend, "build_shm_op"):
        torch_backend.build_shm_op = lambda: None


def init_distributed(parallel: ParallelConfig, env: DistEnv) -> torch.device:
    """Initialise the process group (through DeepSpeed) and return this rank's device."""
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (loaded so that the CPU patch below can reach it)

    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                       "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})
    cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend", "nccl needs CUDA devices; use gloo (or auto) on CPU")
    if not cuda:
        _skip_cpu_shm_build()
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=parallel.init_timeout_s))
    except Exception as exc:
        raise RuntimeError(f"rank {env.rank}/{env.world_size}: could not join the process group at "
                           f"{env.master_addr}:{env.master_port} ({backend}, launcher {env.launcher}, timeout "
                           f"{parallel.init_timeout_s}s = parallel.init_timeout_s): {exc}") from exc
    if cuda:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
