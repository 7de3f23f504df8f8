"""`expert_choice`: experts pick their tokens (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
NeurIPS 2022, arXiv 2202.09368, §3.2).

    S = softmax(X W_g)            [T, E], the token-to-expert scores (probs_TE)
    I = TopK(Sᵀ, C)               [E, C], expert e takes the C tokens with the highest S[:, e]
    G[e, c] = S[I[e, c], e]       [E, C], the combine weights (the paper's G)
    y_t = Σ_{(e, c): I[e, c] = t} G[e, c] · FFN_e(x_t)

C = ceil(T·k/E · cf) tokens per expert (the paper's k = n·c/e, with its capacity factor c, the average number of
experts per token, taken here as k = `model.moe.top_k` times the router's `capacity_factor`). Every expert gets
exactly C tokens, so the load is balanced by construction and no load-balancing loss is needed; a token may be
picked by any number of experts, none included (the residual stream then carries it). C depends only on shapes,
so it is known on the host and nothing is read back from the device.

Selection over the whole micro-batch (`selection="batch"`, the paper) makes a token's routing depend on every
other token of the micro-batch: later positions and other sequences, and so on how the global batch is split over
ranks. `selection="sequence"` picks C_s = ceil(S·k/E · cf) tokens per expert within each sequence of length S,
so routing depends only on the same sequence (later positions of it included: expert choice is never causal).
See docs/routers/expert_choice.md.

Shape suffixes: T tokens (= B·S), D model width, E experts, C tokens per expert, B sequences, S positions per
sequence, P tokens per expert and sequence (C = B·P under `selection="sequence"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lm.config.schema import ConfigError, MoEConfig, RouterConfig
from moe_lm.routers.base import Router, RouterOutput
from moe_lm.routers.functional import z_loss

SELECTIONS = ("batch", "sequence")


@dataclass
class ExpertChoiceConfig(RouterConfig):
    name: str = "expert_choice"
    capacity_factor: float = 1.0
    """cf in C = ceil(T·k/E · cf), k = model.moe.top_k: each token goes to k·cf experts on average. The router
    sets its own capacity; model.moe.capacity_factor, eval_capacity_factor, min_capacity and drop_tokens do not
    apply to it."""
    selection: str = "batch"
    """Where each expert picks its tokens: "batch" (top-C over the T tokens of the micro-batch, as in the paper)
    or "sequence" (top-C_s within each sequence: no dependence on other sequences or on the split over ranks)."""
    z_loss_coef: float = 0.0
    """ST-MoE router z-loss coefficient; 0 = off (the paper uses none)."""
    init_std: float = 0.02
    """Std of the normal init of W_g."""

    def validate(self, moe: MoEConfig) -> None:
        if not 0 < self.capacity_factor < math.inf:
            raise ConfigError("model.moe.router.capacity_factor", f"must be finite and > 0, got {self.capacity_factor}")
        if self.selection not in SELECTIONS:
            raise ConfigError("model.moe.router.selection", f"must be one of {SELECTIONS}, got {self.selection!r}")
        if self.z_loss_coef < 0:
            raise ConfigError("model.moe.router.z_loss_coef", f"must be >= 0, got {self.z_loss_coef}")


def tokens_per_expert(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(T·k/E · cf), at least 1 and at most T (an expert cannot take a token twice)."""
    return min(max(math.ceil(num_tokens * top_k / num_experts * capacity_factor), 1), num_tokens)


def expert_choice_selection(probs_TE: Tensor, capacity: int,
                            sequence_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Each expert's top-`capacity` tokens by score; returns (weights_EC, token_ids_EC), token ids int64 over T.

    `sequence_length` None: the top-C of each column of probs_TE (selection over all T tokens).
    `sequence_length` S: T = B·S tokens as B whole sequences; each expert takes its top-P tokens (P = `capacity`)
    within every sequence, so C = B·P and row e lists sequence 0's picks, then sequence 1's, ...
    The weights are the picked scores themselves (autograd flows through them into probs_TE).
    """
    if sequence_length is None:
        weights_EC, token_ids_EC = probs_TE.t().topk(capacity, dim=-1)
        return weights_EC.contiguous(), token_ids_EC.contiguous()
    num_tokens, num_experts = probs_TE.shape
    num_sequences = num_tokens // sequence_length
    probs_BES = probs_TE.view(num_sequences, sequence_length, num_experts).transpose(1, 2)
    weights_BEP, positions_BEP = probs_BES.topk(capacity, dim=-1)
    starts_B11 = torch.arange(num_sequences, device=probs_TE.device).view(-1, 1, 1) * sequence_length
    token_ids_BEP = positions_BEP + starts_B11
    # [B, E, P] -> [E, B·P]: the transpose makes reshape copy, so both come out contiguous
    return (weights_BEP.transpose(0, 1).reshape(num_experts, -1),
            token_ids_BEP.transpose(0, 1).reshape(num_experts, -1))


class ExpertChoiceRouter(Router):
    """1. scores S = softmax(x W_g) in fp32; 2. C (or C_s) from the shapes; 3. each expert's top tokens by S;
    4. combine weights G = their scores; 5. the optional z-loss, and the share of tokens no expert picked."""

    def __init__(self, cfg: ExpertChoiceConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__(cfg, d_model, num_experts, top_k)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)

    @property
    def loss_coefs(self) -> dict[str, float]:
        return {"z_loss": self.cfg.z_loss_coef}

    def capacity(self, num_tokens: int, sequence_length: int | None = None) -> tuple[int, int | None]:
        """(tokens per expert in each selection group, the group length or None for the whole batch).

        Under `selection="sequence"`, a call without `sequence_length` (a flat [T, D] input) is one sequence."""
        if self.cfg.selection == "batch":
            return tokens_per_expert(num_tokens, self.top_k, self.num_experts, self.cfg.capacity_factor), None
        length = num_tokens if sequence_length is None else sequence_length
        if length <= 0 or num_tokens % length:
            raise ValueError(f"expert_choice: {num_tokens} tokens are not whole sequences of length {length}")
        return tokens_per_expert(length, self.top_k, self.num_experts, self.cfg.capacity_factor), length

    def forward(self, x_TD: Tensor, *, expert_w1_EFD: Tensor | None = None, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> RouterOutput:
        capacity, group_length = self.capacity(x_TD.shape[0], sequence_length)
        # fp32 with autocast off: top-C over bf16 scores would tie many tokens, and the weights are the scores
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.proj.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            weights_EC, token_ids_EC = expert_choice_selection(probs_TE, capacity, group_length)
        losses = {}
        if self.training and torch.is_grad_enabled() and self.cfg.z_loss_coef > 0:
            losses["z_loss"] = z_loss(logits_TE)
        stats = {"unpicked_share": unpicked_share(token_ids_EC, x_TD.shape[0])}
        return RouterOutput(probs_TE, None, None, losses, stats, token_ids_EC=token_ids_EC, weights_EC=weights_EC)


@torch.no_grad()
def unpicked_share(token_ids_EC: Tensor, num_tokens: int) -> Tensor:
    """Share of the T tokens that no expert picked (they skip the MoE layer), fp32 scalar on the device."""
    picks_T = torch.zeros(num_tokens, dtype=torch.float32, device=token_ids_EC.device)
    picks_T.index_add_(0, token_ids_EC.reshape(-1), torch.ones(token_ids_EC.numel(), device=token_ids_EC.device))
    return (picks_T == 0).float().mean()
