"""GrMoE's math: Bingham-on-the-Grassmannian routing (docs/routers/grmoe.md), as pure functions.

The paper (arXiv 2602.17798) is public only as its abstract; everything here is the DERIVED design of
docs/routers.md §1.4–1.6 and §1.10, not the paper's: the Kummer-series Bingham normaliser, the expert frames and
their overlap, the Bingham log-likelihood, the sampled and mass-threshold dispatches, the balance and VI losses,
and the bounds of §1.6 that the tests check. The router itself is `grmoe.py`.

Shape suffixes: T tokens, E experts, K dispatch slots per token, M routing dimension, P subspace dimension,
N series terms.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from moe_lm.routers.functional import all_reduce_sum, entropy, topk_routing

_KUMMER_CHUNK = 1 << 22
"""Series terms × arguments evaluated at once (float64: 32 MB), so a [T, E] argument never needs an [N, T, E] buffer."""


def kummer_series_terms(z_max: float) -> int:
    """N = ⌊z_max + 10·sqrt(z_max)⌋ + 60, the series length that gives log M(a, b, z) to float64 precision for every
    0 <= z <= z_max (b >= a > 0, as in the Bingham case a = p/2 < b = m/2).

    The ratio of consecutive terms is (a+n)·z / ((b+n)(n+1)) <= z/(n+1), so past their peak near n ≈ z the terms
    fall at least as fast as a Poisson(z) tail, and the terms left out sum to less than e^-50 of M. The length
    comes from a bound known on the host, never from the data: reading max z back would stall a GPU stream.
    """
    if not 0 <= z_max < math.inf:
        raise ValueError(f"z_max must be finite and >= 0, got {z_max}")
    return int(z_max + 10 * math.sqrt(z_max)) + 60


@functools.lru_cache(maxsize=64)
def _kummer_coefficients(a: float, b: float, num_terms: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(n [N], log c_n [N], w [2, N]), float64 on `device`, for the terms c_n z^n of M(a, b, z), c_n = (a)_n/((b)_n n!).

    Row 0 of w is 1 and row 1 is (a+n)/(b+n) = (n+1)·c_{n+1}/c_n, so that w @ (c_n z^n) = (M, M'), M' = dM/dz =
    (a/b)·M(a+1, b+1, z) = Σ_n (n+1)c_{n+1} z^n. Cached: every forward of a router asks for the same (a, b, N).
    """
    with torch.inference_mode(False), torch.no_grad():
        n_N = torch.arange(num_terms, dtype=torch.float64, device=device)
        lgamma_a_N, lgamma_b_N = torch.lgamma(n_N + a), torch.lgamma(n_N + b)  # log Γ(a+n): (a)_n = Γ(a+n)/Γ(a)
        log_c_N = (lgamma_a_N - lgamma_a_N[0]) - (lgamma_b_N - lgamma_b_N[0]) - torch.lgamma(n_N + 1)
        return n_N, log_c_N, torch.stack([torch.ones_like(n_N), (n_N + a) / (n_N + b)])


