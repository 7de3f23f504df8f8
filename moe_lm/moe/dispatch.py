"""Token dispatch and expert compute, in plain torch: no DeepSpeed here, so every piece is testable alone.

Shape suffixes: T tokens, D model width, F expert width, E experts (this rank's, in the compute functions),
K slots per token, N = K·T assignments, C capacity (buffer rows per expert).

The assignments are laid out slot-major (`expert_ids_TK.t()`, N = K·T): every token's first choice comes
before any second choice, which is GShard's priority when a capacity limit drops assignments. One stable sort of
that flat list by expert id gives, at once, the expert-major order the grouped GEMMs need and each assignment's
position in its expert's buffer: no [K, T, E] one-hot and no scan along an outer dimension (the int64 cumsum that
took a quarter of a GPU step), and nothing read back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ExpertOrder:
    """The slot-major assignments sorted by expert (stable, so priority order survives within an expert).

    order_N:     position in the slot-major list of the n-th assignment in expert-major order.
    location_N:  for each slot-major assignment, its position among the assignments of its expert (0-based).
    group_end_E: int32 cumulative row counts: expert e's rows are [group_end[e-1], group_end[e]) of the sorted
                 list. Unused slots (id -1) sort after the last expert and belong to no group.
    """

    def compute_group_end(self) -> Tensor:
        """`group_end_E` with the last group stretched over the unused slots' rows, so that every row belongs to a
        group (the kernels need no mask); those rows carry weight 0 in the combine."""
        return torch.cat([self.group_end_E[:-1], self.group_end_E.new_full((1,), self.order_N.numel())])

    order_N: Tensor
    location_N: Tensor
    group_end_E: Tensor


def sort_by_expert(expert_ids_TK: Tensor, num_experts: int) -> ExpertOrder:
    ids_N = expert_ids_TK.t().reshape(-1)
    keys_N = torch.where(ids_N >= 0, ids_N, num_experts)  # unused slots last
    sorted_keys_N, order_N = torch.sort(keys_N, stable=True)
    group_start = torch.searchsorted(sorted_keys_N, torch.arange(num_experts + 1, device=ids_N.device,
                                                                  dtype=sorted_keys_N.dtype))
    rank_in_group_N = torch.arange(ids_N.numel(), device=ids_N.device) - group_start[sorted_keys_N]
    location_N = torch.empty_like(rank_in_group_N).scatter_(0, order_N, rank_in_group_N)
    return ExpertOrder(order_N, location_N, group_start[1:].to(torch.int32))


def capacity_slots(expert_ids_TK: Tensor, weights_TK: Tensor, num_experts: int,
                   capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Place assignments in per-expert buffers of `capacity` slots; return (indices_KT, locations_KT, gates_KT).

    Slot-major priority, as GShard: every token's first choice claims a buffer position before any second
    choice. Assignments past the capacity are dropped (index -1, gate 0); ids of -1 are unused slots.
    """
    num_slots, num_tokens = expert_ids_TK.shape[1], expert_ids_TK.shape[0]
    ids_KT = expert_ids_TK.t()
    location_KT = sort_by_expert(expert_ids_TK, num_experts).location_N.view(num_slots, num_tokens)
    kept_KT = (ids_KT >= 0) & (location_KT < capacity)
    indices_KT = torch.where(kept_KT, ids_KT, -1).to(torch.int32)
    locations_KT = torch.where(kept_KT, location_KT, 0).to(torch.int32)
    gates_KT = torch.where(kept_KT, weights_TK.t().float(), 0.0)
    return indices_KT, locations_KT, gates_KT


def grouped_mm_supported(x: Tensor) -> bool:
    """`torch._grouped_mm` runs on CPU (measured faster than `looped` there, stacking included), and on CUDA for
    bf16 on Hopper or newer (its CUTLASS kernel)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


class _StridedStack(torch.autograd.Function):
    """The [E, ...] stack of E weights that lie `step` elements apart in one storage, as a view of it. Backward
    hands each weight its slice of the stacked gradient, as `torch.stack`'s does."""

    @staticmethod
    def forward(ctx, step: int, *weights: Tensor) -> Tensor:
        first = weights[0]
        return first.as_strided((len(weights), *first.shape), (step, *first.stride()), first.storage_offset())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return None, *grad.contiguous().unbind(0)


