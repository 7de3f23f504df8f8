"""Process-group setup from whatever started the processes: torchrun, the deepspeed launcher, SLURM, or nothing.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
under `srun` without a launcher the same facts come from SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID /
SLURM_STEP_NODELIST (the master is the first node of the step). A plain `python`/`moe-lm` call is a world of
one on a free local port. Initialisation has a timeout, so a rank that cannot reach the master fails with a
message naming the address instead of hanging. The layout rules (`check_layout`) are checked before any
collective, so every rank fails with the same message.

Expert parallelism (DeepSpeed's default topology, `deepspeed/utils/groups.py`): with world W and `ep_size` P,
the expert-parallel groups are P consecutive ranks [0..P-1], [P..2P-1], ... (the all-to-all), the
expert-data-parallel groups are the ranks with the same position in them, {i, i+P, i+2P, ...} (the all-reduce
of expert gradients), and dense gradients are averaged over all W ranks. Rank r holds the experts
[(r % P)·E/P, (r % P + 1)·E/P).
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
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


def _skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory op (~1 min) on CPU at every fresh init; it only serves inference
    all-reduce, which training never calls. Internal API, hence the guard."""
    torch_backend = sys.modules.get("deepspeed.comm.torch")
    if torch_backend is not None and hasattr(torch_backend, "build_shm_op"):
        torch_backend.build_shm_op = lambda: None


def init_distributed(parallel: ParallelConfig, env: DistEnv) -> torch.device:
    """Initialise the process group (through DeepSpeed) and return this rank's device.

    `parallel.init_timeout_s` bounds the rendezvous (a rank that cannot reach MASTER_ADDR:MASTER_PORT, or a
    master waiting for ranks that never come, raises `DistributedInitError` naming the address) and every later
    collective (a rank that stops taking part ends the others with a timeout error instead of a hang).
    """
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
        detail = " ".join(str(exc).split())[:500]
        raise DistributedInitError(
            f"rank {env.rank}/{env.world_size}: could not join the process group at "
            f"{env.master_addr}:{env.master_port} within {parallel.init_timeout_s} s (parallel.init_timeout_s; "
            f"{backend}, launcher {env.launcher}): {type(exc).__name__}: {detail}") from exc
    if cuda:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ ||g||² over `grads` in float64, from one fused multi-tensor norm (no per-parameter kernels)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).double().square().sum()


def moe_grad_norm(parameters) -> torch.Tensor:
    """L2 norm of the whole model's gradient with every expert counted once: the same number on every rank and
    for every layout (the single-process norm of the same global batch).

    Call it after DeepSpeed's gradient reduction: dense gradients are then identical on all ranks, and expert
    gradients identical within an expert-data-parallel group, so summing the local experts' squared norms over
    the expert-parallel group covers each expert exactly once. A collective over every expert-parallel group; a
    device tensor, never read back here.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    parameters = list(parameters)
    device = parameters[0].device
    dense, experts = [], {}
    for param in parameters:
        if param.grad is None:
            continue
        if is_moe_param(param):
            experts.setdefault(param.group_name, []).append(param.grad.detach())
        else:
            dense.append(param.grad.detach())
    total = _squared_norm(dense, device)
    for name in sorted(experts):  # the same order on every rank
        squared = _squared_norm(experts[name], device)
        group = groups._get_expert_parallel_group(name) if torch.distributed.is_initialized() else None
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(squared, group=group)
        total = total + squared
    return total.sqrt()


def install_moe_grad_clipping(engine) -> Callable[[], torch.Tensor] | None:
    """Exact gradient clipping for ZeRO stage 0 in fp32 (DeepSpeed's `clip_fp32_gradients` path).

    DeepSpeed's own clipping there averages each rank's local norm over the data-parallel group. Under expert
    parallelism ranks hold different experts, so that average is not the model's gradient norm (nor the
    1-process one, and the clipping differs with it), and the engine records no norm at all
    (`get_global_grad_norm()` is None). This replaces it with `moe_grad_norm`, clips with the configured
    `gradient_clipping` on the device (no host read: a non-finite norm leaves the gradients as they are, for the
    skipped-step logic), and records the norm tensor for `get_global_grad_norm()`. ZeRO 1/2 compute the norm over
    the expert groups themselves (tests/train/test_distributed.py checks ZeRO-2 against 1 process); DeepSpeed's
    bf16 optimizer keeps its own clipping.

    Returns `measure()`, which computes the norm of the gradients as they stand (a device tensor) for the coming
    clip, so that a caller that needs the norm before the step (the NaN/inf check) and the clip share one pass over
    the gradients; None where DeepSpeed clips by itself.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    max_norm = float(engine.gradient_clipping())
    measured: list[torch.Tensor] = []

    def measure() -> torch.Tensor:
        measured[:] = [moe_grad_norm(engine.module.parameters())]
        return measured[0]

    def clip_fp32_gradients() -> None:
        grads = [p.grad.detach() for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
        norm = measured.pop() if measured else moe_grad_norm(engine.module.parameters())
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(coef), coef, 1.0).to(torch.float32)
        torch._foreach_mul_(grads, coef)
        engine._global_grad_norm = norm  # what get_global_grad_norm() returns (torch optimizers set none)

    engine.clip_fp32_gradients = clip_fp32_gradients
    return measure
