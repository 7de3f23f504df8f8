"""The router contract every moe-lm router implements.

Vocabulary (shape suffixes: T tokens, D model width, E experts, K selected slots per token, F expert width):
- logits_TE:     unnormalised router scores, fp32.
- probs_TE:      the full routing distribution, fp32, rows sum to 1. Load-balancing losses, entropy and the
                 metrics are computed from it.
A router returns one of two assignments:
- token choice (each token picks experts):
  expert_ids_TK: the experts each token is dispatched to, int64; -1 marks an unused slot (routers that
                 choose a variable number of experts per token, e.g. a mass threshold, pad with -1).
  weights_TK:    the combine weights of those experts (0 where the id is -1).
  The MoE layer applies the capacity limit (`model.moe.capacity_factor`, or dropless).
- expert choice (each expert picks tokens, so it sets its own capacity C and drops nothing it picked):
  token_ids_EC:  the tokens each expert takes, int64 [E, C], every row over all experts (global ids).
  weights_EC:    their combine weights.
- aux_losses:    named, *unscaled* auxiliary losses; each router's config owns their coefficients
                 (`Router.loss_coefs`), applied once by the DeepSpeed gate adapter in `moe_lm/moe/`.
- stats:         named scalar statistics to log (averaged over micro-batches and ranks).
Costly measurements (`Router.diagnostics`, every `metrics.diagnostics_interval` steps) come as `Diagnostics`:
scalars, and per-expert values over all E experts.

A router never reaches into its parent module. What it needs beyond the hidden states comes as an explicit
keyword from the MoE block: `expert_w1_EFD` (this rank's local experts' SwiGLU gate matrices, for routers
with `needs_expert_w1`), `token_ids_T` (the input token id at each position, for hash routing) and
`sequence_length` (tokens come as whole sequences of this length, T = batch · sequence_length), plus
`ep_group` (the expert-parallel process group, set once by DeepSpeed).
Routing math runs in fp32 whatever the activation dtype: softmax over bf16 logits loses ties and mass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_lm.config.schema import RouterConfig
from moe_lm.routers.functional import mass_threshold_routing, topk_routing


@dataclass(frozen=True)
class RouterOutput:
    probs_TE: Tensor
    expert_ids_TK: Tensor | None
    weights_TK: Tensor | None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    token_ids_EC: Tensor | None = None
    weights_EC: Tensor | None = None

    @property
    def expert_choice(self) -> bool:
        return self.token_ids_EC is not None


@dataclass(frozen=True)
class Diagnostics:
    """A router's costly measurements, logged as `router/<name>` (docs/metrics.md).

    scalars:    one number per name; logged as the mean over MoE layers.
    per_expert: an [E] tensor per name, over all experts in global id order (gathered over the EP group); logged
                as `<name>_mean` (mean over experts, then over layers), and with `metrics.per_layer` as
                `<name>/e{id}` per expert.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    per_expert: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """The scalars and, for each per-expert name, its mean over the experts as `<name>_mean`."""
        means = {f"{name}_mean": values_E.float().mean().item() for name, values_E in self.per_expert.items()}
        return self.scalars | means

    def expert_values(self) -> dict[str, float]:
        """Every per-expert value, as `<name>/e{id}`."""
        return {f"{name}/e{e}": value for name, values_E in self.per_expert.items()
                for e, value in enumerate(values_E.tolist())}


class Router(nn.Module):
    """Base of all routers: holds the config, the top-k and the expert-parallel group.

    Subclasses implement `forward(x_TD, *, expert_w1_EFD=None, token_ids_T=None, sequence_length=None) ->
    RouterOutput` and may override
    `post_step` (once-per-optimizer-step state such as an expert bias), `diagnostics` (costly, logged every
    `metrics.diagnostics_interval` steps); routers with post-hoc knobs also mix in `PostHocSparsity`.
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

    def diagnostics(self, expert_w1_EFD: Tensor | None) -> Diagnostics:
        """Costly router-specific measurements, logged at `metrics.diagnostics_interval`."""
        return Diagnostics()

    @property
    def local_expert_offset(self) -> int:
        """Global id of this rank's first local expert (experts are sharded contiguously over the EP group)."""
        if self.ep_group is None or not torch.distributed.is_initialized():
            return 0
        ep_size = torch.distributed.get_world_size(self.ep_group)
        return torch.distributed.get_rank(self.ep_group) * (self.num_experts // ep_size)


class PostHocSparsity:
    """Post-hoc sparsity knobs of a router whose probabilities are softmax(α·logits) (grmoe: α·s; softmax_topk and
    mpi: α = 1/T, an inverse temperature), set after training without retraining (`moe-lm eval --sweep`):

    - `set_alpha(α)`: the sharpness of the softmax; routing entropy falls as α grows;
    - `set_eval_threshold(τ, k_max)`: evaluation dispatch; τ = 0 is the top-k, τ > 0 gives each token the smallest
      set of most probable experts holding mass >= τ, at most k_max (`mass_threshold_routing`), so the number of
      experts per token follows α.

    A router mixes it in before `Router` (`class R(PostHocSparsity, Router)`), multiplies its logits by
    `self.alpha` and dispatches evaluation with `eval_dispatch`. Defaults: α = 1, τ = 0, k_max = top_k.
    """

    top_k: int  # both from Router
    num_experts: int
    alpha: float = 1.0
    eval_threshold: float = 0.0
    max_experts: int = 0
    """k_max of threshold dispatch; 0 = top_k."""

    def set_alpha(self, alpha: float) -> None:
        """Sharpness α of softmax(α·logits) from now on (training and evaluation)."""
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def set_eval_threshold(self, tau: float, max_experts: int | None = None) -> None:
        """Evaluation dispatch: τ = 0 → top-k; τ > 0 → smallest expert set with mass >= τ, at most `max_experts`
        (None keeps the current cap)."""
        if not 0 <= tau <= 1:
            raise ValueError(f"eval threshold must be in [0, 1], got {tau}")
        if max_experts is not None and not 1 <= max_experts <= self.num_experts:
            raise ValueError(f"max_experts (k_max) must be in [1, {self.num_experts}] (the number of experts), "
                             f"got {max_experts}")
        self.eval_threshold = float(tau)
        if max_experts is not None:
            self.max_experts = int(max_experts)

    def eval_dispatch(self, probs_TE: Tensor, renormalize: bool,
                      selection_scores_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(weights_TK, expert_ids_TK) of evaluation: the top-k (chosen by `selection_scores_TE` if given, as in
        training) at τ = 0; else the mass threshold on `probs_TE`, K = k_max with -1 in the unused slots."""
        if self.eval_threshold > 0:
            return mass_threshold_routing(probs_TE, self.eval_threshold, self.max_experts or self.top_k, renormalize)
        return topk_routing(probs_TE, self.top_k, renormalize, selection_scores_TE)
