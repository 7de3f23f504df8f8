"""Routing metrics on hand-made assignments with answers worked out by hand, the cross-rank reduction, and the
routers' diagnostics as metrics."""

from __future__ import annotations

import json
import math
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_lm.metrics.routing import (RoutingRecord, RoutingTracker, collapse_rate, dead_experts, diagnostics_metrics,
                                    drop_fraction, effective_experts, load_cv, load_shares, max_over_mean,
                                    mean_dist_entropy, per_token_mean)
from moe_lm.routers import Diagnostics
from moe_lm.routers.functional import entropy

E = 4


def make_record(probs_TE: list[list[float]], ids_TK: list[list[int]], capacity: int | None = None,
                losses: dict[str, float] | None = None, stats: dict[str, float] | None = None) -> RoutingRecord:
    """The routing record a layer would produce: tokens in order, -1 = unused slot, first come first kept."""
    probs = torch.tensor(probs_TE, dtype=torch.float32)
    counts, kept = torch.zeros(probs.shape[1]), torch.zeros(probs.shape[1])
    topk_mass = active = 0.0
    for t, ids in enumerate(ids_TK):
        for e in (e for e in ids if e >= 0):
            counts[e] += 1
            kept[e] += capacity is None or kept[e] < capacity
            topk_mass += probs[t, e].item()
            active += 1
    return RoutingRecord(counts_E=counts, kept_counts_E=kept, probs_sum_E=probs.sum(0),
                         entropy_sum=entropy(probs).sum(), topk_mass_sum=torch.tensor(topk_mass),
                         active_sum=torch.tensor(active), num_tokens=torch.tensor(float(len(ids_TK))),
                         num_records=torch.tensor(1.0),
                         losses={k: torch.tensor(v) for k, v in (losses or {}).items()},
                         stats={k: torch.tensor(v) for k, v in (stats or {}).items()})


def collapsed(tokens: int = 8, capacity: int | None = None, **named: dict[str, float]) -> RoutingRecord:
    """Every token sends all its probability and its one slot to expert 0."""
    return make_record([[1.0, 0.0, 0.0, 0.0]] * tokens, [[0]] * tokens, capacity, **named)


def uniform(tokens: int = 8, **named: dict[str, float]) -> RoutingRecord:
    """Uniform probabilities, token t to expert t mod 4."""
    return make_record([[0.25] * E] * tokens, [[t % E] for t in range(tokens)], **named)


def test_collapsed_router():
    r = collapsed()
    assert load_shares(r.counts_E).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert load_cv(r.counts_E).item() == pytest.approx(math.sqrt(3))  # std = sqrt(8²/4 - 2²) = 2·sqrt(3), mean 2
    assert max_over_mean(r.counts_E).item() == pytest.approx(4.0)
    assert dead_experts(r.counts_E, 0.1).item() == 3
    assert collapse_rate(r.counts_E[None], 0.1).item() == pytest.approx(0.75)
    assert per_token_mean(r.entropy_sum, r.num_tokens).item() == pytest.approx(0.0)
    assert mean_dist_entropy(r.probs_sum_E, r.num_tokens).item() == pytest.approx(0.0)
    assert effective_experts(mean_dist_entropy(r.probs_sum_E, r.num_tokens)).item() == pytest.approx(1.0)
    assert per_token_mean(r.topk_mass_sum, r.num_tokens).item() == pytest.approx(1.0)


def test_uniform_router():
    r = uniform()
    assert load_cv(r.counts_E).item() == 0.0
    assert max_over_mean(r.counts_E).item() == 1.0
    assert dead_experts(r.counts_E, 0.1).item() == 0
    assert collapse_rate(r.counts_E[None], 0.1).item() == 0.0
    assert entropy(torch.full((E,), 1 / E)).item() == pytest.approx(math.log(E))
    assert per_token_mean(r.entropy_sum, r.num_tokens).item() == pytest.approx(math.log(4))
    assert effective_experts(mean_dist_entropy(r.probs_sum_E, r.num_tokens)).item() == pytest.approx(4.0)
    assert per_token_mean(r.topk_mass_sum, r.num_tokens).item() == pytest.approx(0.25)


def test_confident_tokens_balanced_load():
    """Each token is sure of its expert (token entropy 0) yet the experts are used evenly (H(p̄) = log 4)."""
    r = make_record([[1.0 if e == t % E else 0.0 for e in range(E)] for t in range(8)], [[t % E] for t in range(8)])
    assert per_token_mean(r.entropy_sum, r.num_tokens).item() == pytest.approx(0.0)
    assert mean_dist_entropy(r.probs_sum_E, r.num_tokens).item() == pytest.approx(math.log(4))