@torch.no_grad()
def _log_kummer_series(a: float, b: float, z: Tensor, num_terms: int) -> tuple[Tensor, Tensor]:
    """(log M, M'/M) of the first N terms, for float64 z >= 0 of any shape.

    Per chunk of arguments: the log-terms log(c_n z^n) = log c_n + n·log z as one outer product, shifted by their
    max over n (all terms are > 0, so nothing cancels), exponentiated in place, and summed twice by one product
    with w: log M = shift + log Σ, and M'/M = Σ_n (a+n)/(b+n) · (c_n z^n / M), a weighted mean of the terms.
    z = 0 is taken as the smallest normal float64 (log z finite), which moves M by less than 1e-307.
    """
    # traced into the graph under torch.compile (constants there); the cache serves eager forwards
    coefficients = _kummer_coefficients.__wrapped__ if torch.compiler.is_compiling() else _kummer_coefficients
    n_N, log_c_N, weights_2N = coefficients(a, b, num_terms, z.device)
    z_flat = z.reshape(-1)
    log_m, ratio = torch.empty_like(z_flat), torch.empty_like(z_flat)
    chunk = max(1, _KUMMER_CHUNK // num_terms)
    for start in range(0, z_flat.numel(), chunk):
        part = slice(start, start + chunk)
        log_z_C = z_flat[part].clamp_min(torch.finfo(torch.float64).tiny).log()
        terms_NC = torch.addr(log_c_N[:, None], n_N, log_z_C)  # log(c_n z^n)
        shift_C = terms_NC.amax(0)
        sums_2C = weights_2N @ terms_NC.sub_(shift_C).exp_()  # (M, M') · e^-shift
        log_m[part] = shift_C + sums_2C[0].log()
        ratio[part] = sums_2C[1] / sums_2C[0]
    return log_m.view_as(z), ratio.view_as(z)


class _LogKummer(torch.autograd.Function):
    """log ₁F₁(a; b; z) with the exact derivative d/dz log M(a,b,z) = (a/b) · M(a+1,b+1,z) / M(a,b,z).

    A custom Function rather than autograd through the series: backward keeps no [N, ...] graph (the option-B
    normaliser is evaluated per token and expert), and the derivative stays exact at z = 0. Forward gets the
    derivative from the same terms, so backward evaluates no second series; under create_graph, backward
    recomputes it as a differentiable function of z instead (double backward).
    """

    @staticmethod
    def forward(ctx, z: Tensor, a: float, b: float, num_terms: int) -> Tensor:
        log_m, ratio = _log_kummer_series(a, b, z, num_terms)
        ctx.save_for_backward(z, ratio)
        ctx.a, ctx.b, ctx.num_terms = a, b, num_terms
        return log_m

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, ratio = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: make the ratio a function of z for the second derivative
            a, b, num_terms = ctx.a, ctx.b, ctx.num_terms
            ratio = (a / b) * torch.exp(_LogKummer.apply(z, a + 1, b + 1, num_terms)
                                        - _LogKummer.apply(z, a, b, num_terms))
        return grad_out * ratio, None, None, None


def log_kummer(a: float, b: float, z: Tensor, z_max: float) -> Tensor:
    """log ₁F₁(a; b; z) = log M(a, b, z) = log Σ_n (a)_n / (b)_n · z^n / n! for 0 <= z <= z_max. [DERIVED, §1.10]

    GrMoE's Bingham normaliser: for A_e = κ U_eU_eᵀ with U_e ∈ St(m, p) and a token x̂ uniform on S^{m-1},
    B = ||U_eᵀx̂||² ~ Beta(p/2, (m-p)/2) and E[exp(κB)] = M(p/2, m/2, κ) (routers.md §1.4), so call it with
    a = p/2, b = m/2, z = κ. Bounds (Jensen, B <= 1): κ·p/m <= log M(p/2, m/2, κ) <= κ.

    Computed exactly (no asymptotics) as a float64 log-sum-exp of `kummer_series_terms(z_max)` series terms,
    returned in z's dtype. The length follows from the bound z_max, not from the data, so nothing is read back
    to the host. z is clamped into [0, z_max]: callers keep it there (below 0 the series alternates, above z_max
    it would need more terms), and a clamp guarantees it without a check that would sync. Differentiable:
    d/dz log M = (a/b) M(a+1, b+1, z) / M(a, b, z), which for the Bingham case is E[B] under the κ-tilted Beta
    (the expected affinity under expert e's own model); 0 where the clamp is active.
    """
    z64 = z.double().clamp(0.0, z_max)
    return _LogKummer.apply(z64, float(a), float(b), kummer_series_terms(z_max)).to(z.dtype)


def orthonormal_frames(basis_EMP: Tensor) -> Tensor:
    """U [E, m, p] fp32: the orthonormal factor of each thin QR W_e = U_eR_e (diag R_e > 0), by Cholesky QR:
    R_e is the Cholesky factor of the p×p Gram matrix W_eᵀW_e, and U_e = W_eR_e⁻¹ a triangular solve. [OURS]

    The same U_e as Householder QR (`torch.linalg.qr`, up to column signs, which U_eU_eᵀ ignores) from one batched
    Cholesky and one batched triangular solve, where torch's GPU Householder QR forms Q with one cuSOLVER call per
    matrix. Computed in float64, U_e is orthonormal to about cond(W_e)²·1e-16: to fp32 precision while
    cond(W_e) < 1e4 (W starts orthonormal, cond 1). `cholesky_ex` is not asked to check for failure, since the
    check reads a flag back to the host: a rank-deficient W_e gives NaN frames, hence a non-finite loss.
    """
    basis_EMP = basis_EMP.double()
    lower_EPP, _ = torch.linalg.cholesky_ex(basis_EMP.mT @ basis_EMP)  # W_eᵀW_e = R_eᵀR_e with R_e = L_eᵀ
    return torch.linalg.solve_triangular(lower_EPP.mT, basis_EMP, upper=True, left=False).float()  # W_e R_e⁻¹


def subspace_affinity(x_hat_TM: Tensor, frames_EMP: Tensor) -> Tensor:
    """B[t, e] = ||U_eᵀ x̂_t||² = x̂ᵀ U_eU_eᵀ x̂ ∈ [0, 1]: squared cosine between the token line and subspace e.

    x̂ unit rows, U_e orthonormal columns. Depends on U_e only through the projector U_eU_eᵀ (a Grassmann point)
    and on x̂ only up to sign (a point of Gr(1, m)). With m = E·p mutually orthogonal frames, Σ_e B[t, e] = 1.
    """
    return torch.einsum("tm,emp->tep", x_hat_TM, frames_EMP).square().sum(-1)


def bingham_log_normaliser(kappa: Tensor, subspace_dim: int, routing_dim: int, kappa_cap: float) -> Tensor:
    """log M(p/2, m/2, κ), the log-normaliser of a Bingham (Watson-type) distribution of concentration κ on a
    p-dimensional subspace of the m-dimensional routing space, for κ in [0, kappa_cap]. [DERIVED, §1.5]"""
    return log_kummer(subspace_dim / 2, routing_dim / 2, kappa, kappa_cap)


def bingham_log_likelihood(affinity_TE: Tensor, kappa: Tensor, subspace_dim: int, routing_dim: int,
                           kappa_cap: float, log_normaliser: Tensor | None = None) -> Tensor:
    """s[t, e] = κ_e·B[t, e] − log M(p/2, m/2, κ_e): log-density of x̂_t under expert e's Bingham (Watson-type)
    distribution exp(x̂ᵀ κ_e U_eU_eᵀ x̂) / M, relative to the uniform measure on the sphere. [DERIVED, §1.5]

    `kappa` is [E] (one concentration per expert) or [T, E] (per-token concentrations, VI option B), within
    [0, kappa_cap], the bound that sizes the normaliser's series (`bingham_log_normaliser`).
    The normaliser is what stops κ_e from being a free logit bias: ∂s/∂κ_e = B − E_κ[B], so raising κ_e helps
    expert e only on tokens whose affinity beats what its own distribution expects. `log_normaliser`, log M at
    these κ, is taken as given where a caller already has it (its series is most of the ops here).
    """
    if log_normaliser is None:
        log_normaliser = bingham_log_normaliser(kappa, subspace_dim, routing_dim, kappa_cap)
    return kappa * affinity_TE - log_normaliser


def subspace_overlap(frames_EMP: Tensor) -> Tensor:
    """mean_{e≠e'} ||U_eᵀ U_e'||_F² ∈ [0, p]: the sum of squared cosines of the principal angles between two
    experts' subspaces, averaged over ordered pairs. [DERIVED, §1.5]

    0 when the subspaces are mutually orthogonal (orthogonal tiling), p when they coincide. Divided by p it is
    the separation penalty L_sep = (1/(E(E−1)p)) Σ_{e≠e'} ||U_eᵀU_e'||_F².
    """
    num_experts = frames_EMP.shape[0]
    if num_experts < 2:
        return frames_EMP.new_zeros(())
    overlap_EE = torch.einsum("amp,bmq->abpq", frames_EMP, frames_EMP).square().sum((-2, -1))
    off_diagonal = overlap_EE.sum() - overlap_EE.diagonal().sum()
    return off_diagonal / (num_experts * (num_experts - 1))


def gumbel_topk_routing(probs_TE: Tensor, k: int, renormalize: bool,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample k distinct experts per token from probs without replacement (Gumbel-top-k: the top k of
    log p + Gumbel(0, 1) noise, Kool et al. 2019); return (weights_TK, expert_ids_TK).

    GrMoE's "posterior sampling" dispatch: every expert keeps probability >= min_e p_e of being chosen, which
    is what the collapse bound T2 needs. Weights are the probabilities of the sampled experts (renormalised
    over the k with `renormalize`); the gradient flows through them, not through the sample.
    """
    uniform_TE = torch.rand(probs_TE.shape, generator=generator, device=probs_TE.device, dtype=probs_TE.dtype)
    tiny = torch.finfo(probs_TE.dtype).tiny
    exponential_TE = -torch.log(uniform_TE.clamp_min(tiny))  # Exp(1) draws, > 0
    gumbel_TE = -torch.log(exponential_TE.clamp_min(tiny))
    keys_TE = probs_TE.detach().clamp_min(tiny).log() + gumbel_TE
    return topk_routing(probs_TE, k, renormalize, selection_scores_TE=keys_TE)


def marginal_kl_to_uniform(probs_TE: Tensor) -> Tensor:
    """KL(ḡ || uniform) = log E − H(ḡ), ḡ = (1/T) Σ_t probs[t] over the global batch (all ranks). [DERIVED, §1.5]

    GrMoE's balance term: the KL of a uniform assignment prior at batch level. 0 when the marginal routing is
    uniform, log E when every token goes to one expert. Differentiable, reduced with `all_reduce_sum` so that
    N ranks optimise the single-process objective.
    """
    num_experts = probs_TE.shape[-1]
    probs_sum_E = all_reduce_sum(probs_TE.sum(0))
    # a fill, not torch.tensor(..., device=): that copies from the host and waits for the GPU stream
    num_tokens = all_reduce_sum(probs_TE.new_full((), float(probs_TE.shape[0])))
    marginal_E = probs_sum_E / num_tokens.clamp_min(1.0)
    return math.log(num_experts) - entropy(marginal_E)


def mixture_negative_log_likelihood(scores_TE: Tensor, num_tokens: Tensor) -> Tensor:
    """log E − mean_t log Σ_e exp(s_te): the negative log-likelihood of the tokens under the uniform mixture of
    the E experts' Bingham distributions, relative to the uniform measure on the sphere. [DERIVED]

    0 when every expert's density is uniform (κ = 0); it falls as the subspaces move onto the tokens. Its gradient
    for frame e is the affinity gradient weighted by κ_e and the posterior softmax(s)[t, e]: the soft K-subspaces
    (EM) update of the mixture that GrMoE's gate is the posterior of. Mean over the global batch of `num_tokens`
    tokens (all ranks, with `all_reduce_sum`), so that N ranks optimise the single-process objective.
    """
    log_likelihood_sum = all_reduce_sum(torch.logsumexp(scores_TE, dim=-1).sum())
    return math.log(scores_TE.shape[-1]) - log_likelihood_sum / num_tokens.clamp_min(1.0)


def diag_gaussian_kl(mu: Tensor, sigma: Tensor, prior_sigma: float) -> Tensor:
    """KL(N(μ, diag σ²) || N(0, σ₀² I)) summed over the last dim: Σ [log(σ₀/σ) + (σ² + μ²)/(2σ₀²) − ½].

    With μ = 0 this is GrMoE VI option A's KL (posterior and prior share the mean ℓ(x)); with μ the offset mean
    it is option B's. [DERIVED, §1.5]
    """
    variance_ratio = (sigma.square() + mu.square()) / (2 * prior_sigma ** 2)
    return (torch.log(prior_sigma / sigma) + variance_ratio - 0.5).sum(-1)


# Bounds of routers.md §1.6 [DERIVED: our statements, not the paper's]. Δ is the logit gap max_e ℓ_e − min_e ℓ_e.

def entropy_lower_bound(num_experts: int, gap: Tensor | float) -> Tensor:
    """T1: H(softmax(ℓ)) >= −log max_e g_e >= log(1 + (E−1)·e^{−Δ}) for any logits of range <= Δ."""
    gap = torch.as_tensor(gap, dtype=torch.float64)
    return torch.log1p((num_experts - 1) * torch.exp(-gap))


def topk_mass_bounds(num_experts: int, k: int, gap: Tensor | float) -> tuple[Tensor, Tensor]:
    """C1: k/E <= M_k = Σ_{top-k} g <= k·e^Δ / (k·e^Δ + E − k) for any logits of range <= Δ."""
    gap = torch.as_tensor(gap, dtype=torch.float64)
    lower = torch.full_like(gap, k / num_experts)
    return lower, k * torch.exp(gap) / (k * torch.exp(gap) + num_experts - k)


def topk_mass_min_gap(num_experts: int, k: int, eps: float) -> float:
    """C1 inverted: the gap Δ >= log[(E−k)(1−ε)/(kε)] a token needs for its top-k mass to reach 1 − ε
    (E=8, k=2, ε=0.1: 3.3). With orthogonal tiling a token inside one subspace has Δ = α·κ."""
    if k >= num_experts:
        return 0.0
    return max(0.0, math.log((num_experts - k) * (1 - eps) / (k * eps)))


def min_expert_probability(num_experts: int, gap: Tensor | float) -> Tensor:
    """T2: every expert keeps g_e >= p_min = 1 / (1 + (E−1)·e^Δ); under sampled dispatch each token picks
    each expert with at least this probability, so P(some expert gets <= N·p_min/2 of N tokens) <=
    E·exp(−N·p_min/8) (Chernoff and a union bound)."""
    gap = torch.as_tensor(gap, dtype=torch.float64)
    return 1 / (1 + (num_experts - 1) * torch.exp(gap))
