"""The post-hoc sparsity sweep (moe_lm/eval/sweep.py) as a spec, on 3-step runs of grmoe and softmax_topk
(`trained_runs`: E = 4, top_k = 2, capacity_factor 1.25, micro-batches of 2 sequences of 32 tokens, 2 MoE layers of
d_model 32 and d_ff 48): it runs at the training capacity and reports the drops, always has the τ = 0 and trained-α
reference rows, lets k_max reach E, counts the FLOPs of the kept assignments, and sweeps a baseline's temperature.
"""

import csv
import json

import pytest

from moe_lm.cli import main
from moe_lm.config import load_config
from moe_lm.data import make_batch
from moe_lm.checkpoint import load_model
from moe_lm.eval.evaluate import evaluate, validation_data
from moe_lm.eval.sweep import SWEEP_COLUMNS, post_hoc_routers, sweep
from moe_lm.metrics import RoutingTracker
from moe_lm.model.transformer import MoETransformer
from tests.export.test_hf_export import SHAPE, trained_runs

SAMPLES = 10  # 5 whole micro-batches of the 11-sequence validation split
ALPHAS, TAU = [0.25, 16.0], 0.8

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second intra-op thread only adds waiting


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def swept(runs, tmp_path_factory):
    """(rows, output folder) of grmoe with the softmax_topk baseline, at the training capacity, k_max = E."""
    out = tmp_path_factory.mktemp("sweep")
    return sweep(runs / "grmoe", ALPHAS, [TAU], num_samples=SAMPLES, out_dir=out, baseline=runs / "softmax_topk"), out


def rows_of(rows, router, tau):
    """The rows of one arm at one τ, α ascending."""
    return [r for r in rows if r["router"] == router and r["tau"] == tau]


def training_drop_fraction(checkpoint):
    """moe/drop_frac as the trainer logs it: training forwards (capacity_factor) over the sweep's micro-batches."""
    model, cfg = load_model(checkpoint)
    model.train()
    data = validation_data(cfg.data.dir, cfg.model.seq_len)
    tracker = RoutingTracker(len(model.moe_layers()), cfg.model.moe.num_experts)
    for first in range(0, SAMPLES, cfg.train.micro_batch_size):
        model(*make_batch(data, list(range(first, first + cfg.train.micro_batch_size))))
        for i, layer in enumerate(model.moe_layers()):
            tracker.record(i, layer.gate.record)
    return tracker.compute()["moe/drop_frac"]


def test_both_arms_always_have_the_top_k_and_trained_alpha_reference_rows(swept):
    rows, _ = swept
    for router in ("grmoe", "softmax_topk"):
        assert [(r["alpha"], r["tau"]) for r in rows if r["router"] == router] == [
            (alpha, tau) for tau in (0.0, TAU) for alpha in (0.25, 1.0, 16.0)]


@pytest.mark.parametrize("router", ["grmoe", "softmax_topk"])
def test_the_sweep_at_training_capacity_drops_what_training_drops(runs, swept, router):
    rows, _ = swept
    trained = next(r for r in rows_of(rows, router, 0.0) if r["alpha"] == 1.0)
    assert trained["capacity_factor"] == 1.25
    # eval_capacity_factor 2.0 holds every assignment of these micro-batches: a drop shows the training buffers
    assert trained["drop_frac"] > 0
    assert trained["drop_frac"] == pytest.approx(training_drop_fraction(runs / router), abs=1e-12)


def test_tau_zero_rows_dispatch_the_top_k_at_every_alpha(swept):
    rows, _ = swept
    for router in ("grmoe", "softmax_topk"):
        assert [r["active_experts"] for r in rows_of(rows, router, 0.0)] == [2.0, 2.0, 2.0]


def test_the_trained_alpha_at_tau_zero_is_the_checkpoints_own_evaluation(runs, tmp_path):
    [row] = sweep(runs / "grmoe", [], [], num_samples=SAMPLES, out_dir=tmp_path / "sweep", dropless=True)
    report = evaluate(runs / "grmoe", tmp_path, num_samples=SAMPLES, dropless=True)
    assert (row["alpha"], row["tau"], row["capacity_factor"], row["drop_frac"]) == (1.0, 0.0, None, 0.0)
    assert (row["val_loss"], row["active_experts"]) == (report["loss"], report["active_experts"])


def test_grmoe_active_experts_fall_as_alpha_rises_from_above_top_k(swept):
    active = [r["active_experts"] for r in rows_of(swept[0], "grmoe", TAU)]
    assert all(a >= b for a, b in zip(active, active[1:])), active
    assert active[0] > 2 > active[-1], active  # k_max = E lets a flat token take more than top_k experts


def test_the_baseline_temperature_moves_active_experts_too(swept):
    active = [r["active_experts"] for r in rows_of(swept[0], "softmax_topk", TAU)]
    assert all(a >= b for a, b in zip(active, active[1:])), active
    assert active[0] > active[-1], active


def test_flops_count_only_the_assignments_the_training_buffers_keep(swept):
    rows, _ = swept
    flat = rows_of(rows, "grmoe", TAU)[0]  # α = 0.25: most tokens ask for more than top_k experts
    assert flat["max_experts"] == 4 and flat["drop_frac"] > 0
    # each expert's buffer is sized for top_k = 2 (not k_max = 4) assignments per token, times 1.25
    assert flat["kept_experts"] <= 2 * 1.25 < flat["active_experts"]
    assert flat["kept_experts"] == pytest.approx(flat["active_experts"] * (1 - flat["drop_frac"]))
    assert flat["expert_flops_per_token"] == pytest.approx(2 * 3 * 32 * 48 * flat["kept_experts"] * 2)
    assert flat["flops_vs_topk"] == pytest.approx(flat["kept_experts"] / 2)


def test_the_sweep_writes_its_rows_as_csv_and_json_and_one_plot(swept):
    rows, out = swept
    assert {p.name for p in out.iterdir()} == {"sweep.csv", "sweep.json", "ppl_vs_active_experts.png"}
    with open(out / "sweep.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SWEEP_COLUMNS and len(list(reader)) == len(rows) == 12
    written = json.loads((out / "sweep.json").read_text())
    assert written["rows"] == rows and written["samples"] == SAMPLES and not written["dropless"]


@pytest.mark.parametrize("k_max", [0, 5])
def test_k_max_outside_one_to_e_is_refused_before_anything_is_evaluated(runs, tmp_path, k_max):
    with pytest.raises(ValueError, match=rf"max_experts \(k_max\) must be in \[1, 4\].*got {k_max}"):
        sweep(runs / "grmoe", [1.0], [TAU], max_experts=k_max, num_samples=2, out_dir=tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_a_router_without_knobs_is_refused_naming_the_routers_that_have_them():
    cfg = load_config(None, [*SHAPE, "model.moe.router.name=hash"])
    with pytest.raises(ValueError, match="router 'hash' has no post-hoc knobs.*grmoe, mpi, softmax_topk"):
        post_hoc_routers(MoETransformer(cfg.model), "hash")


def test_cli_sweeps_a_run_with_its_baseline_into_one_table(runs, tmp_path, capsys):
    main(["eval", str(runs / "grmoe"), "--sweep", "--baseline", str(runs / "softmax_topk"), "--alphas", "1",
          "--taus", "0", "--samples", "2", "--out", str(tmp_path / "sweep")])
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        assert [r["router"] for r in csv.DictReader(f)] == ["grmoe", "softmax_topk"]
    assert "sweep.csv" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--baseline is an arm of --sweep"):
        main(["eval", str(runs / "grmoe"), "--baseline", str(runs / "softmax_topk")])
