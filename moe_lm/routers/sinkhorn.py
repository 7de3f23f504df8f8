"""`sinkhorn`: balanced token-choice routing by Sinkhorn iterations (S-BASE; Megatron-Core's `sinkhorn` router).

BASE layers (Lewis et al. 2021, arXiv 2103.16716) solve a balanced linear assignment of tokens to experts in
training; Clark et al. 2022 (arXiv 2202.01169, "S-BASE") and Megatron-Core replace the exact solver by Sinkhorn's
matrix scaling. With logits L = x W_gᵀ [T, E], the transport plan

    P = diag(u) · exp(L) · diag(v),   rows Σ_e P_te = 1,   columns Σ_t P_te = T/E,

is found by alternately normalising rows and columns a fixed number of times, without gradient. Each token goes to
its top-k experts by P (training only); at evaluation, by the plain probabilities. Since the top-k of a row does not
change when the row is scaled, the selection is top-k of L_te + log v_e: Sinkhorn acts as a per-batch expert bias,
solved afresh on every batch, rather than one learned across steps (DeepSeek-V3's aux-free bias). The combine
weights come from the router's own probabilities (softmax of L over all E, or sigmoid for k = 1), so the LM loss
trains W_g. Formulas and choices, with their sources, in docs/routers/sinkhorn.md.

Shape suffixes: T tokens, D model width, E experts, K selected slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lm.config.schema import ConfigError, MoEConfig, RouterConfig
from moe_lm.routers.base import Router, RouterOutput
from moe_lm.routers.functional import all_reduce_sum, switch_load_balancing_loss, topk_routing, z_loss


@dataclass
class SinkhornConfig(RouterConfig):
    name: str = "sinkhorn"
    sinkhorn_iters: int = 16
    """Column-then-row normalisation rounds per training forward. A fixed count: Megatron's stopping rule (a
    tolerance on the column scaling) reads the error back to the host every round."""
    global_balance: bool = True
    """Balance the columns over the tokens of all ranks (one all-reduce of E floats per round), so that N ranks
    route exactly like one process on the same global batch. False = each rank balances its own tokens, as
    Megatron-Core does (no collective)."""
    renormalize: bool = True
    """Renormalise the top-k softmax weights to sum to 1 (k > 1). Megatron keeps them raw. Ignored for k = 1,
    where the weight is sigmoid(L_te) (Megatron, BASE layers): a renormalised single weight is always 1 and would
    send no LM gradient to the router."""
    load_balance_coef: float = 0.0
    """Switch/GShard load-balancing loss coefficient (Megatron refuses any aux loss with Sinkhorn; always logged)."""
    z_loss_coef: float = 0.0
    """ST-MoE router z-loss coefficient (always logged)."""
    init_std: float = 0.02
    """Std of the normal init of W_g."""

    def validate(self, moe: MoEConfig) -> None:
        if self.sinkhorn_iters < 1:
            raise ConfigError("model.moe.router.sinkhorn_iters", f"must be >= 1, got {self.sinkhorn_iters}")
        for key in ("load_balance_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.router.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.init_std <= 0:
            raise ConfigError("model.moe.router.init_std", f"must be > 0, got {self.init_std}")


@torch.no_grad()
def sinkhorn_plan(logits_TE: Tensor, iters: int, global_columns: bool = True) -> tuple[Tensor, Tensor]:
    """(P_TE, balance error): the Sinkhorn scaling of exp(L) with rows summing to 1 and columns to T/E, and
    max_e |Σ_t P_te − T/E| / (T/E) after the last round. fp32, no gradient, no host read.

    Log domain, potentials a_t (rows) and b_e (columns), log P = L + a + b (Sinkhorn & Knopp 1967; Cuturi 2013):
      rows:     a_t = −logsumexp_e(L_te + b_e)                    (exact: rows sum to 1; log_softmax)
      columns:  b_e ← b_e + log(T/E) − log Σ_t P_te               (with the row-normalised P)
    starting from b = 0 with a row step, then `iters` rounds of (column, row). Ending on the row step leaves every
    token a distribution; the column sums carry the error reported. After a row step every P_te <= 1, so the
    column sums cannot overflow; a column that underflows to 0 is clamped, which bounds its step to ~log(T/tiny)
    and the next rounds finish it. T/E is taken as the total mass / E (the mass is T, the global token count).

    `global_columns`: the column sums (and so T) are all-reduced over every rank, which gives each rank the rows
    of the single-process plan of the global batch. The rows are always local: no communication.
    """
    logits_TE = logits_TE.float()
    num_experts = logits_TE.shape[-1]
    column_sum = all_reduce_sum if global_columns else (lambda x: x)
    b_E = logits_TE.new_zeros(num_experts)
    log_p_TE = logits_TE.log_softmax(dim=-1)
    for _ in range(iters):
        colsum_E = column_sum(log_p_TE.exp().sum(0))
        target = colsum_E.sum() / num_experts
        b_E = b_E + target.log() - colsum_E.clamp_min(torch.finfo(torch.float32).tiny).log()
        log_p_TE = (logits_TE + b_E).log_softmax(dim=-1)
    p_TE = log_p_TE.exp()
    colsum_E = column_sum(p_TE.sum(0))
    target = colsum_E.sum() / num_experts
    return p_TE, (colsum_E - target).abs().max() / target.clamp_min(torch.finfo(torch.float32).tiny)


class SinkhornRouter(Router):
    """Sinkhorn-balanced top-k router.

    1. logits L = x W_gᵀ and probs = softmax(L), fp32 with autocast off;
    2. training: P = `sinkhorn_plan(L)` without gradient (columns over all ranks with `global_balance`), each
       token's top-k experts by P; evaluation (`router.eval()`): top-k by probs;
    3. weights: for k > 1 the probs of the chosen experts (renormalised over the k with `renormalize`); for k = 1
       sigmoid(L) of the chosen expert. Either way the LM loss reaches W_g through them;
    4. training with grad enabled: the unscaled Switch loss and z-loss (coefficients 0 by default: Sinkhorn
       balances by itself), and the stat `balance_error` (P's relative column error, left on the device).
    """

    def __init__(self, cfg: SinkhornConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__(cfg, d_model, num_experts, top_k)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)

    @property
    def loss_coefs(self) -> dict[str, float]:
        return {"load_balance": self.cfg.load_balance_coef, "z_loss": self.cfg.z_loss_coef}

    def forward(self, x_TD: Tensor, *, expert_w1_EFD: Tensor | None = None, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> RouterOutput:
        # fp32 with autocast off: the plan's exp/log and the top-k ties would be lost in bf16
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.proj.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            stats, selection_TE = {}, None
            if self.training:
                selection_TE, stats["balance_error"] = sinkhorn_plan(logits_TE, self.cfg.sinkhorn_iters,
                                                                     self.cfg.global_balance)
            # top-k by the plan (training) or by probs; weights from probs (torchtitan/DeepSeek-V3 convention)
            weights_TK, expert_ids_TK = topk_routing(probs_TE, self.top_k, self.cfg.renormalize, selection_TE)
            if self.top_k == 1:  # Megatron, BASE layers: sigmoid gate; softmax renormalised over one expert is 1
                weights_TK = logits_TE.gather(-1, expert_ids_TK).sigmoid()
            losses = {}
            if self.training and torch.is_grad_enabled():
                losses = {"load_balance": switch_load_balancing_loss(probs_TE, expert_ids_TK),
                          "z_loss": z_loss(logits_TE)}
        return RouterOutput(probs_TE, expert_ids_TK, weights_TK, losses, stats)
