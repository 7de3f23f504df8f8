"""`mpi`: the Manifold Power Iteration router (Wu, Lv, Xie, Lin 2026, arXiv 2606.12397).

Each router row is tied to its expert: at every forward, φ_e = normalize(W1_eᵀ W1_e r_e), one step of power
iteration on expert e's SwiGLU gate matrix W1_e followed by a retraction to the unit sphere ("power-then-retract"),
from a learned row r_e and the *current* expert weights, with autograd through both. Tokens are scored by
logits = R·x φᵀ, then softmax, top-k and renormalisation as in the baseline, with the same Switch loss.
Fixed point: φ_e = ±v₁(W1_e), the expert's top right singular vector. Forward pass from the authors' code
(routers.md §2.3); the power step is below, the alignment diagnostics in `alignment.py`; config, ablations and
diagnostics in docs/routers/mpi.md.

Shape suffixes: T tokens, D model width, E experts (all), L this rank's local experts (E / ep_size), F expert
hidden width, K selected slots per token, R = min(F, D) singular values. W_e = W1_e ∈ R^{F×D} is expert e's SwiGLU
gate matrix, G_e = W_eᵀW_e, σ₁ ≥ σ₂ ≥ … its singular values and v₁ its top right singular vector.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_lm.config.schema import ConfigError, MoEConfig, RouterConfig
from moe_lm.routers.alignment import (alignment_specificity, direction_alignment, pairwise_cosine,
                                     principal_right_singular, rayleigh_ratio)
from moe_lm.routers.base import Diagnostics, PostHocSparsity, Router, RouterOutput
from moe_lm.routers.functional import (gather_over_group, sequence_load_balancing_loss, switch_load_balancing_loss,
                                       topk_routing, z_loss)


@dataclass
class MPIConfig(RouterConfig):
    name: str = "mpi"
    power_steps: int = 1
    """Power-then-retract steps per forward, φ = normalize(Gⁿ r) (paper and code: 1; ablation (c): n > 1)."""
    logit_scale: float = 0.0
    """R in logits = R·⟨x, φ_e⟩; 0 = num_experts^(-1/2) (the code hard-codes 0.125 = 64^(-1/2))."""
    detach_w1: bool = False
    """Ablation (b): W1 enters φ as a constant, so the router sends no gradient into the experts."""
    power: bool = True
    """False = ablation (a): φ = r/||r||, normalised rows without the power step (the experts' W1 is not read)."""
    renormalize: bool = True
    """Renormalise the top-k weights to sum to 1 (as the code does)."""
    load_balance_coef: float = 0.01
    """Switch/GShard load-balancing loss coefficient (the baseline's loss and default; the paper's is unknown)."""
    balance_scope: str = "batch"
    """Where the load-balancing loss asks for balance: "batch" (the Switch loss over the global batch, as the
    baseline) or "sequence" (per sequence, averaged: the authors' code)."""
    z_loss_coef: float = 0.0
    """ST-MoE router z-loss coefficient (the code has none: MPI logits are bounded by R·||x||)."""
    init_std: float = 0.0
    """Std of the normal init of r; 0 = d_model^(-1/2). The forward pass does not depend on ||r_e||, so this only
    sets the size of optimizer steps relative to r (and of weight decay's pull)."""

    def validate(self, moe: MoEConfig) -> None:
        if self.power_steps < 1:
            raise ConfigError("model.moe.router.power_steps", f"must be >= 1, got {self.power_steps}")
        for key in ("logit_scale", "load_balance_coef", "z_loss_coef", "init_std"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.router.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.balance_scope not in ("batch", "sequence"):
            raise ConfigError("model.moe.router.balance_scope",
                              f"must be 'batch' or 'sequence', got {self.balance_scope!r}")
        if not self.power and (self.power_steps != 1 or self.detach_w1):
            warnings.warn("model.moe.router.power=false (normalised rows): power_steps and detach_w1 are ignored",
                          stacklevel=2)


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
    return F.normalize(g_ED, dim=-1)


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


class MPIRouter(PostHocSparsity, Router):
    """Manifold Power Iteration router.

    1. power-then-retract: φ_L = normalize(W1ᵀ W1 r) for this rank's L local experts, `power_steps` times, in
       fp32 (`power=false`: φ = r/||r||);
    2. gather: under expert parallelism, all-gather φ over the EP group into the full [E, D] φ, identical on every
       rank; backward returns each φ_e's gradient, summed over ranks, to the rank that owns expert e;
    3. logits = R·x φᵀ, probs = softmax(α·logits) (α = 1 in training; `PostHocSparsity`), top-k (or at
       evaluation the mass threshold), renormalise; all in fp32 with autocast off;
    4. in training with grad enabled: the unscaled Switch load-balancing loss and z-loss.
    """

    needs_expert_w1 = True

    def __init__(self, cfg: MPIConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__(cfg, d_model, num_experts, top_k)
        # the learned r_e: fp32, and not named "expert*" (DeepSpeed would file it with the expert shards)
        self.rows = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        nn.init.normal_(self.rows, std=cfg.init_std or d_model ** -0.5)
        self.logit_scale = cfg.logit_scale or num_experts ** -0.5
        self.needs_expert_w1 = cfg.power  # the normalised-rows ablation never reads W1: spare the gate the stack

    @property
    def loss_coefs(self) -> dict[str, float]:
        return {"load_balance": self.cfg.load_balance_coef, "z_loss": self.cfg.z_loss_coef}

    def _local_rows(self, num_local: int) -> Tensor:
        offset = self.local_expert_offset
        return self.rows[offset:offset + num_local].float()

    def _local_directions(self, expert_w1_EFD: Tensor) -> Tensor:
        """φ_L [L, D] of this rank's experts from their W1 stack [L, F, D], fp32."""
        w1_LFD = expert_w1_EFD.detach() if self.cfg.detach_w1 else expert_w1_EFD
        rows_LD = self._local_rows(w1_LFD.shape[0])
        steps = self.cfg.power_steps
        if w1_LFD.dtype == torch.float32 or not torch.is_grad_enabled():
            return manifold_power_iteration(rows_LD, w1_LFD.float(), steps)
        # Half-precision experts (DeepSpeed bf16): the power step still runs in fp32, but the fp32 copy of W1 is
        # recomputed in backward instead of being kept alive until then (2x the bf16 W1 of every MoE layer).
        return checkpoint(lambda r, w: manifold_power_iteration(r, w.float(), steps), rows_LD, w1_LFD,
                          use_reentrant=False)

    def directions(self, expert_w1_EFD: Tensor | None) -> Tensor:
        """φ [E, D]: every expert's unit routing direction, fp32, identical on all ranks of the EP group."""
        with torch.autocast(device_type=self.rows.device.type, enabled=False):
            if not self.cfg.power:
                return F.normalize(self.rows.float(), dim=-1)
            if expert_w1_EFD is None:
                raise ValueError("the mpi router needs the local experts' W1 stack (expert_w1_EFD)")
            phi_ED = gather_over_group(self._local_directions(expert_w1_EFD), self.ep_group)
        if phi_ED.shape[0] != self.num_experts:
            raise RuntimeError(f"mpi got W1 of {expert_w1_EFD.shape[0]} experts and made {phi_ED.shape[0]} of "
                               f"{self.num_experts} directions: under expert parallelism router.ep_group must be set")
        return phi_ED

    def logits(self, x_TD: Tensor, expert_w1_EFD: Tensor | None) -> Tensor:
        """logits_TE = R·x φᵀ in fp32."""
        phi_ED = self.directions(expert_w1_EFD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.logit_scale * (x_TD.float() @ phi_ED.t())

    def forward(self, x_TD: Tensor, *, expert_w1_EFD: Tensor | None = None, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> RouterOutput:
        logits_TE = self.alpha * self.logits(x_TD, expert_w1_EFD)
        # routing in fp32 with autocast off: under bf16 autocast softmax/top-k would see rounded scores
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            probs_TE = logits_TE.softmax(dim=-1)
            if self.training:
                weights_TK, expert_ids_TK = topk_routing(probs_TE, self.top_k, self.cfg.renormalize)
            else:
                weights_TK, expert_ids_TK = self.eval_dispatch(probs_TE, self.cfg.renormalize)
            losses = {}
            if self.training and torch.is_grad_enabled():
                if self.cfg.balance_scope == "sequence":
                    if sequence_length is None:
                        raise ValueError("mpi with balance_scope=sequence needs the sequence_length of its tokens")
                    balance = sequence_load_balancing_loss(probs_TE, expert_ids_TK, sequence_length)
                else:
                    balance = switch_load_balancing_loss(probs_TE, expert_ids_TK)
                losses = {"load_balance": balance, "z_loss": z_loss(logits_TE)}
        return RouterOutput(probs_TE, expert_ids_TK, weights_TK, losses)

    @torch.no_grad()
    def diagnostics(self, expert_w1_EFD: Tensor | None) -> Diagnostics:
        """Per expert, from an exact SVD: the alignment a_e = |⟨φ_e, v₁(W1_e)⟩| and Rayleigh ratio
        ||W1_e φ_e|| / σ₁(W1_e), the same two for the raw rows r (what the optimizer moves; compare `softmax_topk`),
        and the spectral gap σ₂/σ₁ (near 1, v₁ is ill-defined and alignment means little); as scalars, the
        specificity of φ and of r (own expert's v₁ vs the others': `alignment.alignment_specificity`), and the mean
        and max |cos| between different experts' φ (`alignment.pairwise_cosine`: is "aligned" expert-specific?).
        Collective under expert parallelism: every rank of the EP group must call it, and all get every expert.
        """
        if expert_w1_EFD is None:
            return Diagnostics()
        w1_LFD = expert_w1_EFD.float()
        rows_LD = self._local_rows(w1_LFD.shape[0])
        if self.cfg.power:
            phi_LD = manifold_power_iteration(rows_LD, w1_LFD, self.cfg.power_steps)
        else:
            phi_LD = F.normalize(rows_LD, dim=-1)
        sigma_LR, v1_LD = principal_right_singular(w1_LFD)
        sigma1_L = sigma_LR[:, 0]
        per_expert_L5 = torch.stack([direction_alignment(phi_LD, v1_LD), rayleigh_ratio(phi_LD, w1_LFD, sigma1_L),
                                     direction_alignment(rows_LD, v1_LD), rayleigh_ratio(rows_LD, w1_LFD, sigma1_L),
                                     sigma_LR[:, 1] / sigma1_L], dim=1)
        per_expert_E5 = gather_over_group(per_expert_L5, self.ep_group)
        phi_ED, v1_ED = gather_over_group(phi_LD, self.ep_group), gather_over_group(v1_LD, self.ep_group)
        pairwise_mean, pairwise_max = pairwise_cosine(phi_ED)
        names = ("alignment", "rayleigh", "row_alignment", "row_rayleigh", "sigma2_over_sigma1")
        return Diagnostics(
            scalars={"mpi/specificity": alignment_specificity(phi_ED, v1_ED).item(),
                     "mpi/row_specificity": alignment_specificity(self.rows, v1_ED).item(),
                     "mpi/phi_pairwise_cos_mean": pairwise_mean.item(),
                     "mpi/phi_pairwise_cos_max": pairwise_max.item()},
            per_expert={f"mpi/{name}": values_E for name, values_E in zip(names, per_expert_E5.unbind(1))})
