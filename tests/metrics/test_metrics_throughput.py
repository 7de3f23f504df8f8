"""FLOPs convention, peak table, MFU and the step meter (with a fake clock: no test asserts a speed)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lm.metrics import throughput
from moe_lm.metrics.throughput import (ThroughputMeter, flops_per_token, measure_cpu_peak_flops, mfu, peak_flops,
                                       peak_memory_gib)


def test_flops_per_token_torchtitan_convention():
    # 6·(1000 + 100) + 12·2·8·16 = 6600 + 3072
    assert flops_per_token(1000, n_layers=2, d_model=8, seq_len=16, lm_head_params=100) == 9672
    assert mfu(tokens_per_s_per_device=100.0, flops_per_token=1e9, peak=1e12) == pytest.approx(0.1)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10G", 125e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
])
def test_gpu_peak_table(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops("cuda:0")[0] == expected


def test_unknown_gpu_gives_nan_and_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    with pytest.warns(UserWarning, match="Imaginary GPU 9000"):
        assert math.isnan(peak_flops("cuda:0")[0])


def test_cpu_peak_is_measured_and_memory_is_reported():
    flops = measure_cpu_peak_flops(torch.float32, seconds=0.05)
    assert math.isfinite(flops) and flops > 0
    assert peak_flops("cpu")[1].startswith("measured")
    assert peak_memory_gib("cpu") > 0


def test_meter_skips_warmup_and_averages(monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 13.0, 20.0, 21.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(flops_per_token=3e9, peak_flops=1e12, world_size=2)  # t = 0
    meter.step(100)  # t = 10: warm-up, not counted
    assert "perf/tokens_per_s" not in meter.compute(reset=False)
    meter.step(100)  # 1 s
    meter.step(100)  # 2 s
    m = meter.compute()
    assert m["perf/tokens_per_s"] == pytest.approx(200 / 3)
    assert m["perf/tokens_per_s_per_device"] == pytest.approx(100 / 3)
    assert m["perf/tflops_per_device"] == pytest.approx(100 / 3 * 3e9 / 1e12)
    assert m["perf/mfu"] == pytest.approx(0.1)
    assert m["perf/step_time_s"] == pytest.approx(1.5)
    assert m["perf/peak_mem_gib"] > 0
    meter.start()  # t = 20: time spent outside training (eval) is not charged
    meter.step(50)  # t = 21
    assert meter.compute()["perf/step_time_s"] == pytest.approx(1.0)