def test_top2_variable_active_and_drops():
    # token 0 picks 0,1 (mass .5+.3); token 1 picks 0 only (mass .6); capacity 1 drops token 1's slot at expert 0
    r = make_record([[0.5, 0.3, 0.2, 0.0], [0.6, 0.2, 0.1, 0.1]], [[0, 1], [0, -1]], capacity=1)
    assert r.counts_E.tolist() == [2, 1, 0, 0] and r.kept_counts_E.tolist() == [1, 1, 0, 0]
    assert drop_fraction(r.counts_E, r.kept_counts_E).item() == pytest.approx(1 / 3)
    assert per_token_mean(r.active_sum, r.num_tokens).item() == pytest.approx(1.5)
    assert per_token_mean(r.topk_mass_sum, r.num_tokens).item() == pytest.approx((0.8 + 0.6) / 2)
    # p̄ = (.55, .25, .15, .05)
    expected = -sum(p * math.log(p) for p in (0.55, 0.25, 0.15, 0.05))
    assert mean_dist_entropy(r.probs_sum_E, r.num_tokens).item() == pytest.approx(expected)


def test_dead_threshold():
    # threshold 0.1 / 4 = 0.025: shares .96, .02, .01, .01 -> three dead; share .025 exactly is alive
    assert dead_experts(torch.tensor([96.0, 2.0, 1.0, 1.0]), 0.1).item() == 3
    assert dead_experts(torch.tensor([97.5, 2.5, 0.0, 0.0]), 0.1).item() == 2


def test_tracker_sums_records_and_averages_losses():
    tracker = RoutingTracker(num_moe_layers=1, num_experts=E, dead_expert_share=0.1)
    tracker.record(0, collapsed(4, capacity=2, losses={"load_balance": 1.0}, stats={"kappa_mean": 0.5}))
    tracker.record(0, uniform(4, losses={"load_balance": 3.0}, stats={"kappa_mean": 1.5}))
    m = tracker.compute()
    # counts (4+1, 1, 1, 1): mean 2, population std sqrt((9+1+1+1)/4) = sqrt(3)
    assert m["moe/load_cv_mean"] == pytest.approx(math.sqrt(3) / 2)
    assert m["moe/max_over_mean_mean"] == pytest.approx(2.5)
    assert m["moe/drop_frac"] == pytest.approx(2 / 8)  # expert 0 keeps 2 of the collapsed 4, then 1 more
    assert m["moe/dead_experts"] == 0 and m["moe/collapse_rate"] == 0
    assert m["moe/token_entropy"] == pytest.approx(4 * math.log(4) / 8)
    # p̄ = ((4 + 1)/8, 1/8, 1/8, 1/8)
    assert m["moe/mean_dist_entropy"] == pytest.approx(-(5 / 8) * math.log(5 / 8) - 3 * (1 / 8) * math.log(1 / 8))
    assert m["moe/topk_mass"] == pytest.approx((4 * 1.0 + 4 * 0.25) / 8)
    assert m["moe/active_experts"] == pytest.approx(1.0)
    assert m["moe/loss/load_balance"] == pytest.approx(2.0) and m["moe/stat/kappa_mean"] == pytest.approx(1.0)
    assert not any(k.startswith("moe/layer") for k in m)
    assert tracker.compute() == {}  # reset


def test_tracker_summary_over_layers_and_per_layer_keys():
    tracker = RoutingTracker(num_moe_layers=3, num_experts=E, dead_expert_share=0.1, per_layer=True)
    tracker.record(0, collapsed(losses={"z_loss": 2.0}))
    tracker.record(1, uniform(losses={"z_loss": 4.0}))
    tracker.record(2, uniform())
    m = tracker.compute(reset=False)
    s3 = math.sqrt(3)
    assert m["moe/load_cv_mean"] == pytest.approx(s3 / 3)
    assert m["moe/load_cv_max"] == pytest.approx(s3)
    assert m["moe/load_cv_p50"] == pytest.approx(0.0)
    assert m["moe/load_cv_p90"] == pytest.approx(0.8 * s3)  # linear: (0, 0, sqrt3), rank 0.9·2 = 1.8
    assert m["moe/max_over_mean_max"] == pytest.approx(4.0)
    assert m["moe/dead_experts"] == 3 and m["moe/collapse_rate"] == pytest.approx(3 / 12)
    assert m["moe/loss/z_loss"] == pytest.approx(3.0)  # mean over the layers that report it
    assert m["moe/layer0/load_cv"] == pytest.approx(s3) and m["moe/layer1/load_cv"] == 0
    assert m["moe/layer0/dead_experts"] == 3 and m["moe/layer0/loss/z_loss"] == 2.0
    assert "moe/layer2/loss/z_loss" not in m
    assert [m[f"moe/layer0/share/e{e}"] for e in range(E)] == [1, 0, 0, 0]
    assert tracker.last_load_shares() == [[1, 0, 0, 0], [0.25] * 4, [0.25] * 4]
    assert tracker.layer_counts(0).tolist() == [8, 0, 0, 0] and tracker.layer_counts(2).tolist() == [2] * 4
    assert tracker.compute() == m  # reset=False kept the sums


