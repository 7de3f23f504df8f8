"""`compare_runs` on three hand-made run directories: two seeds of one recipe and one other router."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from omegaconf import OmegaConf

from moe_lm.metrics.compare import compare_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, router: str, seed: int, val_ppl: float, cv: float, shares: list[list[float]],
             summary_moe: bool = True) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"run": {"name": name, "dir": f"runs/{name}"}, "wandb": {"name": name},
              "model": {"n_layers": 2, "moe": {"num_experts": 4, "router": {"name": router}}},
              "train": {"seed": seed, "max_steps": 30}}
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    summary = {"router": router, "val_loss": 2.0, "val_ppl": val_ppl, "unigram_ppl": 300.0, "tokens_per_s": 12345.6,
               "mfu": 0.0123, "steps": 30, "tokens": 30 * 2048}
    if summary_moe:
        summary |= {"moe/load_cv_mean": cv, "moe/max_over_mean_mean": 1.5, "moe/collapse_rate": 0.125,
                    "moe/token_entropy": 1.2}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rows = []
    for step in range(10, 31, 10):
        rows.append({"step": step, "tokens": step * 2048, "train/loss": 3.0 - step / 30, "moe/load_cv_mean": cv * step})
        rows.append({"step": step, "val/loss": 2.5 + val_ppl / 10 - step / 60, "val/ppl": val_ppl})
    rows.append({"step": 30, "moe/load_shares": shares})
    rows.append({"step": 30, "moe/load_cv_mean": cv})  # a resumed run logs step 30 again: the last row wins
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    balanced = [[0.25, 0.25, 0.25, 0.25], [0.3, 0.2, 0.25, 0.25]]
    return [make_run(tmp_path, "topk-s1", "softmax_topk", 1, 10.0, 0.2, balanced),
            make_run(tmp_path, "topk-s2", "softmax_topk", 2, 12.0, 0.4, balanced),
            make_run(tmp_path, "collapsed", "expert_choice", 1, 20.0, 1.0,
                     [[0.97, 0.01, 0.01, 0.01], [0.55, 0.45, 0.0, 0.0]], summary_moe=False)]


def test_compare_table_and_plots(runs, tmp_path):
    out = tmp_path / "cmp"
    md = compare_runs(runs, out)
    assert md == out / "compare.md"
    lines = md.read_text().splitlines()
    assert ("| run | router | seed | val ppl | load CV | max/mean | collapse rate | token entropy | tokens/s | MFU |"
            in lines)
    assert "| topk-s1 | softmax_topk | 1 | 10.00 | 0.200 | 1.50 | 0.125 | 1.200 | 12,346 | 1.23% |" in lines
    # no moe/ keys in its summary: the last metrics.jsonl values, "–" where none was logged
    assert "| collapsed | expert_choice | 1 | 20.00 | 1.000 | – | – | – | 12,346 | 1.23% |" in lines
    # seeds 1 and 2: mean ± sample std; ppl 11 ± sqrt(2), CV 0.3 ± 0.1414
    assert ("| **topk-s1 + topk-s2** | **softmax_topk** | **mean ± std (2 seeds)** | **11.00 ± 1.41** | "
            "**0.300 ± 0.141** | **1.50 ± 0.00** | **0.125 ± 0.000** | **1.200 ± 0.000** | **12,346 ± 0** | "
            "**1.23% ± 0.00%** |") in lines
    assert sum("expert_choice" in line for line in lines) == 1  # a single run gets no group row

    pngs = ["val_loss.png", "load_cv.png"] + [f"expert_load_{r.name}.png" for r in runs]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert width >= 600 and height >= 300, name
        assert f"]({name})" in md.read_text()


def test_missing_file_names_run_and_file(runs, tmp_path):
    (runs[1] / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"topk-s2.*metrics\.jsonl"):
        compare_runs(runs, tmp_path / "cmp")


class _FakeWandbRun:
    config = {"model": {"moe": {"router": {"name": "mpi"}, "num_experts": 2}}, "train": {"seed": 1}}
    summary = {"val_ppl": 12.5, "tokens_per_s": 100.0, "_runtime": 3}

    def scan_history(self):
        return [{"_step": 1, "train/loss": 3.0, "tokens": 64, "_timestamp": 0},
                {"_step": 2, "val/loss": 2.5, "tokens": 128, "moe/load_cv_mean": 0.2}]


class _FakeWandbApi:
    def run(self, path):
        assert path == "team/moe-lm/abc123"
        return _FakeWandbRun()


def test_online_wandb_runs_are_compared_by_their_run_path(runs, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "Api", _FakeWandbApi)
    report = compare_runs([runs[0], "team/moe-lm/abc123"], tmp_path / "out")
    fetched = tmp_path / "out" / "wandb_runs" / "abc123"
    assert json.loads((fetched / "summary.json").read_text())["router"] == "mpi"
    assert [json.loads(line)["step"] for line in (fetched / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "12.50" in report.read_text()
