"""Routing math shared by the routers, as pure functions (testable without building a layer).

Shape suffixes: T tokens, E experts, K selected slots per token.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def all_reduce_sum(x: Tensor) -> Tensor:
    """Differentiable sum over every rank (identity in a single process).

    Losses that depend on token counts are computed from global sums, so that a run over N ranks optimises
    exactly the objective of the single-process run on the same global batch. Backward sums the gradients
    from all ranks; data-parallel averaging then divides by N, which gives the single-process gradient.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def topk_routing(probs_TE: Tensor, k: int, renormalize: bool,
                 selection_scores_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pick k experts per token; return (weights_TK, expert_ids_TK).

    `selection_scores_TE` (e.g. probs plus an expert bias) only changes *which* experts are chosen; the
    combine weights always come from the unbiased probs (DeepSeek-V3 / torchtitan convention).
    With `renormalize` the k weights sum to 1 (Mixtral); otherwise they are the raw probabilities (OLMoE).
    """
    scores = probs_TE if selection_scores_TE is None else selection_scores_TE
    expert_ids_TK = scores.topk(k, dim=-1).indices
    weights_TK = probs_TE.gather(-1, expert_ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)
    return weights_TK, expert_ids_TK


def assignment_counts(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """Number of (token, slot) assignments per expert, float [E]; ids of -1 (unused slots) are ignored.

    A scatter-add into E + 1 bins (bin 0 takes the -1s): no boolean-mask indexing or `bincount`, which both
    read a size back to the host and so stall a GPU stream."""
    ids = expert_ids_TK.reshape(-1).long() + 1
    counts = torch.zeros(num_experts + 1, dtype=torch.float32, device=ids.device)
    return counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))[1:]


def switch_load_balancing_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch/GShard load-balancing loss over the global batch: L = E · Σ_e f_e · P_e.

    f_e = (assignments to e) / (assignments in all), P_e = mean_t probs[t, e] (Fedus et al. 2021, eq. 4;
    Megatron's `switch_load_balancing_loss_func` for top-k). L = 1 under perfectly uniform routing and E when
    every token goes to one expert. Counts are not differentiable; the gradient flows through P_e.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = all_reduce_sum(assignment_counts(expert_ids_TK, num_experts))
    probs_sum_E = all_reduce_sum(probs_TE.sum(0))
    num_tokens = all_reduce_sum(probs_TE.new_full((), float(probs_TE.shape[0])))
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return num_experts * (f_E * probs_sum_E / num_tokens).sum()


def sequence_load_balancing_loss(probs_TE: Tensor, expert_ids_TK: Tensor, sequence_length: int) -> Tensor:
    """The Switch loss per sequence, averaged over sequences: mean_b E · Σ_e f_b,e · P_b,e, with f_b,e and P_b,e
    the assignment share and mean probability of expert e within sequence b (the MPI authors' code, routers.md
    §2.3; DeepSeek-V3's sequence-wise balance loss). 1 when every sequence is balanced, E when collapsed.

    It asks each sequence to be balanced, not only the batch; it needs no collective (a sequence lives on one rank),
    and data-parallel gradient averaging makes it the single-process mean over the global batch.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens % sequence_length:
        raise ValueError(f"{num_tokens} tokens are not whole sequences of {sequence_length}")
    num_sequences = num_tokens // sequence_length
    ids_BX = expert_ids_TK.reshape(num_sequences, -1).long() + 1  # bin 0 takes the unused slots (-1)
    counts_BE = torch.zeros(num_sequences, num_experts + 1, dtype=torch.float32, device=ids_BX.device)
    counts_BE = counts_BE.scatter_add_(1, ids_BX, torch.ones_like(ids_BX, dtype=torch.float32))[:, 1:]
    f_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1.0)
    mean_probs_BE = probs_TE.reshape(num_sequences, sequence_length, num_experts).mean(1)
    return num_experts * (f_BE * mean_probs_BE).sum(-1).mean()


@torch.no_grad()
def update_balance_bias(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3), in place: bias_e += rate · sign(mean load − load_e), so an underused
    expert's selection score rises and an overloaded one's falls. The bias only selects experts; it never weights."""
    counts_E = counts_E.to(bias_E)
    bias_E += rate * torch.sign(counts_E.mean() - counts_E)


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean_t logsumexp(logits_t)² (ST-MoE, Zoph et al. 2022, eq. 5): keeps logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def entropy(probs_TE: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row: -Σ_e p log p, with 0 log 0 = 0."""
    return -(probs_TE * probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny).log()).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# GrMoE: Bingham-on-the-Grassmannian routing (docs/routers/grmoe.md). The paper (arXiv 2602.17798) is public only
