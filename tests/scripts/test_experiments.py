"""scripts/experiments.py: the verdicts it writes into docs/results.md follow from the runs' numbers, both ways."""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # it imports its sibling `shootout`
experiments = importlib.import_module("experiments")


def fake_run(root: Path, name: str, val_ppl: float, load_cv: float, dead: float = 0.0) -> Path:
    """A finished run folder as `moe-lm compare` reads it: summary.json, metrics.jsonl, config.yaml."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    summary = {"router": name.split("_s")[0], "val_ppl": val_ppl, "moe/load_cv_mean": load_cv,
               "moe/dead_experts": dead}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "moe/stat/kappa_std": 0.2}) + "\n")
    (run_dir / "config.yaml").write_text("run:\n  name: x\n")
    return run_dir


def balance_row(tmp_path: Path, grmoe: list[tuple[float, float, float]]) -> str:
    groups = {"softmax_topk": [fake_run(tmp_path, f"softmax_topk_s{i}", 100.0, 0.20) for i in (1, 2, 3)],
              "grmoe": [fake_run(tmp_path, f"grmoe_s{i}", *values) for i, values in enumerate(grmoe, 1)]}
    rows = experiments.claims(groups, [], "python scripts/experiments.py")
    return next(row for row in rows if "better load balance" in row)


def test_balance_claim_is_supported_only_with_lower_cv_comparable_ppl_and_no_dead_expert(tmp_path):
    assert "**supported**" in balance_row(tmp_path / "a", [(101.0, 0.15, 0.0)] * 3)  # 25% lower CV, +1% ppl
    assert "**not supported**" in balance_row(tmp_path / "b", [(101.0, 0.18, 0.0)] * 3)  # only 10% lower
    assert "**not supported**" in balance_row(tmp_path / "c", [(104.0, 0.15, 0.0)] * 3)  # ppl 4% worse
    assert "**not supported**" in balance_row(tmp_path / "d", [(101.0, 0.15, 0.0)] * 2 + [(101.0, 0.15, 1.0)])


def test_collapse_claim_needs_zero_dead_experts_in_every_seed(tmp_path):
    groups = {"softmax_topk": [fake_run(tmp_path, "softmax_topk_s1", 100.0, 0.2)],
              "grmoe": [fake_run(tmp_path, "grmoe_s1", 100.0, 0.2), fake_run(tmp_path, "grmoe_s2", 100.0, 0.2, 1.0)]}
    row = next(r for r in experiments.claims(groups, [], "cmd") if "routing collapse" in r)
    assert "**not supported**" in row


def test_a_sparsity_curve_must_fall_monotonically_and_move_over_both_halves_of_alpha():
    falling = [(0.25, 7.5, 0), (1, 5.0, 0), (4, 2.5, 0), (16, 1.2, 0)]
    assert experiments.monotone_and_not_flat(falling) == (True, True)
    rising_once = [(0.25, 7.5, 0), (1, 5.0, 0), (4, 5.5, 0), (16, 1.2, 0)]
    assert experiments.monotone_and_not_flat(rising_once)[0] is False
    flat_at_low_alpha = [(0.25, 2.0, 0), (0.5, 2.0, 0), (1, 2.0, 0), (4, 1.5, 0), (16, 1.1, 0)]
    assert experiments.monotone_and_not_flat(flat_at_low_alpha) == (True, False)
