"""Routing math shared by the routers and the MoE layer, as pure functions (testable without building a layer).

Router-specific math lives beside its router (`grmoe_math.py`, `mpi.py`); the router/expert alignment diagnostics
shared by several routers live in `alignment.py`.

Shape suffixes: T tokens, E experts, K selected slots per token.
"""

from __future__ import annotations

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


def gather_over_group(x_E: Tensor, group) -> Tensor:
    """Concatenate a per-expert tensor over an expert-parallel `group` along dim 0, differentiably.

    Rank i of the group holds experts [i·L, (i+1)·L), so the result is in global expert order. Backward sums,
    for each rank's slice, the gradients from every rank (a reduce-scatter, all-to-all + sum on gloo), so the
    rank that computed a slice receives the whole gradient of it. Identity without a group or with one rank.
    """
    if group is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x_E
    return torch.cat(dist_fn.all_gather(x_E, group=group), dim=0)


def renormalize_weights(weights_TK: Tensor) -> Tensor:
    """w_tk / Σ_k' w_tk': each token's combine weights summed to 1 (Mixtral); a row of zeros stays zero."""
    return weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)


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
    return (renormalize_weights(weights_TK) if renormalize else weights_TK), expert_ids_TK


def mass_threshold_routing(probs_TE: Tensor, tau: float, max_experts: int,
                           renormalize: bool) -> tuple[Tensor, Tensor]:
    """Top-p dispatch: each token gets the smallest set of most probable experts whose mass reaches τ,
    k(x) = min{k : Σ_{j<=k} p_(j)(x) >= τ}, capped at `max_experts`; return (weights_TK, expert_ids_TK) with
    K = max_experts and id -1 / weight 0 in the unused slots. [DERIVED, §1.5]

    Sharper distributions need fewer experts: since the top-k mass of softmax(α·s) never falls as α grows,
    the mean k(x) never rises with α; sweeping α and τ after training traces a PPL-vs-compute curve
    (`PostHocSparsity`, for every router whose probabilities are a softmax).
    """
    sorted_probs_TK, expert_ids_TK = probs_TE.topk(max_experts, dim=-1)
    mass_before_TK = sorted_probs_TK.cumsum(-1) - sorted_probs_TK  # mass of the better experts
    used_TK = mass_before_TK < tau
    used_TK[:, 0] = True  # at least one expert, even for τ = 0
    weights_TK = torch.where(used_TK, sorted_probs_TK, torch.zeros_like(sorted_probs_TK))
    if renormalize:
        weights_TK = renormalize_weights(weights_TK)
    return weights_TK, torch.where(used_TK, expert_ids_TK, torch.full_like(expert_ids_TK, -1))


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


def entropy(probs_E: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dim, H(p) = −Σ_e p_e log p_e with 0 log 0 = 0; log E when uniform.

    Any leading dims ([T, E] -> [T], [L, E] -> [L]). The clamp inside the log keeps the gradient finite where a
    probability underflows to 0 (grmoe's balance loss differentiates it)."""
    return -(probs_E * probs_E.clamp_min(torch.finfo(probs_E.dtype).tiny).log()).sum(-1)