# as its abstract; everything below is the DERIVED design of docs/routers.md §1.4–1.6 and §1.10, not the paper's.
# Extra shape suffixes: M routing dimension, P subspace dimension, N series terms.
# ---------------------------------------------------------------------------------------------------------------

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
    n_N, log_c_N, weights_2N = _kummer_coefficients(a, b, num_terms, z.device)
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


def bingham_log_likelihood(affinity_TE: Tensor, kappa: Tensor, subspace_dim: int, routing_dim: int,
                           kappa_cap: float) -> Tensor:
    """s[t, e] = κ_e·B[t, e] − log M(p/2, m/2, κ_e): log-density of x̂_t under expert e's Bingham (Watson-type)
    distribution exp(x̂ᵀ κ_e U_eU_eᵀ x̂) / M, relative to the uniform measure on the sphere. [DERIVED, §1.5]

    `kappa` is [E] (one concentration per expert) or [T, E] (per-token concentrations, VI option B), within
    [0, kappa_cap], the bound that sizes the normaliser's series (`log_kummer`).
    The normaliser is what stops κ_e from being a free logit bias: ∂s/∂κ_e = B − E_κ[B], so raising κ_e helps
    expert e only on tokens whose affinity beats what its own distribution expects.
    """
    return kappa * affinity_TE - log_kummer(subspace_dim / 2, routing_dim / 2, kappa, kappa_cap)


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
    expert_ids_TK = keys_TE.topk(k, dim=-1).indices
    weights_TK = probs_TE.gather(-1, expert_ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(tiny)
    return weights_TK, expert_ids_TK


def mass_threshold_routing(probs_TE: Tensor, tau: float, max_experts: int,
                           renormalize: bool) -> tuple[Tensor, Tensor]:
    """Top-p dispatch: each token gets the smallest set of most probable experts whose mass reaches τ,
    k(x) = min{k : Σ_{j<=k} p_(j)(x) >= τ}, capped at `max_experts`; return (weights_TK, expert_ids_TK) with
    K = max_experts and id -1 / weight 0 in the unused slots. [DERIVED, §1.5]

    Sharper distributions need fewer experts: since the top-k mass of softmax(α·s) never falls as α grows,
    the mean k(x) never rises with α; sweeping α and τ after training traces a PPL-vs-compute curve.
    """
    sorted_probs_TK, expert_ids_TK = probs_TE.topk(max_experts, dim=-1)
    mass_before_TK = sorted_probs_TK.cumsum(-1) - sorted_probs_TK  # mass of the better experts
    used_TK = mass_before_TK < tau
    used_TK[:, 0] = True  # at least one expert, even for τ = 0
    weights_TK = torch.where(used_TK, sorted_probs_TK, torch.zeros_like(sorted_probs_TK))
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)
    return weights_TK, torch.where(used_TK, expert_ids_TK, torch.full_like(expert_ids_TK, -1))


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


