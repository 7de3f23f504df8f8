"""scripts/synthetic_routing.py: its measures (principal angles, matching, top-1, collapse counts) and a short run.

No assertion on speed: the benchmark reports its own wall time.
"""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from moe_lm.config.schema import RouterConfig
from moe_lm.routers import Router, RouterOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # it imports its sibling `shootout`
sr = importlib.import_module("synthetic_routing")

SHORT = sr.Task(steps=200)
"""A few seconds per run; GrMoE's angle is still falling there (docs/synthetic-routing.md)."""


def _basis(*columns):
    return torch.tensor(columns, dtype=torch.float64).T


def test_principal_angles_are_zero_within_one_subspace_and_ninety_between_orthogonal_ones():
    plane_DA = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q
    other_basis_DA = plane_DA @ torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)  # same span
    # arccos is steep at 1: a rounding error of 1e-16 in a cosine is an angle of about 1e-6°
    torch.testing.assert_close(sr.principal_angles(plane_DA, other_basis_DA), torch.zeros(2, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    orthogonal = sr.principal_angles(_basis([1, 0, 0, 0], [0, 1, 0, 0]), _basis([0, 0, 1, 0], [0, 0, 0, 1]))
    torch.testing.assert_close(orthogonal, torch.full((2,), 90.0, dtype=torch.float64))


def test_principal_angle_of_a_line_is_its_angle_to_its_projection_on_the_subspace():
    line_D1 = _basis([math.cos(math.radians(30)), 0, math.sin(math.radians(30))])
    angles = sr.principal_angles(_basis([1, 0, 0], [0, 1, 0]), line_D1)
    assert angles.shape == (1,) and angles.item() == pytest.approx(30.0)


def test_matching_is_the_permutation_with_the_most_tokens_not_the_greedy_one():
    # greedy takes the 10 first and is left with 1 (total 11); the best matching crosses over (9 + 9 = 18)
    assert sr.match_components(torch.tensor([[10.0, 9.0], [9.0, 1.0]])).tolist() == [1, 0]
    permutation = torch.randperm(8)
    confusion_CE = torch.rand(8, 8)
    confusion_CE[torch.arange(8), permutation] += 10
    assert torch.equal(sr.match_components(confusion_CE), permutation)


def test_top1_is_the_assigned_expert_with_the_largest_weight_and_minus_one_for_an_unassigned_token():
    token_N, expert_N, weight_N = torch.tensor([0, 0, 2, 2]), torch.tensor([5, 3, 1, 4]), torch.tensor([.3, .7, .6, .4])
    assert sr.top1_experts(token_N, expert_N, weight_N, num_tokens=3, num_experts=8).tolist() == [3, -1, 1]


class _TwoExpertRouter(Router):
    """Sends every token to experts 0 and 1 with weights 1/2: the collapsed layer the report must count."""

    def forward(self, x_TD, **_):
        num_tokens = x_TD.shape[0]
        probs_TE = torch.zeros(num_tokens, self.num_experts)
        probs_TE[:, :2] = 0.5
        return RouterOutput(probs_TE, torch.tensor([0, 1]).expand(num_tokens, 2), probs_TE[:, :2])


def test_collapse_figures_count_every_slot_of_the_training_assignments(one_thread):
    task = sr.Task(steps=sr.COUNT_STEPS)
    figures = sr.train_run(_TwoExpertRouter(RouterConfig(), task.d, task.experts, 2), task, 1,
                           sr.zipf(task.experts, 0.0))
    # counts (n, n, 0, ..., 0): E − 2 dead experts and CV = sqrt(E/2 − 1) (sqrt(E − 1) if one slot were counted)
    assert figures["dead_experts"] == task.experts - 2
    assert figures["load_cv"] == pytest.approx(math.sqrt(task.experts / 2 - 1))
    assert math.isnan(figures["angle_deg"])  # a router with no learned subspace


def test_expert_choice_assigns_each_expert_its_picked_tokens():
    token_ids_EC = torch.tensor([[0, 1], [1, 2], [3, 0]])
    out = RouterOutput(torch.zeros(4, 3), None, None, token_ids_EC=token_ids_EC, weights_EC=torch.rand(3, 2))
    token_N, expert_N, _ = sr.assignments(out, num_tokens=4)
    assert token_N.tolist() == [0, 1, 1, 2, 3, 0] and expert_N.tolist() == [0, 0, 1, 1, 2, 2]


def test_router_init_does_not_replay_the_task_random_stream():
    """torch.manual_seed(s) replays torch.Generator().manual_seed(s): seeded alike, a router would start from the
    numbers that drew the planted frames and teachers."""
    router = sr.make_router("softmax_topk", SHORT, 1)
    task_stream = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    scaled_rows = router.proj.weight.detach().flatten()[:64] / router.cfg.init_std
    replayed = (scaled_rows.unsqueeze(1) - task_stream).abs().amin(1) < 1e-6  # by chance: 0.2 of 64 expected
    assert replayed.sum() < 8


def test_grmoe_aligns_its_frames_with_the_planted_subspaces_and_hash_routes_at_chance(one_thread):
    balanced_C = sr.zipf(SHORT.experts, 0.0)
    grmoe = sr.train_run(sr.make_router("grmoe", SHORT, 1), SHORT, 1, balanced_C)
    hash_ = sr.train_run(sr.make_router("hash", SHORT, 1), SHORT, 1, balanced_C)
    # an untrained GrMoE frame (8 dimensions of R^64) lies 65–70° from a planted plane
    assert grmoe["angle_deg"] < 40 and grmoe["accuracy"] > 0.6
    assert hash_["accuracy"] < 0.2  # chance is 1/8; the best matching of a random confusion adds a little


def test_a_hard_load_balance_term_lowers_grmoes_load_cv_on_a_skewed_mixture(one_thread):
    """GrMoE's own balance term, KL(ḡ || U), sees only the mean of the soft responsibilities; the loss-free
    selection bias sees the hard top-k loads, so on a Zipf mixture it must balance them better."""
    skewed_C = sr.zipf(SHORT.experts, 1.0)
    plain = sr.train_run(sr.make_router("grmoe_kl", SHORT, 1), SHORT, 1, skewed_C)  # KL(ḡ || U) alone
    loss_free = sr.train_run(sr.make_router("grmoe", SHORT, 1), SHORT, 1, skewed_C)  # the default adds the bias
    assert loss_free["load_cv"] < 0.5 * plain["load_cv"]
