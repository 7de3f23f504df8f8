"""`grmoe`: Grassmannian MoE routing with Matrix-Bingham concentrations (Shihab, Akter, Sharma, arXiv 2602.17798).

Only the paper's abstract is public [ABS]: gating weights "arise from the concentration parameters of Matrix
Bingham distributions" on the Grassmannian; one knob, the concentration matrix Λ, continuously controls routing
entropy; amortized variational inference gives posterior routing; bounds tie the concentration spectrum to
entropy, top-k mass and collapse; post-hoc sparsity tuning without retraining. Everything concrete below is
our DERIVED design (docs/routers.md §1.4–1.7, §1.10; docs/routers/grmoe.md), not the paper's method. The math
(Bingham normaliser, frames, dispatches, losses, bounds) is in `grmoe_math.py`.

Shape suffixes: T tokens, D model width, M routing dimension m, P subspace dimension p, E experts,
K dispatch slots per token (top_k in training; max_experts under threshold dispatch), H VI hidden width.

Routing, per token h [DERIVED]:
    x̂     = normalize(P h)                                   a line through 0: a point of Gr(1, m)
    U_e   = W_eR_e⁻¹ ∈ St(m, p), thin QR W_e = U_eR_e        expert e's mean subspace (only U_eU_eᵀ matters)
    κ_e   = min(softplus(ρ_e), κ_cap)                        expert e's concentration (Λ = diag κ)
    s_e   = κ_e ||U_eᵀ x̂||² − log ₁F₁(p/2; m/2; κ_e)         Bingham log-likelihood of x̂ under expert e
    g^(α) = softmax(α · s)                                   posterior responsibility of a Bingham mixture
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lm.config.schema import ConfigError, MoEConfig, RouterConfig
from moe_lm.routers.base import Diagnostics, PostHocSparsity, Router, RouterOutput
from moe_lm.routers.functional import (all_reduce_sum, switch_load_balancing_loss, topk_routing,
                                      update_balance_bias)
from moe_lm.routers.grmoe_math import (bingham_log_likelihood, bingham_log_normaliser, diag_gaussian_kl,
                                       gumbel_topk_routing, marginal_kl_to_uniform, mixture_negative_log_likelihood,
                                       orthonormal_frames, subspace_affinity, subspace_overlap, topk_mass_min_gap)

DISPATCH_MODES = ("topk", "sample")
VARIATIONAL_MODES = ("none", "logit", "concentration")
SELECTION_BIASES = ("none", "learned", "loss_free")
KAPPA_INIT_EPS = 0.05
"""Auto κ₀ is the C1 gap at which a token inside one subspace can put 1 − ε = 95% of its mass on its top-k."""
SIGMA_FLOOR = 1e-4
"""Smallest VI standard deviation, so log σ in the KL stays finite."""


@dataclass
class GrMoEConfig(RouterConfig):
    name: str = "grmoe"
    shape_keys: ClassVar[tuple[str, ...]] = tuple(f"model.moe.router.{key}" for key in (
        "subspace_dim", "routing_dim", "variational", "vi_hidden_dim", "selection_bias", "kappa_calibration"))
    subspace_dim: int = 0
    """p, the dimension of each expert's subspace. 0 = auto: 8 for E <= 8, 4 for E <= 16, 2 otherwise."""
    routing_dim: int = 0
    """m, the dimension of the routing space the tokens are projected to. 0 = min(E·p, d): E·p tiles R^m with
    orthogonal subspaces, but x̂ = normalize(P h) spans at most d dimensions, so past d a frame's extra dimensions
    hold no token and the frames only blur (their part inside the tokens' span is no longer orthonormal)."""
    kappa_init: float = 0.0
    """κ₀, initial concentration of every expert. 0 = auto from C1: log[(E−k)(1−ε)/(kε)] / α with ε = 0.05
    (4.0 for E=8, 4.9 for E=16, 5.7 for E=32, at k=2)."""
    kappa_cap: float = 200.0
    """κ_cap, the largest concentration: κ_e, and option B's per-token κ_e·exp(δ), are clamped to it. It fixes the
    Kummer series at κ_cap + 10·sqrt(κ_cap) + 60 terms (401 for 200), so the length is never read from the data
    (a GPU sync per layer and forward). 200 is far past one-hot routing at α = 1 (C1 needs a gap of about 5);
    option B evaluates the series per token and expert, so its cost grows linearly with κ_cap. A κ_e at the cap
    gets no gradient and stays there: raise κ_cap if the `kappa_max` stat reaches it."""
    alpha: float = 1.0
    """α, the sharpness of g^(α) = softmax(α·s) in training; `GrMoERouter.set_alpha` changes it after training."""
    dispatch: str = "topk"
    """Training dispatch: "topk" (the k most probable experts) or "sample" (k experts sampled from g^(α) without
    replacement, Gumbel-top-k: posterior sampling). Evaluation is deterministic either way."""
    eval_threshold: float = 0.0
    """τ. 0 = evaluation dispatches the top-k; > 0 = each token gets the smallest set of experts whose mass is
    >= τ, at most `max_experts` (-1 pads the unused slots)."""
    max_experts: int = 0
    """k_max, the cap of threshold dispatch. 0 = model.moe.top_k."""
    renormalize: bool = True
    """Renormalise the combine weights of the dispatched experts to sum to 1."""
    variational: str = "none"
    """Amortized VI: "none"; "logit" (option A: q(ℓ|h) = N(ℓ(x), σ_φ(h)²), prior N(ℓ(x), σ₀²)); "concentration"
    (option B: per-token log-concentration offsets δ ~ N(μ_φ(h), σ_φ(h)²), prior N(0, s₀²), κ̃ = κ·e^δ)."""
    vi_hidden_dim: int = 64
    """Width of the 2-layer VI network φ."""
    prior_sigma: float = 1.0
    """σ₀, prior standard deviation of the logits in option A."""
    prior_scale: float = 0.5
    """s₀, prior standard deviation of the log-concentration offsets in option B."""
    kl_coef: float = 1e-3
    """β_KL, coefficient of mean_t KL(q(·|h_t) || prior) (VI only)."""
    balance_coef: float = 1e-2
    """β_bal, coefficient of KL(ḡ || uniform) = log E − H(ḡ), ḡ the batch-mean routing distribution."""
    separation_coef: float = 1e-3
    """β_sep, coefficient of L_sep = mean_{e≠e'} ||U_eᵀU_e'||_F² / p (0 when the subspaces are orthogonal)."""
    likelihood_coef: float = 3e-2
    """β_lik, coefficient of the Bingham-mixture negative log-likelihood of the centred token lines, L_lik =
    log E − mean_t log Σ_e exp(s_te) (uniform mixture weights; 0 = off). It fits the frames to where the tokens are
    (soft K-subspaces): the task loss only orders the affinities, so once a token's top-1 is right nothing draws the
    frames onto the token subspaces. It fits the tokens' deviation from the batch mean: a direction every token
    shares says nothing about which expert should take it. Its gradient goes to the frames only: through P it could
    collapse the tokens into one subspace, and κ is the entropy knob the task loss sets. 3e-2 takes the synthetic
    recovery angle under 10° (17° without), at about 1% quickstart perplexity, which stays within 1% of
    softmax_topk's (docs/results.md)."""
    load_balance_coef: float = 0.0
    """Standard Switch/GShard load-balancing loss on top (0 = off): unlike the balance KL, which sees only the mean
    of the soft responsibilities, it sees the hard top-k loads."""
    selection_bias: str = "loss_free"
    """A per-expert bias against hard-load imbalance: "loss_free" (DeepSeek-V3: a bias added to the probabilities
    only when choosing the top-k, moved after each step by `bias_update_rate` toward equal loads); "learned" (a
    log-prior log π_e added to the logits, the mixture weights of the Bingham mixture, learned by gradient); "none"
    (the balance KL alone, blind to hard top-k loads). loss_free is the default since it won over 3 seeds at the
    quickstart (docs/results.md): about a third lower load CV than softmax_topk at the same perplexity."""
    bias_update_rate: float = 1e-3
    """u in bias_e += u · sign(mean load − load_e) (selection_bias = loss_free)."""
    kappa_lr_scale: float = 1.0
    """s in κ_e = softplus(s·ρ_e). Adam's step does not depend on the gradient's scale, so s multiplies the learning
    rate of κ (1: κ moves at most about lr per step, which over the quickstart's 300 steps is 0.5 against κ₀ = 4)."""
    kappa_calibration: bool = False
    """Rescale κ₀ at the first training forward from the real tokens, to C1's gap / (α · mean_t[max_e a_te −
    min_e a_te]) with a_te = ||U_eᵀx̂_t||²: the auto κ₀ assumes a token inside one subspace (gap 1), while real
    tokens start with a gap near 0.2, so the routing starts near uniform. Averaged over all ranks."""
    alpha_jitter: float = 0.0
    """j: in training each token's α is drawn log-uniformly from [α·e^−j, α·e^j], so the post-hoc α knob is trained
    for, not one value of it. 0 = off."""

    def resolved_subspace_dim(self, num_experts: int) -> int:
        if self.subspace_dim:
            return self.subspace_dim
        return 8 if num_experts <= 8 else 4 if num_experts <= 16 else 2

    def resolved_routing_dim(self, num_experts: int, d_model: int) -> int:
        return self.routing_dim or min(num_experts * self.resolved_subspace_dim(num_experts), d_model)

    def check_subspace_fits(self, num_experts: int, routing_dim: int) -> None:
        """p < m: a subspace filling the routing space gives every token the same affinity."""
        p = self.resolved_subspace_dim(num_experts)
        if p >= routing_dim:
            raise ConfigError("model.moe.router.subspace_dim", f"p={p} must be < routing_dim m={routing_dim}: a "
                                                               f"subspace filling the routing space gives every "
                                                               f"token the same affinity")

    def resolved_kappa_init(self, num_experts: int, top_k: int) -> float:
        if self.kappa_init:
            return self.kappa_init
        gap = topk_mass_min_gap(num_experts, top_k, KAPPA_INIT_EPS)
        return (gap if gap > 0 else 4.0) / self.alpha  # top_k = E: C1 is vacuous, keep a moderate κ

    def resolved_max_experts(self, top_k: int) -> int:
        return self.max_experts or top_k

    def validate(self, moe: MoEConfig) -> None:
        def require(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"model.moe.router.{key}", message)

        for key in ("subspace_dim", "routing_dim", "max_experts"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("kappa_init", "kl_coef", "balance_coef", "separation_coef", "likelihood_coef", "load_balance_coef",
                    "bias_update_rate", "alpha_jitter"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("alpha", "prior_sigma", "prior_scale", "kappa_lr_scale"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(0 < self.kappa_cap < math.inf, "kappa_cap", f"must be finite and > 0, got {self.kappa_cap}")
        require(self.vi_hidden_dim >= 1, "vi_hidden_dim", f"must be >= 1, got {self.vi_hidden_dim}")
        require(self.dispatch in DISPATCH_MODES, "dispatch", f"must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
        require(self.selection_bias in SELECTION_BIASES, "selection_bias",
                f"must be one of {SELECTION_BIASES}, got {self.selection_bias!r}")
        require(self.selection_bias != "loss_free" or self.dispatch == "topk", "selection_bias",
                "loss_free biases the top-k choice, so it needs dispatch=topk (dispatch=sample: set "
                "selection_bias=none)")
        require(self.variational in VARIATIONAL_MODES, "variational",
                f"must be one of {VARIATIONAL_MODES}, got {self.variational!r}")
        require(0 <= self.eval_threshold <= 1, "eval_threshold", f"must be in [0, 1], got {self.eval_threshold}")
        require(self.max_experts <= moe.num_experts, "max_experts",
                f"{self.max_experts} > model.moe.num_experts={moe.num_experts}")
        kappa_init = self.resolved_kappa_init(moe.num_experts, moe.top_k)
        require(kappa_init < self.kappa_cap, "kappa_cap",
                f"{self.kappa_cap} must be above the initial concentration κ₀={kappa_init:.4g} (kappa_init, alpha)")
        if self.routing_dim:  # the automatic m depends on d_model: the router checks it when it is built
            self.check_subspace_fits(moe.num_experts, self.routing_dim)
            p = self.resolved_subspace_dim(moe.num_experts)
            if self.routing_dim < moe.num_experts * p:  # the automatic m is below E·p only where d caps it, by design
                warnings.warn(f"model.moe.router.routing_dim={self.routing_dim} < num_experts·subspace_dim="
                              f"{moe.num_experts * p}: the expert subspaces cannot be mutually orthogonal, so they "
                              f"start overlapping", stacklevel=2)


def softplus_inverse(y: float) -> float:
    """x with softplus(x) = log(1 + e^x) = y, for y > 0."""
    return y + math.log(-math.expm1(-y))


def orthogonal_tiling(routing_dim: int, num_experts: int, subspace_dim: int) -> Tensor:
    """[E, m, p] frames cut from the columns of random orthogonal m×m matrices (routers.md §1.5). [DERIVED]

    With m >= E·p the E subspaces are mutually orthogonal (all principal angles 90°), and with m = E·p they tile
    R^m: Σ_e ||U_eᵀx̂||² = 1 for every unit x̂. Past m columns a fresh orthogonal matrix is drawn.
    """
    blocks = math.ceil(num_experts * subspace_dim / routing_dim)
    columns = torch.cat([torch.linalg.qr(torch.randn(routing_dim, routing_dim)).Q for _ in range(blocks)], dim=1)
    frames_MEP = columns[:, :num_experts * subspace_dim].reshape(routing_dim, num_experts, subspace_dim)
    # contiguous: it becomes a parameter, and NCCL's broadcast in deepspeed.initialize rejects strided tensors
    return frames_MEP.permute(1, 0, 2).contiguous()


class GrMoERouter(PostHocSparsity, Router):
    """GrMoE router: Bingham-mixture responsibilities of a token line over E expert subspaces. [DERIVED]

    1. project: x̂ = normalize(P h) ∈ Gr(1, m) (P: `proj`, d → m);
    2. frames: U_e = W_eR_e⁻¹ ∈ St(m, p), the Q factor of W_e's thin QR (W: `frame_basis_EMP`, unconstrained; the
       QR keeps U_e orthonormal whatever the optimizer does, no retraction needed), initialised by orthogonal tiling;
    3. score: s_e = κ_e·||U_eᵀx̂||² − log ₁F₁(p/2; m/2; κ_e), κ_e = min(softplus(ρ_e), κ_cap) (`rho_E`); with VI
       option B the concentration is per token, κ̃_te = min(κ_e·exp(δ_te), κ_cap);
    4. gate: g^(α) = softmax(α·s) (option A adds σ_φ(h)·ε to the logits in training);
    5. dispatch: training top-k or Gumbel-top-k; evaluation top-k, or the mass threshold τ capped at k_max;
    6. losses (unscaled, training only): balance KL(ḡ||U), separation, mixture likelihood (frames only), VI KL,
       optional Switch LBL.
    """

    def __init__(self, cfg: GrMoEConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__(cfg, d_model, num_experts, top_k)
        self.subspace_dim = cfg.resolved_subspace_dim(num_experts)
        self.routing_dim = cfg.resolved_routing_dim(num_experts, d_model)
        cfg.check_subspace_fits(num_experts, self.routing_dim)
        self.alpha = cfg.alpha
        self.eval_threshold = cfg.eval_threshold
        self.max_experts = cfg.resolved_max_experts(top_k)
        self.kappa_cap = float(cfg.kappa_cap)
        self.proj = nn.Linear(d_model, self.routing_dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)  # x̂ is scale-free; orthogonal rows keep all token directions
        self.frame_basis_EMP = nn.Parameter(orthogonal_tiling(self.routing_dim, num_experts, self.subspace_dim))
        kappa_init = cfg.resolved_kappa_init(num_experts, top_k)
        self.kappa_lr_scale = cfg.kappa_lr_scale
        self.rho_E = nn.Parameter(torch.full((num_experts,), softplus_inverse(kappa_init) / cfg.kappa_lr_scale))
        if cfg.kappa_calibration:
            # κ = scale · softplus(s·ρ); a buffer, not a parameter edit: optimizers with master weights (DeepSpeed
            # bf16, ZeRO) would overwrite an in-place change of ρ at their next step
            self.register_buffer("kappa_scale", torch.ones(()))
            self.register_buffer("kappa_calibrated", torch.zeros((), dtype=torch.bool))
            self._calibration_pending: bool | None = None  # the buffer, read once; None = not read yet
            self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_calibration_pending", None))
        if cfg.selection_bias == "learned":
            self.log_prior_E = nn.Parameter(torch.zeros(num_experts))
        elif cfg.selection_bias == "loss_free":
            self.register_buffer("balance_bias_E", torch.zeros(num_experts))
        if cfg.variational != "none":
            # option A: σ per expert; option B: (μ, σ) per expert. Starts at q = prior (KL = 0).
            outputs = num_experts if cfg.variational == "logit" else 2 * num_experts
            self.vi_net = nn.Sequential(nn.Linear(d_model, cfg.vi_hidden_dim), nn.SiLU(),
                                        nn.Linear(cfg.vi_hidden_dim, outputs))
            nn.init.normal_(self.vi_net[2].weight, std=0.01)
            with torch.no_grad():
                prior_std = cfg.prior_sigma if cfg.variational == "logit" else cfg.prior_scale
                self.vi_net[2].bias.zero_()
                self.vi_net[2].bias[-num_experts:] = softplus_inverse(prior_std - SIGMA_FLOOR)

    # ---- the math ------------------------------------------------------------------------------------------------

    def frames(self) -> Tensor:
        """U [E, m, p], orthonormal columns per expert (thin QR by Cholesky; the column signs are irrelevant)."""
        return orthonormal_frames(self.frame_basis_EMP)

    def concentrations(self) -> Tensor:
        """κ [E] = min(scale · softplus(s·ρ), κ_cap), scale = 1 unless `kappa_calibration` set it."""
        kappa_E = F.softplus(self.kappa_lr_scale * self.rho_E.float())
        if self.cfg.kappa_calibration:
            kappa_E = self.kappa_scale.float() * kappa_E
        return kappa_E.clamp(max=self.kappa_cap)

    @torch.no_grad()
    def _calibrate_kappa(self, affinity_TE: Tensor) -> None:
        """Once, at the first training forward (`kappa_calibration`): scale κ so that the mean real-token affinity
        gap reaches C1's gap at α. Reads the flag from the host once per process, never again."""
        if self._calibration_pending is None:
            self._calibration_pending = not bool(self.kappa_calibrated)
        if not self._calibration_pending:
            return
        gap = (affinity_TE.amax(-1) - affinity_TE.amin(-1)).mean()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(gap)
            gap = gap / torch.distributed.get_world_size()
        target = topk_mass_min_gap(self.num_experts, self.top_k, KAPPA_INIT_EPS)
        target = target if target > 0 else 4.0  # top_k = E: C1 is vacuous (as for the auto κ₀)
        kappa_E = F.softplus(self.kappa_lr_scale * self.rho_E.float())
        wanted = (target / (self.alpha * gap.clamp_min(1e-3))).clamp(max=0.5 * self.kappa_cap)
        self.kappa_scale.copy_(wanted / kappa_E.mean())
        self.kappa_calibrated.fill_(True)
        self._calibration_pending = False

    @property
    def loss_coefs(self) -> dict[str, float]:
        cfg = self.cfg
        return {"balance": cfg.balance_coef, "separation": cfg.separation_coef, "likelihood": cfg.likelihood_coef,
                "kl": cfg.kl_coef, "load_balance": cfg.load_balance_coef}

    def forward(self, x_TD: Tensor, *, expert_w1_EFD: Tensor | None = None, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> RouterOutput:
        cfg = self.cfg
        x_TD = x_TD.float()  # fp32 routing math: softmax over bf16 logits loses ties and mass
        x_hat_TM = F.normalize(F.linear(x_TD, self.proj.weight.float()), dim=-1)
        frames_EMP = self.frames()
        affinity_TE = subspace_affinity(x_hat_TM, frames_EMP)
        if cfg.kappa_calibration and self.training:
            self._calibrate_kappa(affinity_TE.detach())
        kappa_E = self.concentrations()
        sample = self.training  # VI noise and Gumbel sampling in training; means and top-k in evaluation

        kl_T = vi_sigma_TE = log_norm_E = None
        if cfg.variational == "concentration":
            mu_TE, vi_sigma_TE = self._vi_net_outputs(x_TD)
            delta_TE = mu_TE + vi_sigma_TE * torch.randn_like(mu_TE) if sample else mu_TE
            kappa_TE = (kappa_E * delta_TE.exp()).clamp(max=self.kappa_cap)
            scores_TE = bingham_log_likelihood(affinity_TE, kappa_TE, self.subspace_dim, self.routing_dim,
                                               self.kappa_cap)
            kl_T = diag_gaussian_kl(mu_TE, vi_sigma_TE, cfg.prior_scale)
        else:
            log_norm_E = bingham_log_normaliser(kappa_E, self.subspace_dim, self.routing_dim, self.kappa_cap)
            scores_TE = bingham_log_likelihood(affinity_TE, kappa_E, self.subspace_dim, self.routing_dim,
                                               self.kappa_cap, log_norm_E)
        alpha = self.alpha
        if sample and cfg.alpha_jitter > 0:
            log_jitter_T1 = (2 * torch.rand(scores_TE.shape[0], 1, device=scores_TE.device) - 1) * cfg.alpha_jitter
            alpha = self.alpha * log_jitter_T1.exp()
        logits_TE = alpha * scores_TE
        if cfg.selection_bias == "learned":
            logits_TE = logits_TE + self.log_prior_E.float()
        if cfg.variational == "logit":
            mu_TE, vi_sigma_TE = self._vi_net_outputs(x_TD)  # μ = 0: q and the prior share the mean α·s
            if sample:
                logits_TE = logits_TE + vi_sigma_TE * torch.randn_like(logits_TE)
            kl_T = diag_gaussian_kl(mu_TE, vi_sigma_TE, cfg.prior_sigma)
        probs_TE = logits_TE.softmax(dim=-1)
        selection_TE = probs_TE + self.balance_bias_E if cfg.selection_bias == "loss_free" else None

        if self.training and cfg.dispatch == "sample":
            weights_TK, expert_ids_TK = gumbel_topk_routing(probs_TE, self.top_k, cfg.renormalize)
        elif self.training:
            weights_TK, expert_ids_TK = topk_routing(probs_TE, self.top_k, cfg.renormalize, selection_TE)
        else:
            weights_TK, expert_ids_TK = self.eval_dispatch(probs_TE, cfg.renormalize, selection_TE)

        overlap = subspace_overlap(frames_EMP)  # the separation loss (divided by p) and the separation stat
        losses: dict[str, Tensor] = {}
        if self.training and torch.is_grad_enabled():
            losses["balance"] = marginal_kl_to_uniform(probs_TE)
            losses["separation"] = overlap / self.subspace_dim
            if cfg.likelihood_coef > 0:
                shared_norm_E = None if log_norm_E is None else log_norm_E.detach()
                losses["likelihood"] = self._mixture_likelihood_loss(x_hat_TM.detach(), frames_EMP, kappa_E.detach(),
                                                                     shared_norm_E)
            if kl_T is not None:
                losses["kl"] = kl_T.mean()
            if cfg.load_balance_coef > 0:
                losses["load_balance"] = switch_load_balancing_loss(probs_TE, expert_ids_TK)
        stats = self._stats(probs_TE, kappa_E, overlap, vi_sigma_TE)
        return RouterOutput(probs_TE, expert_ids_TK, weights_TK, losses, stats)

    def _mixture_likelihood_loss(self, x_hat_TM: Tensor, frames_EMP: Tensor, kappa_E: Tensor,
                                 log_norm_E: Tensor | None) -> Tensor:
        """L_lik of the token lines centred on the global batch mean (all ranks), renormalised, under the experts'
        concentrations κ_E; `log_norm_E`, their Bingham normalisers, where the scores already took them. The token
        sum and count are reduced in one collective."""
        sums_M1 = all_reduce_sum(torch.cat([x_hat_TM.sum(0), x_hat_TM.new_full((1,), float(x_hat_TM.shape[0]))]))
        num_tokens = sums_M1[-1]
        centred_TM = F.normalize(x_hat_TM - sums_M1[:-1] / num_tokens.clamp_min(1.0), dim=-1)
        scores_TE = bingham_log_likelihood(subspace_affinity(centred_TM, frames_EMP), kappa_E, self.subspace_dim,
                                           self.routing_dim, self.kappa_cap, log_norm_E)
        return mixture_negative_log_likelihood(scores_TE, num_tokens)

    def _vi_net_outputs(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_φ(h), σ_φ(h)), each [T, E]; μ is zeros for option A (its posterior mean is the deterministic logit)."""
        out_TX = F.linear(F.silu(F.linear(x_TD, self.vi_net[0].weight.float(), self.vi_net[0].bias.float())),
                          self.vi_net[2].weight.float(), self.vi_net[2].bias.float())
        sigma_TE = F.softplus(out_TX[:, -self.num_experts:]) + SIGMA_FLOOR
        mu_TE = out_TX[:, :self.num_experts] if out_TX.shape[1] == 2 * self.num_experts else torch.zeros_like(sigma_TE)
        return mu_TE, sigma_TE

    @torch.no_grad()
    def _stats(self, probs_TE: Tensor, kappa_E: Tensor, overlap: Tensor,
               vi_sigma_TE: Tensor | None) -> dict[str, Tensor]:
        """Per-forward scalars, left on the device (no host read): the metrics accumulator reduces them later.

        Token entropy, active experts and the dispatched mass are in every router's routing record (docs/metrics.md);
        `top_k_prob_mass` is C1's M_k, the mass of the k most probable experts, which differs from the dispatched
        mass under sampled or threshold dispatch."""
        stats = {
            "kappa_mean": kappa_E.mean(), "kappa_min": kappa_E.min(), "kappa_max": kappa_E.max(),
            "kappa_std": torch.var_mean(kappa_E, correction=0)[0].sqrt(),  # Tensor.std reads a scalar back on CPU
            "top_k_prob_mass": probs_TE.topk(self.top_k, dim=-1).values.sum(-1).mean(),
            "separation": overlap,
        }
        if vi_sigma_TE is not None:
            stats["vi_sigma_mean"] = vi_sigma_TE.mean()
        return {name: value.detach().float() for name, value in stats.items()}

    @property
    def needs_step_counts(self) -> bool:
        return self.cfg.selection_bias == "loss_free"

    def post_step(self, counts_E: Tensor) -> None:
        if self.cfg.selection_bias == "loss_free":
            update_balance_bias(self.balance_bias_E, counts_E, self.cfg.bias_update_rate)

    @torch.no_grad()
    def diagnostics(self, expert_w1_EFD: Tensor | None = None) -> Diagnostics:
        """Per-expert concentrations κ_e (the learned Λ) and the mean subspace overlap."""
        return Diagnostics(scalars={"grmoe/separation": float(subspace_overlap(self.frames()))},
                           per_expert={"grmoe/kappa": self.concentrations()})
