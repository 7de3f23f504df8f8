"""The `mpi` router: power-then-retract math against torch.linalg.svd, gradient coupling to the experts' W1, the
ablation switches, fp32 routing under bf16, the real DeepSpeed MoE layer, and ep_size=2 == ep_size=1 on 2 processes.

Shape suffixes: T tokens, D model width, E experts, L local experts, F expert hidden width, K slots per token.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from moe_lm.config import load_config
from moe_lm.config.schema import ConfigError, MoEConfig
from moe_lm.model.transformer import count_parameters
from moe_lm.moe import MoEFeedForward
from moe_lm.routers import REGISTRY, Diagnostics, build_router
from moe_lm.routers.alignment import (alignment_specificity, direction_alignment, principal_right_singular,
                                     rayleigh_ratio, router_alignment)
from moe_lm.routers.mpi import MPIConfig, MPIRouter, manifold_power_iteration, power_retract_step
from moe_lm.routers.softmax_topk import SoftmaxTopKConfig, SoftmaxTopKRouter
from tests.distributed_utils import run_distributed

D, F_, E, K, T = 16, 24, 4, 2, 32
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def make_w1(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed random W1 stack [E, F, D]."""
    return torch.randn(E, F_, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_router(seed: int = 0, **cfg) -> MPIRouter:
    torch.manual_seed(seed)
    return MPIRouter(MPIConfig(**cfg), D, E, K)


def make_tokens(seed: int = 1) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def top_right_singular_f64(w1_EFD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, s, vh = torch.linalg.svd(w1_EFD.double(), full_matrices=False)
    return s, vh[:, 0, :]


def router_only_loss(out, c_TE: torch.Tensor) -> torch.Tensor:
    """A loss on the router output alone: combine weights, full probs and the load-balancing loss."""
    chosen_TK = c_TE.gather(-1, out.expert_ids_TK)
    return ((out.weights_TK * chosen_TK).sum(-1).mean() + (out.probs_TE * c_TE).sum(-1).mean()
            + out.aux_losses["load_balance"] + 0.1 * out.aux_losses["z_loss"])


# ---- the math (moe_lm/routers/mpi.py, moe_lm/routers/alignment.py) ---------------------------------------------


def test_power_iteration_converges_to_top_right_singular_vector():
    w1 = make_w1().double()
    rows = torch.randn(E, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    phi = manifold_power_iteration(rows, w1, steps=400)
    _, v1 = top_right_singular_f64(w1)
    sign = torch.sign((phi * v1).sum(-1, keepdim=True))  # ±v₁ are both fixed points
    assert_close(phi, sign * v1, atol=1e-8, rtol=0)


def test_one_power_step_contracts_the_angle_to_v1_by_sigma2_over_sigma1_squared():
    w1 = make_w1(1).double()
    rows = torch.randn(E, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s, v1 = top_right_singular_f64(w1)

    def tan_to_v1(x):
        cos = direction_alignment(x, v1).double()
        return (1 - cos ** 2).sqrt() / cos

    assert (tan_to_v1(power_retract_step(rows, w1)) <= (s[:, 1] / s[:, 0]) ** 2 * tan_to_v1(rows) + 1e-12).all()


def test_one_power_step_from_v1_returns_v1():
    w1 = make_w1()
    _, v1 = top_right_singular_f64(w1)
    assert_close(power_retract_step(v1.float(), w1), v1.float(), atol=1e-6, rtol=0)  # G v₁ = σ₁² v₁: same sign


def test_power_step_gives_unit_rows_invariant_to_the_scale_of_r_and_w1():
    w1, rows = make_w1(), torch.randn(E, D)
    phi = power_retract_step(rows, w1)
    assert_close(phi.norm(dim=-1), torch.ones(E))
    assert_close(power_retract_step(7.0 * rows, 0.1 * w1), phi)


def test_power_step_never_forms_a_gram_matrix():
    # two matvecs per expert: the saved activations are [E, F] and [E, D], never [E, D, D]
    w1, rows = make_w1().requires_grad_(), torch.randn(E, D, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        power_retract_step(rows, w1)
    assert (E, D, D) not in shapes and all(math.prod(s) <= E * F_ * D for s in shapes)


def test_alignment_and_rayleigh_ratio_are_one_at_v1_and_below_one_elsewhere():
    w1 = make_w1()
    sigma, v1 = principal_right_singular(w1)
    sigma1 = sigma[:, 0]
    s, v1_64 = top_right_singular_f64(w1)
    assert_close(sigma, s.float())
    assert_close(router_alignment(-3.0 * v1_64.float(), w1), torch.ones(E))  # sign and scale do not matter
    assert_close(rayleigh_ratio(v1, w1), torch.ones(E))
    assert_close(rayleigh_ratio(v1, w1, sigma1), torch.ones(E))
    rows = torch.randn(E, D, generator=torch.Generator().manual_seed(5))
    ratio = rayleigh_ratio(rows, w1)
    assert ((ratio <= 1) & (ratio >= s[:, -1].float() / s[:, 0].float() - 1e-6)).all()
    assert (router_alignment(rows, w1) < 1).all()


# ---- the router -------------------------------------------------------------------------------------------------


def test_registered_with_an_fp32_rows_parameter_not_named_expert():
    assert REGISTRY["mpi"] == (MPIConfig, MPIRouter)
    router = build_router(MPIConfig(), D, E, K)
    params = dict(router.named_parameters())
    assert list(params) == ["rows"] and params["rows"].dtype == torch.float32 and params["rows"].shape == (E, D)
    assert not any("expert" in name for name in params)
    assert router.needs_expert_w1


def test_forward_is_softmax_topk_renormalised_over_logits_r_x_phi():
    router, w1, x = make_router(), make_w1(), make_tokens()
    phi = power_retract_step(router.rows.detach(), w1)
    logits = E ** -0.5 * x @ phi.t()  # logit_scale 0 means R = E^(-1/2)
    out = router(x, expert_w1_EFD=w1)
    assert_close(router.logits(x, w1), logits)
    assert_close(out.probs_TE, logits.softmax(-1))
    top = logits.softmax(-1).topk(K, dim=-1)
    assert torch.equal(out.expert_ids_TK, top.indices)
    assert_close(out.weights_TK, top.values / top.values.sum(-1, keepdim=True))
    assert out.probs_TE.dtype == out.weights_TK.dtype == torch.float32 and out.expert_ids_TK.dtype == torch.int64
    raw = make_router(renormalize=False)(x, expert_w1_EFD=w1)
    assert_close(raw.weights_TK, top.values)
    assert_close(make_router(logit_scale=2.0).logits(x, w1), 2.0 * x @ phi.t())


def test_forward_is_invariant_to_the_norm_of_the_rows():
    router, w1, x = make_router(), make_w1(), make_tokens()
    before = router(x, expert_w1_EFD=w1).probs_TE
    with torch.no_grad():
        router.rows.mul_(torch.tensor([[0.01], [3.0], [1.0], [50.0]]))
    assert_close(router(x, expert_w1_EFD=w1).probs_TE, before)


def test_aux_losses_only_in_training_with_grad():
    router, w1, x = make_router(), make_w1(), make_tokens()
    assert set(router.train()(x, expert_w1_EFD=w1).aux_losses) == {"load_balance", "z_loss"}
    assert router.eval()(x, expert_w1_EFD=w1).aux_losses == {}
    with torch.no_grad():
        assert router.train()(x, expert_w1_EFD=w1).aux_losses == {}
    assert router.loss_coefs == {"load_balance": 0.01, "z_loss": 0.0}


def test_router_output_alone_sends_gradients_into_w1_and_rows():
    router, x, c = make_router().train(), make_tokens(), torch.randn(T, E)
    w1 = make_w1().requires_grad_()
    router_only_loss(router(x, expert_w1_EFD=w1), c).backward()
    assert w1.grad is not None and w1.grad.abs().sum() > 0
    assert (w1.grad.flatten(1).abs().sum(-1) > 0).all()  # every expert, not just the chosen ones
    assert router.rows.grad.abs().sum() > 0


def test_detach_w1_stops_the_router_gradient_into_w1_but_not_the_forward():
    x, c = make_tokens(), torch.randn(T, E)
    w1 = make_w1().requires_grad_()
    coupled = make_router().train()(x, expert_w1_EFD=w1)
    router = make_router(detach_w1=True).train()
    detached = router(x, expert_w1_EFD=w1)
    assert_close(detached.probs_TE, coupled.probs_TE)
    router_only_loss(detached, c).backward()
    assert w1.grad is None or not w1.grad.any()
    assert router.rows.grad.abs().sum() > 0


def test_power_false_ablation_routes_with_normalised_rows_and_ignores_w1():
    router, x = make_router(power=False), make_tokens()
    assert not router.needs_expert_w1  # the gate does not even stack W1
    phi = F.normalize(router.rows.detach(), dim=-1)
    assert_close(router.directions(None), phi)
    assert_close(router.logits(x, None), E ** -0.5 * x @ phi.t())
    assert_close(router(x).probs_TE, router(x, expert_w1_EFD=make_w1()).probs_TE)


def test_power_steps_apply_the_power_retract_step_n_times():
    router, w1 = make_router(power_steps=3), make_w1()
    rows = router.rows.detach()
    expected = power_retract_step(power_retract_step(power_retract_step(rows, w1), w1), w1)
    assert_close(router.directions(w1), expected)
    assert not torch.allclose(make_router().directions(w1), expected)


def test_a_partial_w1_stack_without_an_ep_group_is_an_error():
    with pytest.raises(RuntimeError, match="router.ep_group must be set"):
        make_router()(make_tokens(), expert_w1_EFD=make_w1()[: E // 2])
    with pytest.raises(ValueError, match="needs the local experts' W1"):
        make_router()(make_tokens())


def test_routing_math_stays_fp32_under_bf16_autocast():
    router, w1, x = make_router(), make_w1(), make_tokens()
    reference = router(x, expert_w1_EFD=w1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.logits(x, w1)
        out = router(x, expert_w1_EFD=w1)
    assert logits.dtype == out.probs_TE.dtype == out.weights_TK.dtype == torch.float32
    # fp32 tolerances: bf16 matmuls would be off by ~1e-2
    assert_close(out.probs_TE, reference.probs_TE)
    assert torch.equal(out.expert_ids_TK, reference.expert_ids_TK)


def test_bf16_weights_route_and_backpropagate_like_their_fp32_values():
    # DeepSpeed bf16 casts the whole module: rows, W1 and activations arrive in bf16; the math still runs in fp32
    x, c = make_tokens().bfloat16(), torch.randn(T, E)
    w1 = make_w1().bfloat16().requires_grad_()
    router = make_router().bfloat16().train()
    out = router(x, expert_w1_EFD=w1)
    router_only_loss(out, c).backward()

    ref_router = make_router().train()
    with torch.no_grad():
        ref_router.rows.copy_(router.rows.float())
    ref_w1 = w1.detach().float().requires_grad_()
    ref = ref_router(x.float(), expert_w1_EFD=ref_w1)
    router_only_loss(ref, c).backward()
    assert out.probs_TE.dtype == torch.float32
    assert_close(out.probs_TE, ref.probs_TE)
    # the gradients are stored in the parameters' bf16: compare at bf16 resolution
    assert_close(w1.grad.float(), ref_w1.grad, rtol=1e-2, atol=1e-4)
    assert_close(router.rows.grad.float(), ref_router.rows.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("key, value", [("power_steps", 0), ("logit_scale", -1.0), ("load_balance_coef", -0.1),
                                        ("z_loss_coef", -1e-3), ("init_std", -0.02)])
def test_invalid_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model.moe.router.{key}"):
        dataclasses.replace(MPIConfig(), **{key: value}).validate(MoEConfig())


def test_power_false_warns_that_power_options_are_ignored():
    with pytest.warns(UserWarning, match="power_steps and detach_w1 are ignored"):
        MPIConfig(power=False, power_steps=3).validate(MoEConfig())


def test_init_std_zero_means_inverse_sqrt_d():
    assert make_router(init_std=0.0).rows.std().item() == pytest.approx(D ** -0.5, rel=0.3)
    assert make_router(init_std=1.0).rows.std().item() == pytest.approx(1.0, rel=0.3)


def test_recipes_load_as_mpi_with_the_base_models():
    quick = load_config(RECIPES / "quickstart_mpi.yaml")
    assert isinstance(quick.model.moe.router, MPIConfig) and quick.run.name == "quickstart_mpi"
    assert quick.model == dataclasses.replace(load_config(RECIPES / "quickstart.yaml").model, moe=quick.model.moe)
    for name, experts in [("350m_e8_mpi", 8), ("1.3b_e16_mpi", 16), ("2.7b_e32_mpi", 32)]:
        cfg = load_config(RECIPES / f"{name}.yaml")
        assert isinstance(cfg.model.moe.router, MPIConfig), name
        assert cfg.run.name == name and cfg.model.moe.num_experts == experts
    ablation = load_config(RECIPES / "quickstart_mpi.yaml", ["model.moe.router.power=false"])
    assert ablation.model.moe.router.power is False
    counts = count_parameters(quick.model)  # builds on the meta device
    assert counts.total > 0


# ---- diagnostics ------------------------------------------------------------------------------------------------


def test_diagnostics_report_alignment_and_rayleigh_per_expert_and_mean():
    router, w1 = make_router(), make_w1()
    diag = router.diagnostics(w1)
    per_expert = {f"mpi/{m}" for m in ("alignment", "rayleigh", "row_alignment", "row_rayleigh", "sigma2_over_sigma1")}
    assert set(diag.per_expert) == per_expert
    assert set(diag.scalars) == {"mpi/specificity", "mpi/row_specificity", "mpi/phi_pairwise_cos_mean",
                                 "mpi/phi_pairwise_cos_max"}
    assert all(values.shape == (E,) and 0 <= values.min() and values.max() <= 1 + 1e-6
               for values in diag.per_expert.values())
    v1 = principal_right_singular(w1)[1]
    assert diag.scalars["mpi/specificity"] == pytest.approx(
        alignment_specificity(router.directions(w1), v1).item(), abs=1e-6)
    sigma = torch.linalg.svdvals(w1)
    summary = diag.summary()
    assert summary["mpi/sigma2_over_sigma1_mean"] == pytest.approx((sigma[:, 1] / sigma[:, 0]).mean().item(), abs=1e-6)
    assert summary["mpi/row_rayleigh_mean"] == pytest.approx(rayleigh_ratio(router.rows, w1).mean().item(), abs=1e-6)
    phi = router.directions(w1)
    assert_close(diag.per_expert["mpi/alignment"], router_alignment(phi, w1), atol=1e-6, rtol=0)
    assert summary["mpi/alignment_mean"] == pytest.approx(router_alignment(phi, w1).mean().item(), abs=1e-6)
    assert summary["mpi/row_alignment_mean"] == pytest.approx(router_alignment(router.rows, w1).mean().item(), abs=1e-6)
    assert router.diagnostics(None) == Diagnostics()


def test_diagnostics_read_one_at_the_fixed_point():
    router, w1 = make_router(), make_w1()
    with torch.no_grad():
        router.rows.copy_(principal_right_singular(w1)[1])
    diag = router.diagnostics(w1).summary()
    assert diag["mpi/alignment_mean"] == pytest.approx(1.0, abs=1e-5)
    assert diag["mpi/rayleigh_mean"] == pytest.approx(1.0, abs=1e-5)
    assert diag["mpi/row_alignment_mean"] == pytest.approx(1.0, abs=1e-5)


def test_one_power_step_aligns_better_than_the_rows_it_starts_from():
    # averaged over many random rows: the power step weights direction i by σ_i², pulling towards v₁
    torch.manual_seed(0)
    router, w1 = MPIRouter(MPIConfig(), D, 64, K), torch.randn(64, F_, D)
    diag = router.diagnostics(w1).summary()
    assert diag["mpi/alignment_mean"] > diag["mpi/row_alignment_mean"] + 0.1


def test_softmax_topk_diagnostics_measure_its_rows_against_v1():
    router = SoftmaxTopKRouter(SoftmaxTopKConfig(), D, E, K)
    w1 = make_w1()
    diag = router.diagnostics(w1)
    assert set(diag.scalars) == {"softmax_topk/specificity"} and set(diag.per_expert) == {"softmax_topk/alignment"}
    assert_close(diag.per_expert["softmax_topk/alignment"], router_alignment(router.proj.weight, w1))
    with torch.no_grad():
        router.proj.weight.copy_(principal_right_singular(w1)[1])
    assert router.diagnostics(w1).summary()["softmax_topk/alignment_mean"] == pytest.approx(1.0, abs=1e-5)
    assert router.diagnostics(None) == Diagnostics()


# ---- inside DeepSpeed's MoE layer -------------------------------------------------------------------------------


def make_moe_layer(ep_size: int = 1, ep_rank: int = 0, **router_cfg) -> MoEFeedForward:
    moe_cfg = MoEConfig(num_experts=E, top_k=K, drop_tokens=False, router=MPIConfig(**router_cfg))
    router = make_router(**router_cfg)
    return MoEFeedForward(D, F_, moe_cfg, router, ep_size, ep_rank, init_std=D ** -0.5, out_init_std=0.1, seed=0,
                          layer_idx=0)


def test_mpi_in_deepspeed_moe_layer_sends_gradients_to_rows_and_expert_w1():
    layer = make_moe_layer().train()
    x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(2))
    y, l_aux = layer(x)
    assert y.shape == x.shape and l_aux.item() > 0
    y.square().mean().backward()
    assert layer.router.rows.grad.abs().sum() > 0
    # the aux loss alone reaches W1 only through the router's φ
    layer.zero_grad(set_to_none=True)
    layer(x)[1].backward()
    assert all(expert.w1.weight.grad.abs().sum() > 0 for expert in layer.local_experts)
    assert all(expert.w3.weight.grad is None for expert in layer.local_experts)

    detached = make_moe_layer(detach_w1=True).train()
    detached(x)[1].backward()
    assert all(expert.w1.weight.grad is None for expert in detached.local_experts)
    assert detached.router.rows.grad.abs().sum() > 0


# ---- expert parallelism: ep_size=2 on 2 processes equals ep_size=1 ---------------------------------------------
# Gradient convention (moe_lm.routers.functional.all_reduce_sum, DeepSpeed's engine): each rank backpropagates the
# loss of its own tokens; non-expert gradients (rows) are averaged over the data-parallel ranks, expert gradients
# are summed over the expert-data-parallel group and divided by the data-parallel world size. The single-process
# reference is the same loss averaged over both ranks' tokens. References are computed in the test process (no
# process group: nothing is reduced) and handed to the workers.


def _ep_router_worker(rank: int, world_size: int, x_TD, c_TE, w1_EFD, rows_ED, expected) -> None:
    router = make_router().train()
    with torch.no_grad():
        router.rows.copy_(rows_ED)
    router.ep_group = dist.new_group(list(range(world_size)))
    num_local, num_tokens = E // world_size, T // world_size
    experts, tokens = slice(rank * num_local, (rank + 1) * num_local), slice(rank * num_tokens, (rank + 1) * num_tokens)
    assert router.local_expert_offset == rank * num_local
    w1_LFD = w1_EFD[experts].clone().requires_grad_()

    assert_close(router.logits(x_TD[tokens], w1_LFD), expected["logits"][tokens])
    out = router(x_TD[tokens], expert_w1_EFD=w1_LFD)
    assert_close(out.probs_TE, expected["probs"][tokens])
    assert torch.equal(out.expert_ids_TK, expected["ids"][tokens])
    assert_close(out.aux_losses["load_balance"], expected["load_balance"])
    router_only_loss(out, c_TE[tokens]).backward()

    rows_grad = router.rows.grad.clone()
    dist.all_reduce(rows_grad)  # data-parallel average of a replicated parameter
    assert_close(rows_grad / world_size, expected["rows_grad"])
    assert_close(w1_LFD.grad / world_size, expected["w1_grad"][experts])
    diag = router.diagnostics(w1_LFD.detach())  # collective: every expert's values on every rank
    assert diag.summary() == pytest.approx(expected["diagnostics"].summary(), abs=1e-5)
    assert diag.expert_values() == pytest.approx(expected["diagnostics"].expert_values(), abs=1e-5)


def _ep_layer_worker(rank: int, world_size: int, x_BSD, c_BSD, rows_ED, expected) -> None:
    layer = make_moe_layer(ep_size=world_size, ep_rank=rank).train()
    with torch.no_grad():
        layer.router.rows.copy_(rows_ED)
    layer.set_deepspeed_parallelism()  # what deepspeed.initialize does: EP groups, then gate._set_ep_group
    assert layer.router.ep_group is not None and dist.get_world_size(layer.router.ep_group) == world_size
    batch = slice(rank * x_BSD.shape[0] // world_size, (rank + 1) * x_BSD.shape[0] // world_size)
    y, l_aux = layer(x_BSD[batch])
    assert_close(y, expected["y"][batch])
    assert_close(l_aux, expected["l_aux"])
    ((y * c_BSD[batch]).mean() + l_aux).backward()
    rows_grad = layer.router.rows.grad.clone()
    dist.all_reduce(rows_grad)
    assert_close(rows_grad / world_size, expected["rows_grad"])
    for local, global_id in enumerate(layer.global_expert_ids):
        for name in ("w1", "w2", "w3"):
            grad = getattr(layer.local_experts[local], name).weight.grad
            assert_close(grad / world_size, expected[f"{name}_grad"][global_id], msg=f"expert {global_id} {name}")


def _ep_worker(rank: int, world_size: int, router_args: tuple, layer_args: tuple) -> None:
    _ep_router_worker(rank, world_size, *router_args)
    _ep_layer_worker(rank, world_size, *layer_args)


def router_reference() -> tuple:
    x, c, w1 = make_tokens(), torch.randn(T, E, generator=torch.Generator().manual_seed(7)), make_w1()
    router = make_router().train()
    ref_w1 = w1.clone().requires_grad_()
    out = router(x, expert_w1_EFD=ref_w1)
    router_only_loss(out, c).backward()
    expected = {"logits": router.logits(x, w1).detach(), "probs": out.probs_TE.detach(), "ids": out.expert_ids_TK,
                "load_balance": out.aux_losses["load_balance"].detach(), "rows_grad": router.rows.grad,
                "w1_grad": ref_w1.grad, "diagnostics": router.diagnostics(w1)}
    return x, c, w1, router.rows.detach(), expected


def layer_reference() -> tuple:
    layer = make_moe_layer().train()
    x = torch.randn(4, T // 4, D, generator=torch.Generator().manual_seed(8))
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    y, l_aux = layer(x)
    ((y * c).mean() + l_aux).backward()
    expected = {"y": y.detach(), "l_aux": l_aux.detach(), "rows_grad": layer.router.rows.grad}
    for name in ("w1", "w2", "w3"):
        expected[f"{name}_grad"] = torch.stack([getattr(e, name).weight.grad for e in layer.local_experts])
    return x, c, layer.router.rows.detach(), expected


def test_ep2_on_two_processes_gives_the_logits_and_gradients_of_ep1():
    """Router alone (each rank holds half of the W1 stack, φ all-gathered over the EP group) and the router inside
    DeepSpeed's MoE layer with ep_size=2 (EP group set by DeepSpeed), against ep_size=1. One spawn for both: a
    worker process spends most of its ~10 s importing torch and DeepSpeed."""
    run_distributed(_ep_worker, 2, router_reference(), layer_reference())


def test_specificity_separates_own_expert_alignment_from_a_shared_direction():
    v1_ED = torch.eye(4, 16)  # mutually orthogonal top singular vectors
    assert alignment_specificity(v1_ED, v1_ED).item() == pytest.approx(1.0)
    shared = torch.nn.functional.normalize(torch.ones(4, 16), dim=-1)
    # every row and every v₁ along one common direction: perfect alignment, no specificity
    assert direction_alignment(shared, shared).mean().item() == pytest.approx(1.0)
    assert alignment_specificity(shared, shared).item() == pytest.approx(0.0, abs=1e-6)



# ---- options faithful to the authors' code (issue 12) -------------------------------------------------------------

def test_sequence_balance_loss_asks_each_sequence_to_be_balanced_not_only_the_batch():
    from moe_lm.routers.functional import sequence_load_balancing_loss, switch_load_balancing_loss

    seq = 8
    ids_TK = torch.arange(E).repeat_interleave(seq)[:, None]  # sequence b sends every token to expert b
    probs_TE = F.one_hot(ids_TK[:, 0], E).float()
    assert switch_load_balancing_loss(probs_TE, ids_TK).item() == pytest.approx(1.0)  # the batch is balanced
    assert sequence_load_balancing_loss(probs_TE, ids_TK, seq).item() == pytest.approx(E)  # no sequence is
    uniform_ids_TK = torch.arange(E * seq)[:, None] % E
    assert sequence_load_balancing_loss(torch.full((E * seq, E), 1 / E), uniform_ids_TK, seq).item() == \
        pytest.approx(1.0)
    with pytest.raises(ValueError, match="whole sequences"):
        sequence_load_balancing_loss(probs_TE, ids_TK, 7)


def test_balance_scope_sequence_is_the_load_balance_loss_of_the_router():
    from moe_lm.routers.functional import sequence_load_balancing_loss

    router = make_router(balance_scope="sequence")
    x_TD, w1 = make_tokens(), make_w1()
    out = router(x_TD, expert_w1_EFD=w1, sequence_length=8)
    torch.testing.assert_close(out.aux_losses["load_balance"],
                               sequence_load_balancing_loss(out.probs_TE, out.expert_ids_TK, 8))
    with pytest.raises(ValueError, match="sequence_length"):
        router(x_TD, expert_w1_EFD=w1)
    with pytest.raises(ConfigError, match="model.moe.router.balance_scope"):
        MPIConfig(balance_scope="token").validate(MoEConfig(num_experts=E, top_k=K))


def test_pairwise_cosine_tells_expert_specific_directions_from_a_shared_one():
    from moe_lm.routers.alignment import pairwise_cosine

    orthogonal_ED = torch.eye(E, D)
    assert [v.item() for v in pairwise_cosine(orthogonal_ED)] == pytest.approx([0.0, 0.0], abs=1e-6)
    shared_ED = torch.randn(1, D).repeat(E, 1) * torch.tensor([1.0, -2.0, 3.0, 0.5])[:, None]  # signs do not matter
    assert [v.item() for v in pairwise_cosine(shared_ED)] == pytest.approx([1.0, 1.0], abs=1e-6)
    router = make_router()
    diagnostics = router.diagnostics(make_w1())
    phi_mean, phi_max = pairwise_cosine(router.directions(make_w1()))
    assert diagnostics.scalars["mpi/phi_pairwise_cos_mean"] == pytest.approx(phi_mean.item())
    assert diagnostics.scalars["mpi/phi_pairwise_cos_max"] == pytest.approx(phi_max.item())


def test_the_code_faithful_recipe_names_each_option():
    cfg = load_config(RECIPES / "quickstart_mpi_code.yaml")
    assert cfg.model.moe.router.name == "mpi"
    assert cfg.model.moe.router.balance_scope == "sequence"
    assert cfg.model.moe.router.logit_scale == 0.125
    assert cfg.model.moe.aux_loss_reduction == "mean"
