"""The router contract every moe-lm router implements.

Vocabulary (shape suffixes: T tokens, D model width, E experts, K selected slots per token, F expert width):
- logits_TE:     unnormalised router scores, fp32.
- probs_TE:      the full routing distribution, fp32, rows sum to 1. Load-balancing losses, entropy and the
                 metrics are computed from it.
- expert_ids_TK: the experts each token is dispatched to, int64; -1 marks an unused slot (routers that
                 choose a variable number of experts per token, e.g. a mass threshold, pad with -1).
- weights_TK:    the combine weights of those experts (0 where the id is -1).
- aux_losses:    named, *unscaled* auxiliary losses; each router's config owns their coefficients
                 (`Router.loss_coefs`), applied once by the DeepSpeed gate adapter in `moe_lm/moe/`.
- stats:         named scalar statistics to log (averaged over micro-batches and ranks).

A router never reaches into its parent module. What it needs beyond the tokens comes as an explicit
keyword from the MoE block: `expert_w1_EFD` (this rank's local experts' SwiGLU gate matrices, for routers
with `needs_expert_w1`), and `ep_group` (the expert-parallel process group, set once by DeepSpeed).
Routing math runs in fp32 whatever the activation dtype: softmax over bf16 logits loses ties and mass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_lm.config.schema import RouterConfig


@dataclass(frozen=True)
class RouterOutput:
    probs_TE: Tensor
    expert_ids_TK: Tensor
    weights_TK: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Base of all routers: holds the config, the top-k and the expert-parallel group.

    Subclasses implement `forward(x_TD, *, expert_w1_EFD=None) -> RouterOutput` and may override
    `post_step` (once-per-optimizer-step state such as an expert bias), `diagnostics` (costly, logged every
    `metrics.diagnostics_interval` steps) and `set_alpha` (routers with a post-hoc sharpness knob).
    Parameter names must not contain "expert": DeepSpeed sends such keys to the per-expert checkpoint files.
    """

    needs_expert_w1: bool = False

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__()
        self.cfg, self.d_model, self.num_experts, self.top_k = cfg, d_model, num_experts, top_k
        self.ep_group = None

    @property
    def loss_coefs(self) -> dict[str, float]:
        """Coefficient of each named aux loss in the training objective."""
        return {}

    @property
    def needs_step_counts(self) -> bool:
        """True when `post_step` uses its counts: the trainer then all-reduces them every step, not only when it
        logs."""
        return False

    def post_step(self, counts_E: Tensor) -> None:
        """Called once per optimizer step with this layer's global assignment counts of the step (only when
        `needs_step_counts`)."""

    def diagnostics(self, expert_w1_EFD: Tensor | None) -> dict[str, float]:
        """Costly router-specific measurements, logged at `metrics.diagnostics_interval`."""
        return {}

    @property
    def local_expert_offset(self) -> int:
        """Global id of this rank's first local expert (experts are sharded contiguously over the EP group)."""
        if self.ep_group is None or not torch.distributed.is_initialized():
            return 0
        ep_size = torch.distributed.get_world_size(self.ep_group)
        return torch.distributed.get_rank(self.ep_group) * (self.num_experts // ep_size)
