"""scripts/peer_benchmark.py at a toy shape: both sides run and the report holds what it promises.

No assertion on speed: speed figures come from the benchmark itself, never from timed tests.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "peer_benchmark.py"
CORPUS = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))
TOY_SHAPE = ["--layers", "2", "--d", "32", "--heads", "4", "--experts", "4", "--topk", "2", "--ffn", "48",
             "--vocab", "300", "--seq", "32", "--batch", "4"]


def _load_script():
    spec = importlib.util.spec_from_file_location("peer_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_toy_run_reports_both_sides_with_positive_throughput_and_a_ratio(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(CORPUS[i * 2000:(i + 1) * 2000 + 4000])
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), *TOY_SHAPE, "--warmup", "1", "--steps", "1", "--routers", "softmax_topk",
               "--timeout", "120", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--",
               f"data.sources=[{corpus}]", "data.vocab_size=300", "data.val_fraction=0.2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "peer.json").read_text())
    assert "error" not in report["moe_lm"], report["moe_lm"]
    assert report["moe_lm"]["tokens_per_s"] > 0 and report["moe_lm"]["tokens_per_step"] == 4 * 32
    assert set(report["hf"]) == {"eager", "grouped_mm"}
    for impl, result in report["hf"].items():
        assert "error" not in result, result
        assert result["tokens_per_s"] > 0 and result["experts_implementation"] == impl
    assert report["ratio"] > 0 and report["hf_best"] in report["hf"]
    assert report["moe_lm"]["params"] == report["hf"]["eager"]["params"]  # the same shape on both sides
    assert report["routers"]["softmax_topk"]["step_ratio"] == 1.0
    assert len(report["baseline_runs"]) == 2  # before and after the HF runs
    assert "vs HF best" in (out / "peer.md").read_text()


def test_ratio_is_moe_lm_over_the_fastest_hf_implementation_and_failed_runs_are_reported(tmp_path):
    script = _load_script()

    def run(tokens_per_s: float) -> dict:
        return {"tokens_per_s": tokens_per_s, "step_s": 1000 / tokens_per_s, "peak_mem_gib": 1.0, "threads": 2,
                "precision": "fp32", "optimizer": "AdamW fused", "params": 10}

    report = {"shape": dict(script.SHAPE_DEFAULTS), "warmup": 1, "steps": 1, "device": "cpu", "date": "today",
              "versions": {"torch": "x", "transformers": "y", "deepspeed": "z"}, "moe_lm_overrides": [],
              "flops_per_token": 6.0, "peak_flops": 6000.0, "peak_flops_source": "test",
              "moe_lm": run(300.0), "hf": {"eager": run(200.0), "grouped_mm": run(400.0)},
              "routers": {"softmax_topk": run(300.0), "mpi": {"error": "exit code 1"}}}
    script.finish(report, tmp_path)

    assert report["hf_best"] == "grouped_mm" and report["ratio"] == 0.75
    assert report["moe_lm"]["mfu"] == 0.3  # 300 tokens/s · 6 FLOPs/token / 6000 FLOP/s
    assert "failed: exit code 1" in (tmp_path / "peer.md").read_text()
    assert json.loads((tmp_path / "peer.json").read_text())["ratio"] == 0.75


def test_each_ratio_is_taken_against_the_baseline_runs_around_it(tmp_path):
    """A machine that slows down during the benchmark must not favour the side that ran first."""
    script = _load_script()

    def run(step_s: float, peak_mem_gib: float = 1.0) -> dict:
        return {"tokens_per_s": 1000 / step_s, "step_s": step_s, "peak_mem_gib": peak_mem_gib, "threads": 2,
                "precision": "fp32", "optimizer": "AdamW fused", "params": 10}

    before, after = run(2.5), run(5.0, peak_mem_gib=1.5)
    baseline = script.bracketed(before, after)
    assert baseline["step_s"] == 3.75 and baseline["tokens_per_s"] == 1000 / 3.75 and baseline["peak_mem_gib"] == 1.5
    assert script.bracketed({"error": "exit code 1"}, after) is after

    report = {"shape": dict(script.SHAPE_DEFAULTS), "warmup": 1, "steps": 1, "device": "cpu", "date": "today",
              "versions": {"torch": "x", "transformers": "y", "deepspeed": "z"}, "moe_lm_overrides": [],
              "moe_lm": baseline, "hf": {"eager": run(3.0)},
              "routers": {"mpi": {**run(4.0), "baseline_step_s": baseline["step_s"]}}}
    script.finish(report, tmp_path)
    assert report["routers"]["mpi"]["step_ratio"] == 4.0 / 3.75  # not 4.0 / 2.5, against the first run alone
    assert report["ratio"] == pytest.approx(3.0 / 3.75)
    assert "2.5000 s and 5.0000 s" in (tmp_path / "peer.md").read_text()
