"""Helpers for tests that run a function on N real processes over gloo (CPU), e.g. expert parallelism ep_size=2.

    from tests.distributed_utils import run_distributed

    def _worker(rank: int, world_size: int, expected):   # module level: spawn pickles it by name
        ...                                               # torch.distributed and DeepSpeed are initialised
    def test_something():
        run_distributed(_worker, 2, expected)

Each process gets MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE, one intra-op thread (2 ranks on 2 cores),
the process group that training uses (`moe_lm.moe.engine.init_process_group` on gloo), and a clean
process-group teardown. An exception in a worker fails the test with the worker's traceback; a worker that hangs
is killed after `timeout_s`. (`tests` is a package and pytest puts the repository root on sys.path; the spawned
workers inherit the parent's sys.path, so they can import the test module that defines `fn`.)
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> None:
    """Initialise torch.distributed (and DeepSpeed's comm layer) on gloo for this process."""
    from moe_lm.moe.engine import init_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    init_process_group("gloo", timeout_s)


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 120.0) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes over gloo; re-raise the first failure.

    `fn` and `args` must be picklable (a module-level function; tensors are fine).
    """
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException/ProcessExitedException on failure
            if time.monotonic() > deadline:
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {timeout_s} s")
    finally:
        for process in context.processes:  # only the processes started here
            if process.is_alive():
                process.kill()
                process.join()
