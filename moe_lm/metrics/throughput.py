"""Throughput, model FLOPs utilisation (MFU) and peak memory.

MFU = achieved model FLOP/s per device / peak FLOP/s of the device. Model FLOPs follow the torchtitan
convention (`flops_per_token`), so numbers are comparable with torchtitan's and across routers with the same
active parameter count. The GPU peak is the datasheet's dense bf16 number; on CPU there is no datasheet we
can trust, so the peak is *measured* with a short matmul probe and MFU there means "share of the matmul
speed this CPU showed", a relative number for comparing runs on the same machine.
"""

from __future__ import annotations

import math
import resource
import sys
import time
import warnings

import torch

GPU_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),  # also GH200
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)
"""Dense bf16 tensor-core peak FLOP/s per device, keyed by a substring of `torch.cuda.get_device_name()`.
The first match wins, so more specific names come first ("H100 PCIe" before "H100", "A100" before "A10")."""

_PROBE_SIZE = 1024


def flops_per_token(n_active_nonembedding_params: int, n_layers: int, d_model: int, seq_len: int,
                    lm_head_params: int) -> float:
    """Training FLOPs per token, torchtitan convention: 6·(N_active_nonembed + N_lm_head) + 12·L·d·T.

    6N counts the forward (2N) and backward (4N) matmuls of the parameters a token actually uses (for an
    MoE: the router, the shared layers and top_k of the E experts). 12·L·d·T is attention's QK^T and AV over
    the full sequence T in forward and backward, with no discount for the causal mask (like torchtitan and
    PaLM's MFU), so it counts the masked half of the score matrix too. Embedding lookups are not FLOPs; the
    output projection is, hence `lm_head_params` (pass the tied embedding's size when weights are tied).
    """
    return 6 * (n_active_nonembedding_params + lm_head_params) + 12 * n_layers * d_model * seq_len


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Best FLOP/s of a square matmul on this CPU with the current torch thread count, over ~`seconds`.

    A measurement, not a datasheet peak: it moves with the load of a shared machine and with `dtype`
    (bf16 matmuls are slow on CPUs without AMX). One untimed warm-up call absorbs thread-pool start-up.
    """
    a = torch.randn(_PROBE_SIZE, _PROBE_SIZE).to(dtype)
    b = torch.randn(_PROBE_SIZE, _PROBE_SIZE).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * _PROBE_SIZE ** 3 / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak FLOP/s of one device, its source): the GPU table, or the CPU probe run with `dtype`.

    An unknown GPU gives NaN (so MFU reads NaN, never a wrong number) and a warning to extend the table.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_peak_flops(dtype), f"measured ({dtype}, matmul probe)"
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops, f"table ({key}, dense bf16)"
    warnings.warn(f"no peak FLOP/s known for {name!r}: MFU is NaN; add it to GPU_PEAK_FLOPS", stacklevel=2)
    return math.nan, f"unknown ({name})"


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation, a fraction: tokens/s per device · FLOPs per token / peak FLOP/s per device."""
    return tokens_per_s_per_device * flops_per_token / peak


def peak_memory_gib(device: torch.device | str = "cpu") -> float:
    """Peak memory in GiB: CUDA's max allocated tensor memory, or on CPU the process's max resident set size
    (which includes the interpreter and libraries, not just tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 2 ** 30


class ThroughputMeter:
    """Times optimizer steps; turns tokens and seconds into throughput and MFU.

    Call `step(tokens)` at the end of every optimizer step, `pause()` before anything that is not training
    (evaluation, logging, checkpointing) and `start()` after it, so that its time is not charged to training. Only
    `start`, `pause`, `compute` and warm-up steps read the clock, which on CUDA waits for the device: a step in
    between costs no host sync. The first `warmup_steps` steps (kernel selection, allocator growth, compilation)
    are left out of the averages.
    """

    def __init__(self, flops_per_token: float, peak_flops: float, world_size: int = 1,
                 device: torch.device | str = "cpu", warmup_steps: int = 1):
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.device, self.warmup_steps = torch.device(device), warmup_steps
        self._steps_seen = self._steps = self._tokens = 0
        self._seconds = 0.0
        self._last = time.perf_counter()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """(Re)start the step clock."""
        self._last = self._now()

    def pause(self) -> None:
        """Charge the time since the clock (re)started to the steps taken since."""
        now = self._now()
        self._seconds += now - self._last
        self._last = now

    def step(self, tokens: int) -> None:
        """End of an optimizer step that trained on `tokens` tokens summed over all devices."""
        self._steps_seen += 1
        if self._steps_seen <= self.warmup_steps:
            self.start()  # the clock starts after the warm-up
            return
        self._steps += 1
        self._tokens += tokens

    def compute(self, reset: bool = True) -> dict[str, float]:
        """Averages over the steps since the last reset (past warm-up); only peak memory before any.

        perf/tokens_per_s (all devices), perf/tokens_per_s_per_device, perf/tflops_per_device (model
        TFLOP/s achieved), perf/mfu (fraction of the peak), perf/step_time_s (mean seconds per step),
        perf/peak_mem_gib (GiB, see `peak_memory_gib`).
        """
        self.pause()
        out = {"perf/peak_mem_gib": peak_memory_gib(self.device)}
        if self._steps:
            tokens_per_s = self._tokens / self._seconds
            per_device = tokens_per_s / self.world_size
            out.update({
                "perf/tokens_per_s": tokens_per_s,
                "perf/tokens_per_s_per_device": per_device,
                "perf/tflops_per_device": per_device * self.flops_per_token / 1e12,
                "perf/mfu": mfu(per_device, self.flops_per_token, self.peak_flops),
                "perf/step_time_s": self._seconds / self._steps,
            })
        if reset:
            self._steps = self._tokens = 0
            self._seconds = 0.0
        return out
