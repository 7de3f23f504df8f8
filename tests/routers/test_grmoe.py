"""GrMoE router: the exact Bingham normaliser, the derived bounds T1/C1/T2, the α/τ knobs, the orthonormal frames,
gradient flow, and the router inside DeepSpeed's MoE layer with ep_size 1 and 2 (two gloo processes).

Shape suffixes: T tokens, D model width, M routing dimension, P subspace dimension, E experts, K slots.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import mpmath
import numpy as np
import pytest
import scipy.special
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from moe_lm.config import load_config
from moe_lm.config.schema import ConfigError, MoEConfig
from moe_lm.model.transformer import MoETransformer  # noqa: F401  (import order: moe_lm.model before moe_lm.moe avoids a cycle)
from moe_lm.moe import MoEFeedForward
from moe_lm.routers import REGISTRY, build_router
from moe_lm.routers.functional import entropy, mass_threshold_routing
from moe_lm.routers.grmoe import GrMoEConfig, GrMoERouter
from moe_lm.routers.grmoe_math import (bingham_log_likelihood, entropy_lower_bound, gumbel_topk_routing,
                                       kummer_series_terms, log_kummer, min_expert_probability,
                                       mixture_negative_log_likelihood, orthonormal_frames, subspace_affinity,
                                       topk_mass_bounds, topk_mass_min_gap)

D, E, K, T = 32, 4, 2, 64  # D = E·p for the auto p = 8: the auto m = min(E·p, D) tiles R^D
REPO = Path(__file__).resolve().parents[2]
BINGHAM_SHAPES = [(8, 64), (4, 64), (2, 64), (1, 4), (2, 8)]  # (p, m): the three scales of §1.10 and tiny ones


def make_router(seed: int = 0, **overrides) -> GrMoERouter:
    torch.manual_seed(seed)
    return GrMoERouter(GrMoEConfig(**overrides), D, E, K)


def heterogeneous_concentrations(router: GrMoERouter, low: float = 2.0, high: float = 12.0) -> None:
    """Spread the κ_e as a trained router would have them (the abstract reports heterogeneous concentrations)."""
    with torch.no_grad():
        kappa_E = torch.linspace(low, high, router.num_experts)
        router.rho_E.copy_(kappa_E + torch.log(-torch.expm1(-kappa_E)))


def tokens(seed: int = 1, num_tokens: int = T) -> torch.Tensor:
    return torch.randn(num_tokens, D, generator=torch.Generator().manual_seed(seed))


# ---- the Kummer normaliser -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("p,m", BINGHAM_SHAPES)
def test_log_kummer_matches_scipy_hyp1f1_and_mpmath_past_overflow(p, m):
    kappa_cap = GrMoEConfig().kappa_cap  # the router's default bound, up to and including the bound itself
    kappa = torch.linspace(0, kappa_cap, 81, dtype=torch.float64)
    expected = np.log(scipy.special.hyp1f1(p / 2, m / 2, kappa.numpy()))
    np.testing.assert_allclose(log_kummer(p / 2, m / 2, kappa, kappa_cap).numpy(), expected, rtol=1e-9, atol=1e-10)
    # hyp1f1 overflows float64 near κ ≈ 710: compare with arbitrary-precision mpmath there
    large = torch.tensor([500.0, 1000.0, 2000.0], dtype=torch.float64)
    reference = [float(mpmath.log(mpmath.hyp1f1(p / 2, m / 2, float(z)))) for z in large]
    np.testing.assert_allclose(log_kummer(p / 2, m / 2, large, 2000.0).numpy(), reference, rtol=1e-12)


@pytest.mark.parametrize("p,m", BINGHAM_SHAPES)
def test_log_kummer_lies_within_jensen_bounds(p, m):
    kappa = torch.cat([torch.linspace(0, 200, 201, dtype=torch.float64), torch.rand(50, dtype=torch.float64) * 1e3])
    log_norm = log_kummer(p / 2, m / 2, kappa, 1000.0)
    assert torch.all(kappa * p / m <= log_norm + 1e-12) and torch.all(log_norm <= kappa + 1e-12)


def test_log_kummer_keeps_the_input_dtype_and_shape():
    kappa_TE = torch.rand(3, 5) * 20
    out = log_kummer(2.0, 16.0, kappa_TE, 20.0)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    torch.testing.assert_close(out.double(), log_kummer(2.0, 16.0, kappa_TE.double(), 20.0), rtol=1e-6, atol=1e-6)


def test_log_kummer_series_length_comes_from_the_bound_and_arguments_are_clamped_into_it():
    # z + 10·sqrt(z) + 60 terms at z = z_max, whatever the data (no host read of max z)
    assert [kummer_series_terms(z) for z in (0.0, 100.0, 200.0, 1000.0)] == [60, 260, 401, 1376]
    with pytest.raises(ValueError, match="z_max"):
        kummer_series_terms(-1.0)
    # outside [0, z_max] the argument is clamped (no check that would sync), with a zero derivative there
    z = torch.tensor([-1.0, 0.0, 5.0, 10.0, 12.0], dtype=torch.float64, requires_grad=True)
    out = log_kummer(1.0, 4.0, z, 10.0)
    torch.testing.assert_close(out[[0, 4]], out[[1, 3]].detach())
    assert out[0].item() == 0.0  # log M(a, b, 0) = 0
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert grad[0] == 0 and grad[4] == 0 and torch.all(grad[1:4] > 0)


@pytest.mark.parametrize("p,m", [(8, 64), (2, 64), (2, 8)])
def test_log_kummer_gradient_matches_finite_differences_and_the_tilted_mean_affinity(p, m):
    kappa = torch.tensor([0.1, 1.0, 7.0, 40.0, 150.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: log_kummer(p / 2, m / 2, z, 200.0), (kappa,))
    assert torch.autograd.gradgradcheck(lambda z: log_kummer(p / 2, m / 2, z, 200.0), (kappa,))
    (grad,) = torch.autograd.grad(log_kummer(p / 2, m / 2, kappa, 200.0).sum(), kappa)
    # d/dκ log E[e^{κB}] = E_κ[B] under the κ-tilted Beta(p/2, (m-p)/2), by quadrature (a second, independent route)
    a, b = mpmath.mpf(p) / 2, mpmath.mpf(m - p) / 2
    nodes = mpmath.linspace(0, 1, 21)  # for large κ the tilted density is a narrow peak near 1 - (b-1)/κ
    for z, g in zip(kappa.tolist(), grad.tolist()):
        def density(x, z=z):
            return x ** (a - 1) * (1 - x) ** (b - 1) * mpmath.exp(z * (x - 1))

        with mpmath.workdps(20):  # 15 digits lose ~1e-8 to cancellation in the κ = 40 and 150 integrals
            tilted_mean = mpmath.quad(lambda x: x * density(x), nodes) / mpmath.quad(density, nodes)
        assert g == pytest.approx(float(tilted_mean), rel=1e-9)
    # and at κ = 0 the derivative is E[B] = p/m under the uniform distribution (exact, not clamped away)
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (grad0,) = torch.autograd.grad(log_kummer(p / 2, m / 2, zero, 200.0).sum(), zero)
    assert grad0.item() == pytest.approx(p / m, rel=1e-12)


def test_float64_work_is_per_expert_unless_concentrations_are_per_token():
    """The Kummer series and the frames' QR run in float64 on [E] and [E, m, p]; only option B's normaliser, whose
    κ is per token, may run per token in float64."""
    num_tokens = 97  # no other dimension of the router has this size

    class Float64Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                    self.shapes.append(tuple(tensor.shape))
            return out

    for variational, per_token in [("none", False), ("logit", False), ("concentration", True)]:
        router = make_router(variational=variational, dispatch="sample")
        x_TD = tokens(num_tokens=num_tokens)
        with Float64Shapes() as mode:
            out = router(x_TD)
            (out.weights_TK.sum() + sum(out.aux_losses.values())).backward()
        assert mode.shapes, "the Kummer series runs in float64"
        assert any(num_tokens in shape for shape in mode.shapes) == per_token, (variational, mode.shapes)


# ---- geometry ------------------------------------------------------------------------------------------------------

def test_affinities_sum_to_one_under_orthogonal_tiling_at_init():
    router = make_router()
    assert router.routing_dim == E * router.subspace_dim  # auto m = E·p
    frames_EMP = router.frames()
    x_hat_TM = torch.nn.functional.normalize(torch.randn(T, router.routing_dim), dim=-1)
    torch.testing.assert_close(subspace_affinity(x_hat_TM, frames_EMP).sum(-1), torch.ones(T))
    gram_EPEP = torch.einsum("amp,bmq->apbq", frames_EMP, frames_EMP).reshape(E * router.subspace_dim, -1)
    torch.testing.assert_close(gram_EPEP, torch.eye(E * router.subspace_dim), atol=1e-5, rtol=0)


def test_cholesky_qr_frames_span_the_householder_qr_subspaces():
    basis_EMP = torch.randn(E, 32, 4, generator=torch.Generator().manual_seed(2)) * torch.tensor([1.0, 3.0, 0.3, 2.0])
    frames_EMP = orthonormal_frames(basis_EMP)
    householder_EMP = torch.linalg.qr(basis_EMP.double()).Q
    assert frames_EMP.dtype == torch.float32 and frames_EMP.shape == basis_EMP.shape
    torch.testing.assert_close(frames_EMP.transpose(1, 2) @ frames_EMP, torch.eye(4).expand(E, -1, -1),
                               atol=1e-6, rtol=0)
    # the same subspaces (projectors); only the column signs may differ from Householder QR
    torch.testing.assert_close((frames_EMP @ frames_EMP.transpose(1, 2)).double(),
                               householder_EMP @ householder_EMP.transpose(1, 2), atol=1e-6, rtol=0)


def synthetic_routing_task(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_TD, labels_T, bases_EDQ): E clusters, each on its own random 2-dim subspace of R^D (routers.md §1.10's
    synthetic task)."""
    gen = torch.Generator().manual_seed(seed)
    bases_EDQ = torch.linalg.qr(torch.randn(E, D, 2, generator=gen)).Q
    labels_T = torch.randint(0, E, (num_tokens,), generator=gen)
    x_TD = torch.einsum("tdq,tq->td", bases_EDQ[labels_T], torch.randn(num_tokens, 2, generator=gen))
    x_TD = x_TD + 0.05 * torch.randn(num_tokens, D, generator=gen)
    return x_TD, labels_T, bases_EDQ


