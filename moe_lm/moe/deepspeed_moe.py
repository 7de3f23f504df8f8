"""The one place that knows DeepSpeed-MoE: moe-lm's MoE FFN block as a DeepSpeed `MoE` layer.

DeepSpeed finds MoE layers by `isinstance(module, deepspeed.moe.layer.MoE)`: expert-parallel process groups, MoE
optimizer parameter groups and expert-sharded checkpoints (one file per global expert, keys
`...deepspeed_moe.experts.deepspeed_experts.{i}.*`) all hang on that, so `MoEFeedForward` subclasses `MoE` and keeps
its module tree. Its forward is moe-lm's own, in four stages:

1. route:    the router (behind `RouterGate`) picks experts and weights, and gives its aux losses;
2. dispatch: one by-expert sort of the assignments (`dispatch.sort_by_expert`); capacity drops zero a weight;
3. compute:  the local experts' SwiGLU as grouped GEMMs over expert-major rows (one process), or as batched GEMMs
             over equal-size capacity buffers exchanged with DeepSpeed's all-to-all (expert parallelism);
4. combine:  each token's expert outputs, weighted in fp32.

Pitfalls handled here: gate parameter names must not contain "expert" (DeepSpeed writes such keys to the
per-expert checkpoint files); `MoE` deep-copies one expert, so every expert is re-initialised from its own seed
(keyed by its *global* id, so the model is the same for any ep_size); the layer returns `l_aux` and the model adds
it to the loss.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from packaging.version import Version
from torch import Tensor, nn

from moe_lm.config.schema import MoEConfig
from moe_lm.metrics.routing import RoutingRecord
from moe_lm.model.layers import SwiGLU
from moe_lm.moe.dispatch import batched_swiglu, capacity_slots, grouped_swiglu, sort_by_expert, stack_weights
from moe_lm.routers import Router, RouterOutput
from moe_lm.routers.functional import assignment_counts, entropy

SUPPORTED_DEEPSPEED = (Version("0.19.4"), Version("0.20"))
if not SUPPORTED_DEEPSPEED[0] <= Version(deepspeed.__version__) < SUPPORTED_DEEPSPEED[1]:
    raise ImportError(f"moe-lm's MoE adapter is written against DeepSpeed-MoE "
                      f">={SUPPORTED_DEEPSPEED[0]},<{SUPPORTED_DEEPSPEED[1]}; installed: {deepspeed.__version__}")


def expert_capacity(num_tokens: int, slots: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """Buffer slots per expert: ceil(T·K/E · factor), at least `min_capacity` (GShard)."""
    return max(math.ceil(num_tokens * slots / num_experts * factor), min_capacity)


def balanced_assignment(num_tokens: int, slots: int, num_experts: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """`force_balanced_routing`: token t goes to experts (t + j) mod E with equal weights (benchmark switch)."""
    ids_TK = (torch.arange(num_tokens, device=device).unsqueeze(1) + torch.arange(slots, device=device)) % num_experts
    return torch.full((num_tokens, slots), 1.0 / slots, device=device), ids_TK


_recording = "records"  # "records", "counts" (assignment counts only) or "off"


@contextlib.contextmanager
def _recording_mode(mode: str) -> Iterator[None]:
    global _recording
    previous = _recording
    _recording = "off" if previous == "off" else mode  # nothing is recorded inside a paused forward
    try:
        yield
    finally:
        _recording = previous


def routing_records_paused() -> contextlib.AbstractContextManager[None]:
    """No routing records inside: activation checkpointing runs each block's forward again during backward, and
    the record of that recomputation must not replace (or cost as much as) the one taken in the forward."""
    return _recording_mode("off")


def routing_counts_only() -> contextlib.AbstractContextManager[None]:
    """Inside, each MoE layer keeps only its assignment counts (`RouterGate.counts_E`), no routing record: a
    training step that does not log needs at most the counts (routers with per-step state), and a record costs
    some twenty small kernels a layer, which a GPU step bound by the host pays in full."""
    return _recording_mode("counts")


class RouterGate(nn.Module):
    """A moe-lm `Router`, its weighted aux loss and the routing record of the last training micro-batch.

    Sits where DeepSpeed's `TopKGate` was (`deepspeed_moe.gate`), so checkpoint keys are
    `...deepspeed_moe.gate.router.*`. The record and the assignment counts are kept in training with grad enabled
    (or always, with `record_always`, for evaluation sweeps), never inside `routing_records_paused`; inside
    `routing_counts_only`, the counts alone.
    """

    def __init__(self, router: Router, moe_cfg: MoEConfig, local_expert_w1: Callable[[], Tensor]):
        super().__init__()
        self.router = router
        self.num_experts = moe_cfg.num_experts
        self.force_balanced_routing = moe_cfg.force_balanced_routing
        self.local_expert_w1 = local_expert_w1
        self.record: RoutingRecord | None = None
        self.counts_E: Tensor | None = None
        self.record_always = False

    def _set_ep_group(self, ep_group) -> None:
        """DeepSpeed hands the expert-parallel group to the gate once its groups exist; the router needs it."""
        self.router.ep_group = ep_group

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> tuple[RouterOutput, Tensor]:
        """(router output with the assignment to dispatch, l_aux = Σ coef · loss over its aux losses)."""
        expert_w1 = self.local_expert_w1() if self.router.needs_expert_w1 else None
        out = self.router(x_TD, expert_w1_EFD=expert_w1, token_ids_T=token_ids_T, sequence_length=sequence_length)
        if self.force_balanced_routing and not out.expert_choice:
            weights_TK, expert_ids_TK = balanced_assignment(*out.expert_ids_TK.shape, self.num_experts, x_TD.device)
            out = RouterOutput(out.probs_TE, expert_ids_TK, weights_TK, out.aux_losses, out.stats)
        coefs = self.router.loss_coefs
        l_aux = sum((coefs[name] * loss for name, loss in out.aux_losses.items()),
                    x_TD.new_zeros((), dtype=torch.float32))
        return out, l_aux

    def keep_record(self, out: RouterOutput, counts_E: Tensor, kept_counts_E: Tensor) -> None:
        if _recording == "off" or not ((self.training and torch.is_grad_enabled()) or self.record_always):
            return
        self.counts_E = counts_E
        if _recording == "records":
            self.record = routing_record(out, counts_E, kept_counts_E)


@torch.no_grad()
def routing_record(out: RouterOutput, counts_E: Tensor, kept_counts_E: Tensor) -> RoutingRecord:
    """Per-micro-batch sums from which `moe_lm.metrics` computes load balance, collapse and entropy."""
    if out.expert_choice:  # every pick is used; a token's mass is summed over the experts that picked it
        selected_mass = out.probs_TE.t().gather(1, out.token_ids_EC)
        active = torch.full((), float(out.token_ids_EC.numel()), device=counts_E.device)
    else:
        used_TK = out.expert_ids_TK >= 0
        selected_mass = out.probs_TE.gather(-1, out.expert_ids_TK.clamp_min(0)) * used_TK
        active = used_TK.sum().float()
    return RoutingRecord(
        counts_E=counts_E,
        kept_counts_E=kept_counts_E,
        probs_sum_E=out.probs_TE.sum(0),
        entropy_sum=entropy(out.probs_TE).sum(),
        topk_mass_sum=selected_mass.sum(),
        active_sum=active,
        num_tokens=torch.full((), float(out.probs_TE.shape[0]), device=counts_E.device),
        num_records=torch.ones((), device=counts_E.device),
        losses={name: loss.detach().float() for name, loss in out.aux_losses.items()},
        stats={name: value.detach().float() for name, value in out.stats.items()},
    )


def stable_seed(*parts: object) -> int:
    """A seed from a tuple of names and numbers, identical on every rank and Python process."""
    return zlib.crc32(repr(parts).encode())


class MoEFeedForward(MoE):
    """DeepSpeed's MoE layer with SwiGLU experts and a moe-lm router. forward(x) -> (y, l_aux).

    `expert_compute` ("auto", "grouped", "looped") picks the one-process expert kernel (`dispatch.grouped_swiglu`).
    """

    def __init__(self, d_model: int, d_expert: int, moe_cfg: MoEConfig, router: Router, ep_size: int,
                 ep_rank: int, init_std: float, out_init_std: float, seed: int, layer_idx: int):
        super().__init__(hidden_size=d_model, expert=SwiGLU(d_model, d_expert), num_experts=moe_cfg.num_experts,
                         ep_size=ep_size, k=moe_cfg.top_k, capacity_factor=moe_cfg.capacity_factor,
                         eval_capacity_factor=moe_cfg.eval_capacity_factor, min_capacity=moe_cfg.min_capacity,
                         drop_tokens=moe_cfg.drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
        self.deepspeed_moe.gate = RouterGate(router, moe_cfg, self.local_expert_w1)  # replaces DeepSpeed's TopKGate
        self.moe_cfg = moe_cfg
        self.expert_compute = "auto"
        self.global_expert_ids = [ep_rank * self.num_local_experts + i for i in range(self.num_local_experts)]
        for expert, global_id in zip(self.local_experts, self.global_expert_ids):
            generator = torch.Generator().manual_seed(stable_seed(seed, "expert", layer_idx, global_id))
            if expert.w1.weight.is_meta:
                continue
            for linear, std in ((expert.w1, init_std), (expert.w3, init_std), (expert.w2, out_init_std)):
                with torch.no_grad():
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)
        self._pack_local_experts()

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def gate(self) -> RouterGate:
        return self.deepspeed_moe.gate

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate.router

    def _pack_local_experts(self) -> None:
        """Move the local experts' weights into one storage, expert after expert in parameter order (the order of
        DeepSpeed's flat bf16/ZeRO buffers too), so that each matrix stacked over the experts is a strided view
        (`dispatch.stack_weights`), not a copy per forward. The weights stay separate parameters: DeepSpeed's
        per-expert checkpoint files and keys, and its expert parameter groups, depend on it."""
        weights = [param for expert in self.local_experts for param in expert.parameters()]
        if len({(w.device, w.dtype) for w in weights}) != 1 or weights[0].is_meta:
            return
        with torch.no_grad():
            flat = torch.cat([w.reshape(-1) for w in weights])
        offset = 0
        for w in weights:
            w.data = flat[offset:offset + w.numel()].view_as(w)
            offset += w.numel()

    def _apply(self, fn, recurse=True):
        """`module.to(...)` and the like give every parameter a storage of its own: pack them again."""
        module = super()._apply(fn, recurse)
        self._pack_local_experts()
        return module

    def local_expert_w1(self) -> Tensor:
        """SwiGLU gate matrices of this rank's experts, [E_local, F, D] (autograd intact)."""
        return stack_weights([expert.w1.weight for expert in self.local_experts])

    def _local_expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The local experts' W1, W3 ([E_local, F, D]) and W2 ([E_local, D, F]) stacks."""
        experts = self.local_experts
        return tuple(stack_weights([getattr(e, name).weight for e in experts]) for name in ("w1", "w3", "w2"))

    def _capacity(self, num_tokens: int) -> int:
        """Buffer slots per expert for top_k assignments per token, however many slots the router fills: threshold
        dispatch pads K = k_max slots, and a larger K must not buy larger buffers than training had."""
        factor = self.moe_cfg.capacity_factor if self.training else self.moe_cfg.eval_capacity_factor
        return expert_capacity(num_tokens, self.moe_cfg.top_k, self.num_experts, factor, self.moe_cfg.min_capacity)

    def forward(self, x_BSD: Tensor, token_ids_BS: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, S, D] (or [T, D]); `token_ids_BS`, the input ids of those positions, for routers that hash them."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        token_ids_T = None if token_ids_BS is None else token_ids_BS.reshape(-1)
        out, l_aux = self.gate(x_TD, token_ids_T, x_BSD.shape[-2] if x_BSD.dim() == 3 else None)
        if out.expert_choice:
            y_TD, counts_E = self._compute_expert_choice(x_TD, out.token_ids_EC, out.weights_EC)
            kept_counts_E = counts_E
        else:
            compute = self._compute_local if self.ep_size == 1 else self._compute_expert_parallel
            y_TD, counts_E, kept_counts_E = compute(x_TD, out.expert_ids_TK, out.weights_TK)
        self.gate.keep_record(out, counts_E, kept_counts_E)
        return y_TD.view_as(x_BSD), l_aux

    def _exchange_and_compute(self, buffers_ECD: Tensor) -> Tensor:
        """Expert parallelism: [E, C, D] buffers (experts in global order) to their owners by DeepSpeed's all-to-all,
        batched SwiGLU over each local expert's [ep·C, D] rows, and back; returns [E, C, D] outputs."""
        ep, local, capacity = self.ep_size, self.num_local_experts, buffers_ECD.shape[1]
        group = self.deepspeed_moe.ep_group
        received = _AllToAll.apply(group, buffers_ECD)  # [ep (source rank), local, C, D]
        local_LRD = received.view(ep, local, capacity, -1).transpose(0, 1).reshape(local, ep * capacity, -1)
        y_LRD = batched_swiglu(local_LRD, *self._local_expert_weights())
        return _AllToAll.apply(group, y_LRD.view(local, ep, capacity, -1).transpose(0, 1).reshape_as(buffers_ECD))

    def _compute_expert_choice(self, x_TD: Tensor, token_ids_EC: Tensor, weights_EC: Tensor) -> tuple[Tensor, Tensor]:
        """Each expert takes its C picked tokens: rows are expert-major already, and every pick is kept. A token's
        outputs are summed over the experts that picked it (any number, zero included); returns (y_TD, counts_E)."""
        num_experts, capacity = token_ids_EC.shape
        rows_ND = x_TD.index_select(0, token_ids_EC.reshape(-1))
        if self.ep_size == 1:
            group_end_E = torch.arange(1, num_experts + 1, device=x_TD.device, dtype=torch.int32) * capacity
            y_ND = grouped_swiglu(rows_ND, *self._local_expert_weights(), group_end_E, self.expert_compute)
        else:
            y_ND = self._exchange_and_compute(rows_ND.view(num_experts, capacity, -1)).reshape(rows_ND.shape)
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, token_ids_EC.reshape(-1), y_ND.float() * weights_EC.reshape(-1, 1).float())
        counts_E = torch.full((num_experts,), float(capacity), device=x_TD.device)
        return y_TD.to(x_TD.dtype), counts_E

    def _compute_local(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All experts on this rank: grouped GEMMs over exactly the routed rows (no capacity padding).

        A capacity limit drops the assignments past each expert's first C (slot-major priority) by zeroing their
        weight; returns (y_TD, counts_E, kept_counts_E).
        """
        num_tokens, slots = expert_ids_TK.shape
        order = sort_by_expert(expert_ids_TK, self.num_experts)
        counts_E = torch.diff(order.group_end_E, prepend=order.group_end_E.new_zeros(1)).float()
        weights_KT = torch.where(expert_ids_TK.t() >= 0, weights_TK.t().float(), 0.0)  # unused slots add nothing
        kept_counts_E = counts_E
        if self.moe_cfg.drop_tokens:
            capacity = self._capacity(num_tokens)
            kept_KT = order.location_N.view(slots, num_tokens) < capacity
            weights_KT = torch.where(kept_KT, weights_KT, 0.0)
            kept_counts_E = counts_E.clamp_max(capacity)
        rows_ND = x_TD.index_select(0, order.order_N % num_tokens)  # token of each expert-major row
        y_ND = grouped_swiglu(rows_ND, *self._local_expert_weights(), order.compute_group_end(), self.expert_compute)
        y_KTD = torch.empty_like(y_ND).index_copy_(0, order.order_N, y_ND).view(slots, num_tokens, -1)
        y_TD = (y_KTD.float() * weights_KT.unsqueeze(-1)).sum(0).to(x_TD.dtype)
        return y_TD, counts_E, kept_counts_E

    def _compute_expert_parallel(self, x_TD: Tensor, expert_ids_TK: Tensor,
                                 weights_TK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Experts sharded over the EP group: equal-size buffers [E, C, D] through DeepSpeed's all-to-all.

        Dropless needs one capacity for the whole group (all-to-all chunks must match): the busiest expert's load,
        max-reduced over the group and read back to the host once per layer.
        """
        num_tokens, slots = expert_ids_TK.shape
        counts_E = assignment_counts(expert_ids_TK, self.num_experts)
        if self.moe_cfg.drop_tokens:
            capacity = self._capacity(num_tokens)
        else:
            busiest = counts_E.max().clamp_min(1).to(torch.int64)
            dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=self.deepspeed_moe.ep_group)
            capacity = int(busiest)
        indices_KT, locations_KT, gates_KT = capacity_slots(expert_ids_TK, weights_TK, self.num_experts, capacity)
        trash = self.num_experts * capacity  # dropped assignments park on one extra slot
        slot_N = torch.where(indices_KT >= 0, indices_KT.long() * capacity + locations_KT.long(), trash).reshape(-1)
        token_N = torch.arange(num_tokens, device=x_TD.device).repeat(slots)
        source_S = torch.full((trash + 1,), num_tokens, dtype=torch.long, device=x_TD.device)
        source_S.scatter_(0, slot_N, token_N)  # slots nothing routes to read the zero row
        padded_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
        buffers_ECD = padded_TD.index_select(0, source_S[:-1]).view(self.num_experts, capacity, -1)
        y_ECD = self._exchange_and_compute(buffers_ECD)
        padded_SD = torch.cat([y_ECD.reshape(trash, -1), y_ECD.new_zeros(1, y_ECD.shape[-1])])
        routed_KTD = padded_SD.index_select(0, slot_N).view(slots, num_tokens, -1)
        y_TD = (routed_KTD.float() * gates_KT.unsqueeze(-1)).sum(0).to(x_TD.dtype)
        return y_TD, counts_E, counts_E.clamp_max(capacity)