def test_tracker_rejects_bad_records():
    tracker = RoutingTracker(num_moe_layers=2, num_experts=E)
    assert tracker.compute() == {} and tracker.last_load_shares() is None
    with pytest.raises(RuntimeError):
        tracker.layer_counts(0)
    with pytest.raises(IndexError, match="MoE layer 2"):
        tracker.record(2, uniform())
    with pytest.raises(ValueError, match=r"counts_E of MoE layer 0 has shape \(8,\)"):
        tracker.record(0, make_record([[0.125] * 8], [[0]]))



def test_records_of_one_layer_must_report_the_same_losses_and_stats():
    assert (uniform(losses={"z_loss": 1.0}) + uniform(losses={"z_loss": 3.0})).losses["z_loss"].item() == 4.0
    with pytest.raises(ValueError, match="different losses or stats"):
        uniform(losses={"z_loss": 1.0}) + uniform()


# ---- router diagnostics ----

def test_diagnostics_average_scalars_and_per_expert_means_over_layers():
    layers = [Diagnostics(scalars={"r/gap": 1.0}, per_expert={"r/alignment": torch.tensor([0.0, 1.0, 1.0, 0.0])}),
              Diagnostics(scalars={"r/gap": 3.0}, per_expert={"r/alignment": torch.tensor([1.0, 1.0, 1.0, 1.0])})]
    assert diagnostics_metrics(layers, per_layer=False) == {"router/r/gap": 2.0, "router/r/alignment_mean": 0.75}
    per_layer = diagnostics_metrics(layers, per_layer=True)
    assert per_layer["router/layer1/r/gap"] == 3.0 and per_layer["router/layer0/r/alignment_mean"] == 0.5
    assert [per_layer[f"router/layer0/r/alignment/e{e}"] for e in range(E)] == [0.0, 1.0, 1.0, 0.0]
    assert diagnostics_metrics([], per_layer=True) == {}


def test_a_scalar_diagnostic_whose_name_contains_slash_e_is_logged():
    """Whether a diagnostic is per expert comes from its type, not from its name."""
    layers = [Diagnostics(scalars={"sinkhorn/error": 0.5}), Diagnostics(scalars={"sinkhorn/error": 1.5})]
    assert diagnostics_metrics(layers, per_layer=False) == {"router/sinkhorn/error": 1.0}

# ---- two real processes must give the single-process numbers ----

def micro_batches() -> list[list[RoutingRecord]]:
    """4 micro-batches x 2 MoE layers of top-2 routing with capacity drops, fixed by a seed."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for mb in range(4):
        layers = []
        for layer in range(2):
            probs = torch.softmax(3 * torch.randn(6, E, generator=gen), -1)
            ids = probs.topk(2, -1).indices.tolist()
            layers.append(make_record(probs.tolist(), ids, capacity=3, losses={"load_balance": mb + layer},
                                      stats={"kappa_mean": 0.1 * mb}))
        batches.append(layers)
    return batches


def record_and_compute(batches: list[list[RoutingRecord]]) -> tuple[dict[str, float], list[float]]:
    """Metrics, then the load shares and the counts of both layers, flattened."""
    tracker = RoutingTracker(num_moe_layers=2, num_experts=E, dead_expert_share=0.1, per_layer=True)
    for layers in batches:
        for layer, record in enumerate(layers):
            tracker.record(layer, record)
    metrics = tracker.compute()
    counts = torch.cat([tracker.layer_counts(i) for i in range(2)]).tolist()
    return metrics, sum(tracker.last_load_shares(), []) + counts


def dist_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    all_reduce, all_reduces = dist.all_reduce, []
    dist.all_reduce = lambda *args, **kwargs: all_reduces.append(args[0].shape) or all_reduce(*args, **kwargs)
    try:
        metrics, matrices = record_and_compute(micro_batches()[rank::2])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"metrics": metrics, "matrices": matrices, "all_reduces": len(all_reduces)}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_in_one_all_reduce(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(dist_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    single, single_matrices = record_and_compute(micro_batches())
    assert single["moe/drop_frac"] > 0 and "moe/layer1/share/e3" in single
    assert single["moe/loss/load_balance"] == pytest.approx(2.0)  # mean of mb + layer over 4 x 2 records
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["metrics"] == pytest.approx(single, rel=1e-9)
        assert result["matrices"] == pytest.approx(single_matrices, rel=1e-9)
        assert result["all_reduces"] == 1  # every layer's sums, losses and stats in one flat tensor
