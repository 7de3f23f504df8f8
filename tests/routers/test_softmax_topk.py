"""The baseline router, as a spec: its balance loss, its z-loss, the aux-loss-free bias, and resume's shape rules."""

import math
from dataclasses import asdict

import pytest
import torch

from moe_lm.checkpoint import FORMAT_VERSION, CheckpointError, Layout, check_compatible
from moe_lm.config import load_config, to_dict
from moe_lm.routers.functional import switch_load_balancing_loss, topk_routing, z_loss
from moe_lm.routers.softmax_topk import SoftmaxTopKConfig, SoftmaxTopKRouter

E, T = 4, 64


def test_switch_loss_is_one_when_routing_is_uniform_and_e_when_it_collapses():
    uniform_probs = torch.full((T, E), 1.0 / E)
    round_robin = torch.arange(T).remainder(E).unsqueeze(1)
    assert switch_load_balancing_loss(uniform_probs, round_robin).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(T, E).index_fill_(1, torch.tensor([2]), 1.0)
    all_to_two = torch.full((T, 1), 2)
    assert switch_load_balancing_loss(collapsed_probs, all_to_two).item() == pytest.approx(E)


def test_switch_loss_gradient_pushes_probability_away_from_the_overloaded_expert():
    logits = torch.zeros(T, E, requires_grad=True)
    overloaded = torch.zeros(T, 1, dtype=torch.long)  # every token dispatched to expert 0
    switch_load_balancing_loss(logits.softmax(-1), overloaded).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()  # descent lowers expert 0's logit


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 3) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected)
    assert z_loss(logits / 2).item() < z_loss(logits).item()  # logits nearer 0, smaller loss


def test_the_bias_picks_the_experts_and_the_probabilities_weight_them():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    biased = probs + torch.tensor([0.0, 0.0, 1.0])  # expert 2 wins the selection through its bias alone
    weights, ids = topk_routing(probs, 2, renormalize=False, selection_scores_TE=biased)
    assert set(ids[0].tolist()) == {2, 0}
    assert dict(zip(ids[0].tolist(), weights[0].tolist())) == pytest.approx({2: 0.1, 0: 0.6})


def test_aux_free_bias_rises_for_underloaded_experts_and_falls_for_overloaded_ones():
    router = SoftmaxTopKRouter(SoftmaxTopKConfig(bias_update_rate=0.01), 8, E, 2)
    assert router.needs_step_counts
    router.post_step(torch.tensor([10.0, 30.0, 20.0, 20.0]))  # mean 20
    assert router.balance_bias_E.tolist() == pytest.approx([0.01, -0.01, 0.0, 0.0])
    assert not SoftmaxTopKRouter(SoftmaxTopKConfig(), 8, E, 2).needs_step_counts  # no bias, no per-step counts


def manifest_of(recipe: str, *overrides: str) -> dict:
    layout = Layout(world_size=1, ep_size=1, zero_stage=0, bf16=False, num_experts=8, num_moe_layers=4)
    return {"format": FORMAT_VERSION, "config": to_dict(load_config(recipe, list(overrides))), "layout": asdict(layout)}


def test_resume_refuses_a_changed_router_shape_key_and_names_it(tmp_path):
    """grmoe declares its shape keys (`GrMoEConfig.shape_keys`): a changed subspace_dim is refused by name."""
    saved = manifest_of("recipes/quickstart_grmoe.yaml", "model.moe.router.subspace_dim=4")
    now = to_dict(load_config("recipes/quickstart_grmoe.yaml", ["model.moe.router.subspace_dim=2"]))
    layout = Layout(**saved["layout"])
    with pytest.raises(CheckpointError, match="model.moe.router.subspace_dim=4 in the checkpoint, 2 now"):
        check_compatible(tmp_path, saved, now, layout, weights_only=False)
    same = to_dict(load_config("recipes/quickstart_grmoe.yaml", ["model.moe.router.subspace_dim=4",
                                                                 "model.moe.router.alpha=2.0"]))
    assert check_compatible(tmp_path, saved, same, layout, weights_only=False)  # alpha is no shape: a warning


def test_alpha_is_an_inverse_temperature_and_threshold_dispatch_follows_it():
    torch.manual_seed(0)
    router = SoftmaxTopKRouter(SoftmaxTopKConfig(init_std=1.0), 8, E, 2).eval()
    x_TD = torch.randn(T, 8)
    logits_TE = x_TD @ router.proj.weight.t()
    router.set_eval_threshold(0.8, max_experts=E)
    active = []
    with torch.no_grad():
        for alpha in (0.1, 1.0, 10.0):
            router.set_alpha(alpha)
            out = router(x_TD)
            torch.testing.assert_close(out.probs_TE, (alpha * logits_TE).softmax(-1))
            active.append((out.expert_ids_TK >= 0).sum(-1).float().mean().item())
    assert active[0] > active[1] > active[2], active  # hotter: more experts reach the mass; colder: fewer
    router.set_eval_threshold(0.0)
    with torch.no_grad():
        assert torch.equal(router(x_TD).expert_ids_TK, router.train()(x_TD).expert_ids_TK)  # τ = 0: training's top-k