def strided_stack_step(weights: list[Tensor]) -> int | None:
    """The spacing, in elements, of `weights` (same shape, contiguous) in one storage, where they sit at equally
    spaced, non-overlapping offsets in order, so that their stack is a view of it; None elsewhere. On CUDA the view
    must also start and step on 16 bytes, as `_grouped_mm`'s kernel requires."""
    first = weights[0]
    step = weights[1].storage_offset() - first.storage_offset() if len(weights) > 1 else first.numel()
    storage = first.untyped_storage().data_ptr()
    aligned = first.device.type != "cuda" or (first.data_ptr() % 16 == 0 and step * first.element_size() % 16 == 0)
    laid_out = aligned and step >= first.numel() and all(
        w.untyped_storage().data_ptr() == storage and w.storage_offset() == first.storage_offset() + i * step
        and w.shape == first.shape and w.dtype == first.dtype and w.is_contiguous() for i, w in enumerate(weights))
    return step if laid_out else None


def stack_weights(weights: list[Tensor]) -> Tensor:
    """The experts' [E, ...] weight stack for the grouped and batched kernels: a view where the weights are laid out
    for it (`MoEFeedForward` packs them so, and DeepSpeed's flat bf16/ZeRO buffers keep that spacing), a copy
    otherwise. The copy costs a read and a write of every local expert weight per forward, again for the
    gradient, and autograd keeps it for backward."""
    step = strided_stack_step(weights)
    return torch.stack(weights) if step is None else _StridedStack.apply(step, *weights)


def _grouped_linear(x_ND: Tensor, w_EOI: Tensor, group_end_E: Tensor) -> Tensor:
    return torch._grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=group_end_E)


def _looped_linear(x_ND: Tensor, w_EOI: Tensor, group_end_E: Tensor) -> Tensor:
    """The plain reference: one matmul per expert over its rows (reads the group sizes back to the host)."""
    ends = group_end_E.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([F.linear(x_ND[start:end], w) for start, end, w in zip(starts, ends, w_EOI.unbind(0))])


def grouped_swiglu(x_ND: Tensor, w1_EFD: Tensor, w3_EFD: Tensor, w2_EDF: Tensor, group_end_E: Tensor,
                   impl: str = "auto") -> Tensor:
    """SwiGLU of expert e, silu(x W1ᵀ) ⊙ (x W3ᵀ) W2ᵀ, applied to the rows of each group (expert-major rows); the
    weights are stacked over the experts in group order (`stack_weights`). The groups cover every row
    (`group_end_E[-1]` = N; see `ExpertOrder.compute_group_end`): `_grouped_mm` leaves rows past the last group
    uninitialised.

    impl: "grouped" (`torch._grouped_mm`: one kernel per projection for all experts, no host sync), "looped" (a
    matmul per expert, the reference; one host read of the group sizes), or "auto" (grouped where
    `grouped_mm_supported`).
    """
    if impl == "auto":
        impl = "grouped" if grouped_mm_supported(x_ND) else "looped"
    linear = {"grouped": _grouped_linear, "looped": _looped_linear}[impl]
    hidden_NF = F.silu(linear(x_ND, w1_EFD, group_end_E)) * linear(x_ND, w3_EFD, group_end_E)
    return linear(hidden_NF, w2_EDF, group_end_E)


def batched_swiglu(x_ECD: Tensor, w1_EFD: Tensor, w3_EFD: Tensor, w2_EDF: Tensor) -> Tensor:
    """The same SwiGLU over equal-size expert buffers [E, C, D] (capacity dispatch): three batched matmuls."""
    hidden_ECF = F.silu(torch.bmm(x_ECD, w1_EFD.transpose(1, 2))) * torch.bmm(x_ECD, w3_EFD.transpose(1, 2))
    return torch.bmm(hidden_ECF, w2_EDF.transpose(1, 2))