# ---------------------------------------------------------------------------------------------------------------
# MPI: Manifold Power Iteration (docs/routers/mpi.md; arXiv 2606.12397 and the authors' code, routers.md §2.3–2.4),
# and the router/expert alignment diagnostics that compare any router's rows with its experts.
# Extra shape suffixes: D model width, F expert hidden width. W_e = W1_e ∈ R^{F×D} is expert e's SwiGLU gate
# matrix, G_e = W_eᵀW_e, σ₁ ≥ σ₂ ≥ … its singular values and v₁ its top right singular vector.
# ---------------------------------------------------------------------------------------------------------------


def power_retract_step(rows_ED: Tensor, w1_EFD: Tensor) -> Tensor:
    """One "power-then-retract" step per expert: φ_e = G_e r_e / ||G_e r_e||₂, with G_e = W_eᵀW_e.  [CODE]

    Power: G_e r_e is computed as W_eᵀ(W_e r_e), two batched matvecs (2·E·F·D multiply-adds); the D×D Gram
    matrix is never formed. Retract: L2 normalisation back onto the unit sphere, so ||φ_e|| = 1 whatever
    ||r_e|| or σ₁(W_e) (a zero row stays zero). The map's fixed points are ±v_i(W_e); only ±v₁ is stable.
    Source: the authors' `aoe4.py`, class `MoEMbs` (routers.md §2.3). Differentiable in both arguments
    (MPI does not detach W); runs in the inputs' dtype.
    """
    u_EF = torch.einsum("efd,ed->ef", w1_EFD, rows_ED)  # W_e r_e
    g_ED = torch.einsum("efd,ef->ed", w1_EFD, u_EF)  # W_eᵀ (W_e r_e) = G_e r_e
    return torch.nn.functional.normalize(g_ED, dim=-1)


def manifold_power_iteration(rows_ED: Tensor, w1_EFD: Tensor, steps: int) -> Tensor:
    """φ = Tⁿ(r) for n = `steps` applications of `power_retract_step` T (the paper and code use n = 1).

    Since Tⁿ(r) = Gⁿr / ||Gⁿr||, n steps are n steps of power iteration on G_e, with the classic rate
    tan∠(φ_e, v₁) ≤ (σ₂/σ₁)^{2n} · tan∠(r_e, v₁)  [DERIVED, routers.md §2.4].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    phi_ED = rows_ED
    for _ in range(steps):
        phi_ED = power_retract_step(phi_ED, w1_EFD)
    return phi_ED


def principal_right_singular(w1_EFD: Tensor) -> tuple[Tensor, Tensor]:
    """(σ [E, R], v₁ [E, D]) of every W_e, exact, by `torch.linalg.svd` in fp32: all R = min(F, D) singular values
    in descending order (σ[:, 0] = σ₁, and σ₂/σ₁ is the gap that decides whether v₁ is well defined), and the top
    right singular vector (its sign is arbitrary)."""
    _, sigma_ER, vh_ERD = torch.linalg.svd(w1_EFD.float(), full_matrices=False)
    return sigma_ER, vh_ERD[:, 0, :]


def direction_alignment(rows_ED: Tensor, v1_ED: Tensor) -> Tensor:
    """a_e = |⟨r_e/||r_e||, v₁e⟩| ∈ [0, 1] for unit v₁e: |cos| of the angle, so the sign of v₁ does not matter.

    Chance level (r_e uniform on the sphere of R^D): E[a_e] = Γ(D/2) / (√π Γ((D+1)/2)) ≈ √(2/(πD)).
    """
    rows_ED = torch.nn.functional.normalize(rows_ED.float(), dim=-1)
    return (rows_ED * v1_ED.float()).sum(-1).abs()


def router_alignment(rows_ED: Tensor, expert_w1_EFD: Tensor) -> Tensor:
    """a_e = |cos∠(r_e, v₁(W1_e))| [E]: how well router row e points along its expert's top right singular
    vector, for any router with one row per expert (routers.md §2.4 diagnostic). For `softmax_topk` r is
    `proj.weight`; for `mpi` it is φ (or the raw rows r)."""
    return direction_alignment(rows_ED, principal_right_singular(expert_w1_EFD)[1])


def alignment_specificity(rows_ED: Tensor, v1_ED: Tensor) -> Tensor:
    """s = mean_e |cos∠(r_e, v₁e)| − mean_{e≠e'} |cos∠(r_e, v₁e')|: how much more row e aligns with *its own*
    expert's top singular vector than with the other experts'. Alignment alone cannot tell this from a direction
    every expert and row share (e.g. the mean of the hidden states): then s ≈ 0 however high the alignment.
    s = 1 for rows equal to mutually orthogonal v₁e. Needs all E rows and v₁ (gather them under EP)."""
    cos_EE = (torch.nn.functional.normalize(rows_ED.float(), dim=-1) @ v1_ED.float().t()).abs()
    num_experts = cos_EE.shape[0]
    own = cos_EE.diagonal().mean()
    return own - (cos_EE.sum() - cos_EE.diagonal().sum()) / max(num_experts * (num_experts - 1), 1)


def pairwise_cosine(rows_ED: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, max) over pairs e ≠ e' of |cos∠(r_e, r_e')|: whether routing directions are expert-specific (near 0,
    as for orthogonal rows) or have drifted to a shared direction (near 1), which a high alignment with each
    expert's v₁ alone cannot tell."""
    unit_ED = torch.nn.functional.normalize(rows_ED.float(), dim=-1)
    cos_EE = (unit_ED @ unit_ED.t()).abs()
    off_diagonal = ~torch.eye(cos_EE.shape[0], dtype=torch.bool, device=cos_EE.device)
    return cos_EE[off_diagonal].mean(), cos_EE[off_diagonal].max()


