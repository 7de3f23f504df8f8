"""Process-group setup from whatever started the processes: torchrun, the deepspeed launcher, SLURM, or nothing.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
under `srun` without a launcher the same facts come from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID /
SLURM_STEP_NODELIST (the master is the first node of the step). A plain `python`/`moe-lm` call is a world of
one on a free local port. Initialisation has a timeout, so a rank that cannot reach the master fails with a
message naming the address instead of hanging. The layout rules (`check_layout`) are checked before any
collective, so every rank fails with the same message. The process group itself is DeepSpeed's to set up
(`moe_lm/moe/engine.py`, which also describes the expert-parallel groups); it is imported only then, so that these
checks load without it.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
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


class DistributedInitError(RuntimeError):
    """The launch environment is inconsistent, or this rank could not join the process group; the message names
    the rank, the variables or the address, and the timeout."""


def _split_top_level(nodelist: str) -> list[str]:
    """Split a hostlist at the commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"nested or unbalanced brackets in the node list {nodelist!r}")
        if char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in the node list {nodelist!r}")
    parts.append(nodelist[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """ "01-03,07" -> 01 02 03 07 (zero padding follows the lower bound, as Slurm prints it)."""
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) < int(lo):
            raise ValueError(f"bad range {part!r} in the node list {nodelist!r}")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM hostlist expression -> host names, in order, as `scontrol show hostnames` prints them:
    "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1; "n[1-2]-ib" -> n1-ib n2-ib;
    "r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2. Raises ValueError on a malformed expression."""
    hosts = []
    for expr in _split_top_level(nodelist):
        pieces = [piece for piece in re.split(r"(\[[^\]]*\])", expr) if piece]
        choices = [_expand_ranges(piece[1:-1], nodelist) if piece.startswith("[") else [piece] for piece in pieces]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedInitError(f"{name}={environ[name]!r} is not an integer") from None


def resolve_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank, world and master address from the launcher's environment variables.

    1. RANK and WORLD_SIZE (torchrun, the deepspeed launcher, `srun ... torchrun`, or by hand): launcher "env".
    2. SLURM_PROCID and SLURM_STEP_NUM_TASKS: one task of an `srun` step per process: launcher "slurm". The
       master is the first node of SLURM_STEP_NODELIST and the port 20000 + SLURM_JOB_ID % 10000 (the same on
       every task), unless MASTER_ADDR / MASTER_PORT are set. The batch step of an sbatch script also has
       SLURM_PROCID=0 and SLURM_NTASKS (the whole allocation's task count), but no SLURM_STEP_* variables:
       a plain `moe-lm train` there is one process, not rank 0 of SLURM_NTASKS (which would wait for ranks
       that never start).
    3. Otherwise a world of one ("single") on a free local port.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = DistEnv(_int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE"),
                      _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
                      environ.get("MASTER_ADDR", "127.0.0.1"),
                      _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500, "env")
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or \
            environ.get("SLURM_NODELIST", "")
        try:
            nodes = expand_nodelist(nodelist)
        except ValueError as exc:
            raise DistributedInitError(f"SLURM_STEP_NODELIST: {exc}") from None
        if not nodes and "MASTER_ADDR" not in environ:
            raise DistributedInitError("SLURM_STEP_NODELIST is empty and MASTER_ADDR is not set: no master address")
        job_port = 20000 + _int_var(environ, "SLURM_JOB_ID") % 10000 if "SLURM_JOB_ID" in environ else 29500
        env = DistEnv(_int_var(environ, "SLURM_PROCID"), _int_var(environ, "SLURM_STEP_NUM_TASKS"),
                      _int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
                      environ.get("MASTER_ADDR") or nodes[0],
                      _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else job_port, "slurm")
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise DistributedInitError(f"{names[0]}={env.rank} is not a rank of a world of {names[1]}={env.world_size}")
    return env


def check_layout(parallel: ParallelConfig, world_size: int, num_experts: int) -> None:
    """Parallel-layout rules that need the world size; every rank raises the same error before any collective."""
    if world_size % parallel.ep_size != 0:
        raise ConfigError("parallel.ep_size", f"world size {world_size} is not divisible by ep_size={parallel.ep_size}")
    if num_experts % parallel.ep_size != 0:
        raise ConfigError("parallel.ep_size",
                          f"model.moe.num_experts={num_experts} is not divisible by ep_size={parallel.ep_size}")


def init_distributed(parallel: ParallelConfig, env: DistEnv) -> torch.device:
    """Initialise the process group (through DeepSpeed) and return this rank's device.

    `parallel.init_timeout_s` bounds the rendezvous (a rank that cannot reach MASTER_ADDR:MASTER_PORT, or a
    master waiting for ranks that never come, raises `DistributedInitError` naming the address) and every later
    collective (a rank that stops taking part ends the others with a timeout error instead of a hang).
    """
    from moe_lm.moe.engine import init_process_group

    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                       "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})
    cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend", "nccl needs CUDA devices; use gloo (or auto) on CPU")
    try:
        init_process_group(backend, parallel.init_timeout_s)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:500]
        raise DistributedInitError(
            f"rank {env.rank}/{env.world_size}: could not join the process group at "
            f"{env.master_addr}:{env.master_port} within {parallel.init_timeout_s} s (parallel.init_timeout_s; "
            f"{backend}, launcher {env.launcher}): {type(exc).__name__}: {detail}") from exc
    if cuda:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
