"""Where a training step's time goes: torch.profiler over a few steps, written as op tables.

The trainer profiles `train.profile_steps` optimizer steps from step `train.profile_start` on; the peer benchmark
(`scripts/peer_benchmark.py --profile`) uses the same tables. On CUDA a table file starts with the GPU's busy
share of the profiled wall time (kernel time over wall time; the rest is the GPU waiting, most often for the
host to issue work) and holds one table by GPU time and one by host time; on CPU, one table by CPU time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """`start()` before the first profiled step, `stop()` after the last; `stop()` returns the op tables."""

    def __init__(self, device: torch.device, trace_to: Path | None = None):
        self.device, self.trace_to = device, trace_to
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(activities=activities, record_shapes=True)
        self.started = 0.0

    def start(self) -> None:
        self._sync()
        self.profiler.start()
        self.started = time.perf_counter()

    def stop(self, label: str) -> str:
        """Stop, write the Chrome trace if one was asked for, and return the tables, headed by `label`."""
        self._sync()
        wall = time.perf_counter() - self.started
        self.profiler.stop()
        if self.trace_to is not None:
            self.profiler.export_chrome_trace(str(self.trace_to))
        return op_tables(self.profiler, wall, label, cuda=self.device.type == "cuda")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def op_tables(prof: profile, wall_s: float, label: str, cuda: bool, rows: int = 40) -> str:
    """Self time per op and input shapes, with the wall time, the ops dispatched (`dispatched_ops`) and on CUDA the
    GPU's busy share above."""
    ops = prof.key_averages(group_by_input_shape=True)
    dispatched = f"{dispatched_ops(prof.events())} aten ops dispatched"

    def table(sort: str) -> str:
        return ops.table(sort_by=sort, row_limit=rows, max_name_column_width=40, max_shapes_column_width=80)

    header = f"{label}: {wall_s:.3f} s of wall time (profiler on)"
    if not cuda:
        return f"{header}, {dispatched}\n\n{table('self_cpu_time_total')}"
    # kernels, copies and memsets only: an op's row repeats its kernels' time, and an annotation spans others
    busy = sum(e.self_device_time_total for e in ops
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    return (f"{header}, {busy:.3f} s of GPU kernel time ({busy / wall_s:.0%} busy), {dispatched}\n\n"
            f"By GPU time:\n{table('self_cuda_time_total')}\nBy host time:\n{table('self_cpu_time_total')}")


def dispatched_ops(events) -> int:
    """Ops issued from Python or the autograd engine (aten ops not inside another aten op) among profiler
    `events`: the host's work per op, and on a GPU an upper bound on the kernels launched, views included."""
    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in events if e.name.startswith("aten::") and outermost(e))