def train_on_synthetic_task(router: GrMoERouter, steps: int) -> list[float]:
    """AdamW on the routing NLL of the cluster label plus the router's weighted aux losses (a real loss)."""
    optimizer = torch.optim.AdamW(router.parameters(), lr=0.05, weight_decay=0.1)
    x_TD, labels_T, _ = synthetic_routing_task(256, seed=3)
    history = []
    router.train()
    for _ in range(steps):
        out = router(x_TD)
        nll = -out.probs_TE.gather(-1, labels_T[:, None]).clamp_min(1e-9).log().mean()
        loss = nll + sum(router.loss_coefs[name] * value for name, value in out.aux_losses.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(nll.item())
    return history


def test_frames_stay_orthonormal_after_adamw_steps_on_a_real_loss():
    router = make_router(separation_coef=0.1)
    basis_before = router.frame_basis_EMP.detach().clone()
    history = train_on_synthetic_task(router, steps=25)
    assert history[-1] < 0.7 * history[0]  # it learned something, so the frames really moved
    assert (router.frame_basis_EMP.detach() - basis_before).abs().max() > 1e-2
    frames_EMP = router.frames().detach()
    eye_EPP = torch.eye(router.subspace_dim).expand(E, -1, -1)
    torch.testing.assert_close(frames_EMP.transpose(1, 2) @ frames_EMP, eye_EPP, atol=1e-5, rtol=0)


def test_concentrations_and_per_token_concentrations_are_clamped_to_kappa_cap():
    router = make_router(variational="concentration", kappa_cap=10.0)
    heterogeneous_concentrations(router)  # κ from 2 to 12: the last expert is past the cap
    kappa_E = router.concentrations()
    assert kappa_E.max().item() == 10.0 and kappa_E.min().item() == pytest.approx(2.0, rel=1e-5)
    with torch.no_grad():
        router.vi_net[2].bias[:E] = 3.0  # μ = 3: κ·e^μ from 40 to 200, all past the cap
    router.eval()  # δ = μ, no noise
    x_TD = tokens()
    mu_TE, _ = router._vi_net_outputs(x_TD)
    kappa_TE = (kappa_E * mu_TE.exp()).clamp(max=10.0)
    assert kappa_TE.max().item() == 10.0
    x_hat_TM = torch.nn.functional.normalize(router.proj(x_TD), dim=-1)
    affinity_TE = subspace_affinity(x_hat_TM, router.frames())
    expected_TE = bingham_log_likelihood(affinity_TE, kappa_TE, router.subspace_dim, router.routing_dim, 10.0)
    torch.testing.assert_close(router(x_TD).probs_TE, expected_TE.softmax(-1))


# ---- the α and τ knobs ---------------------------------------------------------------------------------------------

ALPHAS = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


@pytest.mark.parametrize("trained", [False, True], ids=["random_params", "trained_params"])
def test_routing_entropy_decreases_monotonically_in_alpha(trained):
    router = make_router()
    if trained:
        train_on_synthetic_task(router, steps=15)
    else:
        heterogeneous_concentrations(router)
    router.eval()
    x_TD = torch.cat([tokens(), synthetic_routing_task(64, seed=4)[0]])
    entropies = []
    with torch.no_grad():
        for alpha in ALPHAS:
            router.set_alpha(alpha)
            entropies.append(entropy(router(x_TD).probs_TE).mean().item())
    assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies
    assert entropies[0] > 0.9 * math.log(E)  # α → 0: near uniform


def test_threshold_dispatch_uses_fewer_experts_as_alpha_rises():
    router = make_router()
    heterogeneous_concentrations(router)
    router.eval()
    router.set_eval_threshold(0.8, max_experts=E)
    x_TD = tokens(num_tokens=256)
    active = []
    with torch.no_grad():
        for alpha in ALPHAS:
            router.set_alpha(alpha)
            out = router(x_TD)
            assert out.expert_ids_TK.shape == (256, E)
            active.append((out.expert_ids_TK >= 0).sum(-1).float().mean().item())
    assert all(a >= b for a, b in zip(active, active[1:])), active
    assert active[0] > 3.0 and active[-1] < 1.5, active


def test_mass_threshold_picks_the_smallest_set_reaching_tau():
    probs_TE = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    weights_TK, ids_TK = mass_threshold_routing(probs_TE, tau=0.75, max_experts=3, renormalize=False)
    assert ids_TK[0].tolist() == [0, 1, -1] and ids_TK[1].tolist() == [0, -1, -1]
    assert (ids_TK[2] >= 0).all()  # a uniform row needs all three experts (the cap) to reach 0.75
    torch.testing.assert_close(weights_TK[0], torch.tensor([0.5, 0.3, 0.0]))
    renormalised, _ = mass_threshold_routing(probs_TE, tau=0.75, max_experts=3, renormalize=True)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(3))


