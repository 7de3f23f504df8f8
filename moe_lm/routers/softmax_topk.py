"""`softmax_topk`: the baseline token-choice router and its strong variants.

probs = softmax(α·W x), α = 1 in training; the top-k experts by probability (optionally by probability + an
aux-loss-free expert bias) get the token, with weights renormalised over the k (Mixtral) or left raw (OLMoE).
Balance comes from the Switch/GShard loss, the ST-MoE z-loss keeps logits small, and DeepSeek-V3's bias balancing
(`bias_update_rate > 0`) is available as the aux-loss-free baseline. k=1 with `renormalize=false` is Switch.
After training α = 1/T is an inverse temperature to sweep, with mass-threshold dispatch at evaluation
(`PostHocSparsity`): the baseline arm of `moe-lm eval --sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lm.config.schema import ConfigError, MoEConfig, RouterConfig
from moe_lm.routers.alignment import alignment_specificity, direction_alignment, principal_right_singular
from moe_lm.routers.base import Diagnostics, PostHocSparsity, Router, RouterOutput
from moe_lm.routers.functional import (gather_over_group, switch_load_balancing_loss, topk_routing, update_balance_bias,
                                       z_loss)


@dataclass
class SoftmaxTopKConfig(RouterConfig):
    name: str = "softmax_topk"
    renormalize: bool = True
    """Renormalise the top-k weights to sum to 1."""
    load_balance_coef: float = 0.01
    """Switch/GShard load-balancing loss coefficient."""
    z_loss_coef: float = 0.001
    """ST-MoE router z-loss coefficient."""
    jitter_eps: float = 0.0
    """Multiplicative input jitter U(1-eps, 1+eps) in training (Switch); 0 = off."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): after each optimizer step, bias_e += rate * sign(mean load - load_e);
    the bias only affects which experts are selected. 0 = off."""
    init_std: float = 0.02

    def validate(self, moe: MoEConfig) -> None:
        for key in ("load_balance_coef", "z_loss_coef", "jitter_eps", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.router.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.jitter_eps >= 1:
            raise ConfigError("model.moe.router.jitter_eps", f"must be < 1, got {self.jitter_eps}")


class SoftmaxTopKRouter(PostHocSparsity, Router):
    def __init__(self, cfg: SoftmaxTopKConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__(cfg, d_model, num_experts, top_k)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)
        if cfg.bias_update_rate > 0:
            self.register_buffer("balance_bias_E", torch.zeros(num_experts))

    @property
    def loss_coefs(self) -> dict[str, float]:
        return {"load_balance": self.cfg.load_balance_coef, "z_loss": self.cfg.z_loss_coef}

    def forward(self, x_TD: Tensor, *, expert_w1_EFD: Tensor | None = None, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> RouterOutput:
        x_TD = x_TD.float()
        if self.training and self.cfg.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.cfg.jitter_eps, 1 + self.cfg.jitter_eps)
        logits_TE = self.alpha * F.linear(x_TD, self.proj.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        bias = getattr(self, "balance_bias_E", None)
        selection_TE = None if bias is None else probs_TE + bias
        if self.training:
            weights_TK, expert_ids_TK = topk_routing(probs_TE, self.top_k, self.cfg.renormalize, selection_TE)
        else:
            weights_TK, expert_ids_TK = self.eval_dispatch(probs_TE, self.cfg.renormalize, selection_TE)
        losses = {}
        if self.training and torch.is_grad_enabled():
            losses = {"load_balance": switch_load_balancing_loss(probs_TE, expert_ids_TK), "z_loss": z_loss(logits_TE)}
        return RouterOutput(probs_TE, expert_ids_TK, weights_TK, losses)

    @property
    def needs_step_counts(self) -> bool:
        return self.cfg.bias_update_rate > 0

    @torch.no_grad()
    def post_step(self, counts_E: Tensor) -> None:
        if self.cfg.bias_update_rate > 0:
            update_balance_bias(self.balance_bias_E, counts_E, self.cfg.bias_update_rate)

    @torch.no_grad()
    def diagnostics(self, expert_w1_EFD: Tensor | None) -> Diagnostics:
        """|cos| of each router row with its expert's top right singular vector (per expert), and the rows'
        specificity (own expert vs the others), for comparison with `mpi`. Collective under expert parallelism."""
        if expert_w1_EFD is None:
            return Diagnostics()
        v1_ED = gather_over_group(principal_right_singular(expert_w1_EFD)[1], self.ep_group)
        return Diagnostics(scalars={"softmax_topk/specificity": alignment_specificity(self.proj.weight, v1_ED).item()},
                           per_expert={"softmax_topk/alignment": direction_alignment(self.proj.weight, v1_ED)})