def rayleigh_ratio(rows_ED: Tensor, w1_EFD: Tensor, sigma1_E: Tensor | None = None) -> Tensor:
    """ρ_e = ||W_e r̂_e|| / σ₁(W_e) ∈ [σ_min/σ₁, 1], with r̂_e = r_e/||r_e||: the share of the expert's largest gain
    that direction r_e gets. ρ_e = 1 exactly when r̂_e = ±v₁ (for σ₁ > σ₂). Chance level (r̂_e uniform on the
    sphere): the root-mean-square √E[||W_e r̂||²] / σ₁ = ||W_e||_F / (√D · σ₁). Pass `sigma1_E` to reuse an SVD."""
    w1_EFD = w1_EFD.float()
    if sigma1_E is None:
        sigma1_E = torch.linalg.matrix_norm(w1_EFD, ord=2)
    rows_ED = torch.nn.functional.normalize(rows_ED.float(), dim=-1)
    return torch.einsum("efd,ed->ef", w1_EFD, rows_ED).norm(dim=-1) / sigma1_E.float()


def gather_over_group(x_E: Tensor, group) -> Tensor:
    """Concatenate a per-expert tensor over an expert-parallel `group` along dim 0, differentiably.

    Rank i of the group holds experts [i·L, (i+1)·L), so the result is in global expert order. Backward sums,
    for each rank's slice, the gradients from every rank (a reduce-scatter, all-to-all + sum on gloo), so the
    rank that computed a slice receives the whole gradient of it. Identity without a group or with one rank.
    """
    if group is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x_E
    return torch.cat(dist_fn.all_gather(x_E, group=group), dim=0)


def expert_scalars(prefix: str, values_E: Tensor) -> dict[str, float]:
    """{prefix_mean: mean, prefix/e{id}: value per expert}: the flat float dict a router's `diagnostics` returns.

    `values_E` must be over all experts in global id order (see `gather_over_group`).
    """
    values = values_E.detach().float().cpu()
    return {f"{prefix}_mean": values.mean().item(), **{f"{prefix}/e{i}": v.item() for i, v in enumerate(values)}}