def test_eval_is_deterministic_top_k_while_sampled_training_dispatch_varies():
    router = make_router(dispatch="sample")
    x_TD = tokens()
    with torch.no_grad():
        draws = [router(x_TD).expert_ids_TK for _ in range(3)]
        assert not all(torch.equal(draws[0], d) for d in draws[1:])
        router.eval()
        out = router(x_TD)
        assert torch.equal(out.expert_ids_TK, out.probs_TE.topk(K, dim=-1).indices)
        assert torch.equal(router(x_TD).expert_ids_TK, out.expert_ids_TK)


def test_gumbel_top1_samples_experts_with_their_router_probabilities():
    probs_TE = torch.tensor([[0.55, 0.25, 0.15, 0.05]]).expand(40000, -1)
    _, ids_TK = gumbel_topk_routing(probs_TE, 1, renormalize=True, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(ids_TK[:, 0], minlength=4).float() / 40000
    torch.testing.assert_close(frequencies, probs_TE[0], atol=0.01, rtol=0)


def test_knob_setters_reject_out_of_range_values():
    router = make_router()
    with pytest.raises(ValueError):
        router.set_alpha(0.0)
    with pytest.raises(ValueError):
        router.set_eval_threshold(1.5)
    with pytest.raises(ValueError):
        router.set_eval_threshold(0.5, max_experts=E + 1)


# ---- the derived bounds of routers.md §1.6 -------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts,k", [(4, 1), (8, 2), (16, 2), (32, 4)])
def test_t1_c1_t2_bounds_hold_on_random_logits(num_experts, k):
    gen = torch.Generator().manual_seed(num_experts)
    scale_T1 = torch.logspace(-2, 1.5, 2000, dtype=torch.float64)[:, None]
    logits_TE = torch.randn(2000, num_experts, generator=gen, dtype=torch.float64) * scale_T1
    probs_TE = logits_TE.softmax(-1)
    gap_T = logits_TE.amax(-1) - logits_TE.amin(-1)
    slack = 1e-12
    # T1: log E >= H >= H_min = -log max g >= log(1 + (E-1) e^{-Δ})
    h_T, h_min_T = entropy(probs_TE), -probs_TE.amax(-1).log()
    assert torch.all(h_T <= math.log(num_experts) + slack) and torch.all(h_T >= h_min_T - slack)
    assert torch.all(h_min_T >= entropy_lower_bound(num_experts, gap_T) - slack)
    # C1: k/E <= top-k mass <= k e^Δ / (k e^Δ + E - k)
    mass_T = probs_TE.topk(k, -1).values.sum(-1)
    lower_T, upper_T = topk_mass_bounds(num_experts, k, gap_T)
    assert torch.all(mass_T >= lower_T - slack) and torch.all(mass_T <= upper_T + slack)
    # T2: every expert keeps probability >= 1 / (1 + (E-1) e^Δ)
    assert torch.all(probs_TE.amin(-1) >= min_expert_probability(num_experts, gap_T) - slack)
    # tightness: one logit Δ above E-1 equal others attains the T1 (min-entropy) and C1 (k = 1) bounds
    gap = torch.tensor(3.0, dtype=torch.float64)
    tight_E = torch.zeros(num_experts, dtype=torch.float64).index_fill(0, torch.tensor([0]), gap).softmax(-1)
    torch.testing.assert_close(-tight_E.max().log(), entropy_lower_bound(num_experts, gap))
    torch.testing.assert_close(tight_E.max(), topk_mass_bounds(num_experts, 1, gap)[1])


def test_c1_min_gap_reaches_the_target_top_k_mass():
    for num_experts, k, eps in [(8, 2, 0.1), (16, 2, 0.05), (32, 2, 0.05)]:
        gap = topk_mass_min_gap(num_experts, k, eps)
        assert topk_mass_bounds(num_experts, k, gap)[1].item() == pytest.approx(1 - eps)
    assert topk_mass_min_gap(8, 2, 0.1) == pytest.approx(3.296, abs=1e-3)  # the worked example of §1.6


def test_grmoe_logits_follow_the_formula_and_their_range_is_bounded_by_the_concentrations():
    # §1.6: Δ <= α·[max_e(κ_e − log M_e) + max_e log M_e] <= α·(2 − p/m)·κ_max; equal κ and tiling: Δ <= α·κ
    alpha = 2.5
    for spread in (True, False):
        router = make_router()
        if spread:
            heterogeneous_concentrations(router)
        router.eval()
        router.set_alpha(alpha)
        p, m = router.subspace_dim, router.routing_dim
        x_TD = tokens()
        frames_EMP, kappa_E = router.frames(), router.concentrations()
        x_hat_TM = torch.nn.functional.normalize(router.proj(x_TD), dim=-1)
        cap = router.kappa_cap
        logits_TE = alpha * bingham_log_likelihood(subspace_affinity(x_hat_TM, frames_EMP), kappa_E, p, m, cap)
        torch.testing.assert_close(router(x_TD).probs_TE, logits_TE.softmax(-1))
        log_norm_E = log_kummer(p / 2, m / 2, kappa_E, cap)
        general = alpha * ((kappa_E - log_norm_E).max() + log_norm_E.max())
        gap_T = logits_TE.amax(-1) - logits_TE.amin(-1)
        assert torch.all(gap_T <= general + 1e-5) and general <= alpha * (2 - p / m) * kappa_E.max() + 1e-5
        if not spread:  # a token inside expert 0's subspace attains α·κ
            inside_M = frames_EMP[0, :, 0:1].t()
            inside_E = alpha * bingham_log_likelihood(subspace_affinity(inside_M, frames_EMP), kappa_E, p, m, cap)[0]
            assert torch.all(gap_T <= alpha * kappa_E[0] + 1e-5)
            assert (inside_E.max() - inside_E.min()).item() == pytest.approx(alpha * kappa_E[0].item(), rel=1e-5)


# ---- gradients -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variational", ["none", "logit", "concentration"])
@pytest.mark.parametrize("source", ["lm_proxy", "aux"])
def test_gradients_reach_every_router_parameter(variational, source):
    router = make_router(variational=variational, dispatch="sample", load_balance_coef=0.01, separation_coef=1.0)
    with torch.no_grad():  # move off the tiling, where the separation penalty sits at its minimum (zero gradient)
        router.frame_basis_EMP.add_(0.1 * torch.randn_like(router.frame_basis_EMP))
    out = router(tokens())
    if source == "lm_proxy":  # a stand-in for the LM loss: it sees the router only through the combine weights
        loss = (out.weights_TK * torch.randn_like(out.weights_TK)).sum()
    else:
        loss = sum(router.loss_coefs[name] * value for name, value in out.aux_losses.items())
    loss.backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_aux_losses_are_unscaled_and_their_coefficients_come_from_the_config():
    router = make_router(variational="logit", load_balance_coef=0.02, kl_coef=0.5, balance_coef=0.3,
                         separation_coef=0.7, likelihood_coef=0.4)
    out = router(tokens())
    assert set(out.aux_losses) == {"balance", "separation", "likelihood", "kl", "load_balance"}
    assert router.loss_coefs == {"balance": 0.3, "separation": 0.7, "likelihood": 0.4, "kl": 0.5,
                                 "load_balance": 0.02}
    marginal_E = out.probs_TE.mean(0)
    torch.testing.assert_close(out.aux_losses["balance"], math.log(E) - entropy(marginal_E))
    # the NLL of the centred token lines under the uniform-weight mixture of the experts' Bingham distributions
    x_hat_TM = torch.nn.functional.normalize(tokens() @ router.proj.weight.T, dim=-1)
    x_hat_TM = torch.nn.functional.normalize(x_hat_TM - x_hat_TM.mean(0), dim=-1)
    scores_TE = bingham_log_likelihood(subspace_affinity(x_hat_TM, router.frames()), router.concentrations(),
                                       router.subspace_dim, router.routing_dim, router.kappa_cap)
    torch.testing.assert_close(out.aux_losses["likelihood"],
                               -(torch.logsumexp(scores_TE, -1) - math.log(E)).mean())
    # q starts at the prior up to the VI net's small (non-zero, so that gradients flow) output weights
    assert out.aux_losses["kl"].item() == pytest.approx(0.0, abs=1e-2)
    router.eval()
    assert router(tokens()).aux_losses == {}


def test_stats_and_diagnostics_report_concentrations_and_separation():
    router = make_router(variational="concentration")
    heterogeneous_concentrations(router)
    out = router(tokens())
    stats = out.stats
    assert set(stats) == {"kappa_mean", "kappa_min", "kappa_max", "kappa_std", "top_k_prob_mass", "separation",
                          "vi_sigma_mean"}
    assert stats["kappa_min"].item() == pytest.approx(2.0, rel=1e-5)
    assert stats["kappa_max"].item() == pytest.approx(12.0, rel=1e-5)
    assert stats["kappa_std"].item() == pytest.approx(router.concentrations().std(correction=0).item(), rel=1e-5)
    top_k_mass = out.probs_TE.sort(-1, descending=True).values[:, :K].sum(-1).mean()
    assert stats["top_k_prob_mass"].item() == pytest.approx(top_k_mass.item(), rel=1e-6)
    diagnostics = router.diagnostics(None)
    assert diagnostics.per_expert["grmoe/kappa"].tolist() == pytest.approx(torch.linspace(2, 12, E).tolist())
    assert diagnostics.scalars["grmoe/separation"] == pytest.approx(0.0, abs=1e-6)


# ---- config and recipes --------------------------------------------------------------------------------------------

def test_registered_and_parameter_names_never_contain_expert():
    assert REGISTRY["grmoe"] == (GrMoEConfig, GrMoERouter)
    router = build_router(GrMoEConfig(variational="concentration"), D, E, K)
    names = [name for name, _ in router.named_parameters()] + [name for name, _ in router.named_buffers()]
    assert names and not [name for name in names if "expert" in name]


@pytest.mark.parametrize("key,value", [("subspace_dim", -1), ("alpha", 0.0), ("dispatch", "greedy"),
                                       ("eval_threshold", 1.5), ("max_experts", E + 1), ("variational", "full"),
                                       ("prior_sigma", 0.0), ("kl_coef", -1.0), ("likelihood_coef", -1.0),
                                       ("routing_dim", 8),
                                       ("kappa_cap", 0.0), ("kappa_cap", math.inf),
                                       ("kappa_cap", 2.0)])  # 2 < auto κ₀ = log 19 ≈ 2.94 (E=4, k=2)
def test_config_validation_names_the_key(key, value):
    cfg = replace(GrMoEConfig(), **{key: value})
    if key == "routing_dim":  # p = 8 (auto for E = 4) does not fit in m = 8
        key = "subspace_dim"
    with pytest.raises(ConfigError, match=f"model.moe.router.{key}"):
        cfg.validate(MoEConfig(num_experts=E, top_k=K, router=cfg))


def test_auto_routing_dim_is_capped_at_the_model_width():
    """x̂ = normalize(P h) spans at most d dimensions: past d, a frame's extra dimensions would hold no token."""
    cfg = GrMoEConfig()  # auto p = 8 for E <= 8
    assert [cfg.resolved_routing_dim(8, d_model) for d_model in (32, 64, 128)] == [32, 64, 64]
    assert GrMoEConfig(routing_dim=48).resolved_routing_dim(8, 32) == 48  # an explicit m is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cap below E·p is the rule, not a misconfiguration: no warning
        router = GrMoERouter(cfg, 24, E, K)
    assert router.routing_dim == 24 and router.frames().shape == (E, 24, 8)
    with pytest.raises(ConfigError, match="model.moe.router.subspace_dim"):  # m = min(32, 8) = 8 leaves no p < m
        GrMoERouter(cfg, 8, E, K)


def test_mixture_likelihood_trains_the_frames_only():
    router = make_router(balance_coef=0.0, separation_coef=0.0, likelihood_coef=1.0)
    with torch.no_grad():  # off the tiling, so that every parameter could get a gradient
        router.frame_basis_EMP.add_(0.1 * torch.randn_like(router.frame_basis_EMP))
    router(tokens()).aux_losses["likelihood"].backward()
    assert router.frame_basis_EMP.grad.abs().sum() > 0
    for param in (router.proj.weight, router.rho_E):  # through P it could collapse the tokens; κ is the task's
        assert param.grad is None or not param.grad.any()
    uniform = mixture_negative_log_likelihood(torch.zeros(T, E), torch.tensor(float(T)))  # κ = 0: uniform densities
    assert uniform.item() == pytest.approx(0.0, abs=1e-7)


def test_mixture_likelihood_alone_draws_the_frames_onto_the_token_subspaces():
    """The task loss only orders the affinities; the likelihood moves each planted plane into a frame (K-subspaces)."""
    router = make_router(likelihood_coef=1.0)
    x_TD, _, bases_EDQ = synthetic_routing_task(512, seed=3)

    def best_frame_angles() -> torch.Tensor:  # per planted plane, carried into the routing space by P
        planted_EMQ = torch.linalg.qr(torch.einsum("md,edq->emq", router.proj.weight.detach(), bases_EDQ)).Q
        cosines = torch.linalg.svdvals(planted_EMQ.mT[:, None] @ router.frames().detach()[None])
        return torch.rad2deg(torch.arccos(cosines.clamp(max=1.0))).mean(-1).amin(1)

    assert best_frame_angles().min() > 30
    optimizer = torch.optim.Adam([router.frame_basis_EMP], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        router(x_TD).aux_losses["likelihood"].backward()
        optimizer.step()
    assert best_frame_angles().max() < 5


@pytest.mark.parametrize("recipe,p,m", [("quickstart_grmoe.yaml", 8, 64), ("350m_e8_grmoe.yaml", 8, 64),
                                        ("1.3b_e16_grmoe.yaml", 4, 64), ("2.7b_e32_grmoe.yaml", 2, 64)])
def test_recipes_load_with_the_subspace_dimension_of_their_scale(recipe, p, m):
    cfg = load_config(REPO / "recipes" / recipe)
    router_cfg, num_experts = cfg.model.moe.router, cfg.model.moe.num_experts
    assert isinstance(router_cfg, GrMoEConfig)
    assert (router_cfg.resolved_subspace_dim(num_experts),
            router_cfg.resolved_routing_dim(num_experts, cfg.model.d_model)) == (p, m)
    assert 4 <= router_cfg.resolved_kappa_init(num_experts, cfg.model.moe.top_k) <= 10


# ---- inside DeepSpeed's MoE layer ----------------------------------------------------------------------------------

def build_layer(ep_size: int = 1, ep_rank: int = 0, **router_overrides) -> MoEFeedForward:
    """A GrMoE-routed DeepSpeed MoE layer; the same seed gives the same weights for any ep_size (dropless)."""
    cfg = GrMoEConfig(**router_overrides)
    moe = MoEConfig(num_experts=E, top_k=K, drop_tokens=False, router=cfg)
    torch.manual_seed(0)
    router = build_router(cfg, D, E, K)
    return MoEFeedForward(D, 24, moe, router, ep_size, ep_rank, init_std=0.2, out_init_std=0.2, seed=7, layer_idx=0)


def reference_moe(layer: MoEFeedForward, x_TD: torch.Tensor) -> torch.Tensor:
    """Plain loop over experts: y_t = Σ_k w_tk · expert_{id_tk}(x_t), unused (-1) slots skipped."""
    out = layer.router(x_TD)
    y_TD = torch.zeros_like(x_TD)
    for slot in range(out.expert_ids_TK.shape[1]):
        for e, expert in enumerate(layer.local_experts):
            rows = out.expert_ids_TK[:, slot] == e
            y_TD[rows] += out.weights_TK[rows, slot, None] * expert(x_TD[rows])
    return y_TD


def test_router_inside_deepspeed_moe_layer_trains_and_evaluates_with_threshold_dispatch():
    layer = build_layer(variational="logit", dispatch="sample")
    x_BSD = torch.randn(2, 8, D)
    y_BSD, l_aux = layer(x_BSD)
    ((y_BSD ** 2).mean() + l_aux).backward()
    assert torch.isfinite(y_BSD).all() and l_aux.item() > 0
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert layer.gate.record is not None and "kappa_mean" in layer.gate.record.stats

    layer.eval()
    layer.router.set_eval_threshold(0.6, max_experts=E)
    with torch.no_grad():
        ids_TK = layer.router(x_BSD.reshape(-1, D)).expert_ids_TK
        assert ids_TK.shape[1] == E and (ids_TK == -1).any() and (ids_TK[:, 0] >= 0).all()
        y_eval_BSD, l_aux_eval = layer(x_BSD)
        torch.testing.assert_close(y_eval_BSD.reshape(-1, D), reference_moe(layer, x_BSD.reshape(-1, D)))
    assert l_aux_eval.item() == 0


def _ep2_worker(rank: int, world_size: int, x_BSD, w_BSD, expected: dict) -> None:
    layer = build_layer(ep_size=world_size, ep_rank=rank)
    layer.set_deepspeed_parallelism()
    assert layer.router.ep_group is not None and dist.get_world_size(layer.router.ep_group) == 2
    x_SD, w_SD = x_BSD[rank:rank + 1], w_BSD[rank:rank + 1]  # rank r holds sequence r
    y_SD, l_aux = layer(x_SD)
    # fp32 sums in another order (experts run on differently padded buffers): a few ulps
    torch.testing.assert_close(y_SD, expected["y"][rank:rank + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_aux, expected["l_aux"], rtol=1e-5, atol=1e-7)  # global ḡ, via all_reduce_sum
    ((y_SD * w_SD).sum(-1).mean() + l_aux).backward()
    for name, param in layer.router.named_parameters():  # data-parallel average of the replicated router
        grad = param.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad / world_size, expected["grads"][name], rtol=1e-4, atol=1e-6)
    for param in layer.local_experts.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
    layer.eval()
    layer.router.set_eval_threshold(0.6, max_experts=E)
    with torch.no_grad():
        torch.testing.assert_close(layer(x_SD)[0], expected["y_eval"][rank:rank + 1], rtol=1e-5, atol=1e-6)


def test_expert_parallel_layer_over_two_processes_matches_the_single_process_layer():
    try:  # tests/ as a package (rootdir on sys.path) or as a plain folder on sys.path
        from tests.distributed_utils import run_distributed
    except ImportError:
        from distributed_utils import run_distributed

    gen = torch.Generator().manual_seed(5)
    x_BSD, w_BSD = torch.randn(2, 12, D, generator=gen), torch.randn(2, 12, D, generator=gen)
    layer = build_layer()
    y_BSD, l_aux = layer(x_BSD)
    ((y_BSD * w_BSD).sum(-1).mean() + l_aux).backward()
    layer.eval()
    layer.router.set_eval_threshold(0.6, max_experts=E)
    with torch.no_grad():
        y_eval_BSD = layer(x_BSD)[0]
        assert (layer.router(x_BSD.reshape(-1, D)).expert_ids_TK == -1).any()
    expected = {"y": y_BSD.detach(), "l_aux": l_aux.detach(), "y_eval": y_eval_BSD,
                "grads": {name: p.grad.clone() for name, p in layer.router.named_parameters()}}
    run_distributed(_ep2_worker, 2, x_BSD, w_BSD, expected)


# ---- variants that balance hard loads and let κ move (issue 12) ---------------------------------------------------

def test_loss_free_bias_picks_an_underused_expert_while_the_probabilities_still_weight_it():
    router = make_router(selection_bias="loss_free", bias_update_rate=0.5).eval()
    assert router.needs_step_counts
    x_TD = torch.randn(T, D)
    plain = router(x_TD)
    assert not (plain.expert_ids_TK == 3).all(-1).any()
    router.post_step(torch.tensor([40.0, 40.0, 40.0, 0.0]))  # expert 3 got nothing: its bias rises, the others' fall
    assert router.balance_bias_E.tolist() == pytest.approx([-0.5, -0.5, -0.5, 0.5])
    biased = router(x_TD)
    torch.testing.assert_close(biased.probs_TE, plain.probs_TE)  # the bias never enters the distribution
    assert (biased.expert_ids_TK == 3).any(-1).all()
    picked_TK = biased.probs_TE.gather(-1, biased.expert_ids_TK)
    torch.testing.assert_close(biased.weights_TK, picked_TK / picked_TK.sum(-1, keepdim=True))


def test_loss_free_bias_needs_topk_dispatch():
    with pytest.raises(ConfigError, match="model.moe.router.selection_bias"):
        GrMoEConfig(selection_bias="loss_free", dispatch="sample").validate(MoEConfig(num_experts=E, top_k=K))


def test_learned_log_prior_shifts_the_mixture_weights_and_gets_gradients():
    router = make_router(selection_bias="learned")
    x_TD = torch.randn(T, D)
    before = router(x_TD).probs_TE.detach()
    with torch.no_grad():
        router.log_prior_E[1] = 2.0
    out = router(x_TD)
    expected = (before.log() + torch.tensor([0.0, 2.0, 0.0, 0.0])).softmax(-1)  # g ∝ π_e · exp(α s_e)
    torch.testing.assert_close(out.probs_TE, expected, rtol=1e-5, atol=1e-6)
    sum(out.aux_losses.values()).backward()
    assert router.log_prior_E.grad is not None and router.log_prior_E.grad.abs().sum() > 0


def test_kappa_lr_scale_multiplies_how_far_one_adam_step_moves_kappa():
    moved = {}
    for scale in (1.0, 10.0):
        router = make_router(kappa_lr_scale=scale)
        kappa_before = router.concentrations().detach().clone()
        optimizer = torch.optim.Adam([router.rho_E], lr=1e-3)
        out = router(torch.randn(T, D, generator=torch.Generator().manual_seed(3)))
        (out.probs_TE[:, 0].mean() + out.probs_TE.square().sum()).backward()  # any loss that reaches κ
        optimizer.step()
        moved[scale] = (router.concentrations() - kappa_before).abs().mean().item()
    torch.testing.assert_close(make_router(kappa_lr_scale=10.0).concentrations(), make_router().concentrations())
    assert moved[10.0] / moved[1.0] == pytest.approx(10.0, rel=0.05)


def test_kappa_calibration_sets_kappa0_from_the_real_token_gap_once_and_survives_a_reload():
    router = make_router(kappa_calibration=True)
    x_TD = torch.randn(T, D)
    with torch.no_grad():
        affinity_TE = subspace_affinity(torch.nn.functional.normalize(router.proj(x_TD), dim=-1), router.frames())
    mean_gap = (affinity_TE.amax(-1) - affinity_TE.amin(-1)).mean()
    router.eval()(x_TD)
    assert not router.kappa_calibrated  # evaluation never calibrates
    router.train()(x_TD)
    kappa = router.concentrations()
    target = topk_mass_min_gap(E, K, 0.05)
    assert (kappa.mean() * mean_gap).item() == pytest.approx(target, rel=1e-4)  # κ₀ · gap = C1's gap at α = 1
    assert kappa.mean() > make_router().concentrations().mean()  # real tokens have a gap below 1: κ₀ rises
    router(torch.randn(T, D) * 5)  # a second batch does not recalibrate
    torch.testing.assert_close(router.concentrations(), kappa)
    reloaded = make_router(seed=1, kappa_calibration=True)
    reloaded.load_state_dict(router.state_dict())
    reloaded.train()(torch.randn(T, D))
    torch.testing.assert_close(reloaded.concentrations(), kappa)


def test_alpha_jitter_draws_each_training_tokens_alpha_from_its_log_uniform_range():
    router = make_router(alpha=2.0, alpha_jitter=0.5)
    x_TD = torch.randn(T, D)
    with torch.no_grad():
        trained = router.train()(x_TD).probs_TE
        evaluated = router.eval()(x_TD).probs_TE
    log_ratio_TE = trained.log() - trained.log()[:, :1]  # α_t · (s_te − s_t0)
    plain_TE = evaluated.log() - evaluated.log()[:, :1]  # 2 · (s_te − s_t0)
    alpha_T = 2.0 * log_ratio_TE[:, 1] / plain_TE[:, 1]
    assert alpha_T.min() >= 2.0 * math.exp(-0.5) - 1e-3 and alpha_T.max() <= 2.0 * math.exp(0.5) + 1e-3
    assert alpha_T.std() > 0.1  # per token, not one α per batch
    torch.testing.assert_close(router.eval()(x_TD).probs_TE, evaluated)  # evaluation is deterministic at α


def test_variant_recipes_load_and_name_their_options():
    cases = {"quickstart_grmoe_switch.yaml": {"load_balance_coef": 0.01, "likelihood_coef": 0.0},
             # the defaults: the loss-free bias since it won (results.md), the likelihood since it recovers subspaces
             "quickstart_grmoe.yaml": {"selection_bias": "loss_free", "likelihood_coef": 0.03},
             "quickstart_grmoe_kl.yaml": {"selection_bias": "none", "likelihood_coef": 0.0},  # the first design
             "quickstart_grmoe_kappa.yaml": {"kappa_calibration": True, "likelihood_coef": 0.0},
             "quickstart_grmoe_nolik.yaml": {"selection_bias": "loss_free", "likelihood_coef": 0.0}}
    for recipe, options in cases.items():
        router_cfg = load_config(REPO / "recipes" / recipe).model.moe.router
        assert router_cfg.name == "grmoe"
        assert {key: getattr(router_cfg, key) for key in options} == options, recipe
