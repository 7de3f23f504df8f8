"""The one place that knows DeepSpeed-MoE: our router behind its gate contract, and the MoE FFN block.

DeepSpeed finds MoE layers by `isinstance(module, deepspeed.moe.layer.MoE)` (expert parallel groups, MoE
optimizer groups, expert-sharded checkpoints) and gates by `isinstance(gate, TopKGate)` (timers), so
`MoEFeedForward` subclasses `MoE` and `RouterGate` subclasses `TopKGate`, replacing DeepSpeed's linear
softmax gating by any registered router.

Gate contract of DeepSpeed >= 0.19.4 (`MOELayer.forward`, sparse routes):
    gate(x_TD, used_token, sparse_routes=True, use_tutel) ->
        (l_aux, capacity C, num_experts E, indices_KT int32 (-1 = dropped), locations_KT int32, gates_KT fp32,
         exp_counts_E)
Pitfalls handled here: gate parameter names must not contain "expert" (DeepSpeed writes such keys to the
per-expert checkpoint files); `MoE` deep-copies one expert, so we re-initialise every expert from its own
seed (keyed by its *global* id, so the model is the same for any ep_size); random token selection and
sampled second experts are off, so routing is a function of the seed; the layer does not add `l_aux` to the
loss, the model does.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from packaging.version import Version
from torch import Tensor, nn

from moe_lm.config.schema import MoEConfig
from moe_lm.model.layers import SwiGLU
from moe_lm.routers import Router, RouterOutput
from moe_lm.routers.functional import assignment_counts, entropy

SUPPORTED_DEEPSPEED = (Version("0.19.4"), Version("0.20"))
if not SUPPORTED_DEEPSPEED[0] <= Version(deepspeed.__version__) < SUPPORTED_DEEPSPEED[1]:
    raise ImportError(f"moe-lm's gate adapter speaks the DeepSpeed-MoE gate contract of "
                      f">={SUPPORTED_DEEPSPEED[0]},<{SUPPORTED_DEEPSPEED[1]}; installed: {deepspeed.__version__}")


def expert_capacity(num_tokens: int, slots: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """Buffer slots per expert: ceil(T·K/E · factor), at least `min_capacity` (GShard)."""
    return max(math.ceil(num_tokens * slots / num_experts * factor), min_capacity)


def capacity_slots(expert_ids_TK: Tensor, weights_TK: Tensor, num_experts: int,
                   capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Place assignments in per-expert buffers of `capacity` slots; return (indices_KT, locations_KT, gates_KT).

    Slot-major priority, as GShard: every token's first choice claims a buffer position before any second
    choice. Assignments past the capacity are dropped (index -1, gate 0); ids of -1 are unused slots.
    """
    ids_KT = expert_ids_TK.t()
    used_KT = ids_KT >= 0
    one_hot_KTE = F.one_hot(ids_KT.clamp_min(0), num_experts) * used_KT.unsqueeze(-1)
    position_KTE = one_hot_KTE.flatten(0, 1).cumsum(0).view_as(one_hot_KTE) - 1
    location_KT = position_KTE.gather(-1, ids_KT.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kept_KT = used_KT & (location_KT < capacity)
    indices_KT = torch.where(kept_KT, ids_KT, -1).to(torch.int32)
    locations_KT = torch.where(kept_KT, location_KT, 0).to(torch.int32)
    gates_KT = torch.where(kept_KT, weights_TK.t().float(), 0.0)
    return indices_KT, locations_KT, gates_KT


def balanced_assignment(num_tokens: int, slots: int, num_experts: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """`force_balanced_routing`: token t goes to experts (t + j) mod E with equal weights (benchmark switch)."""
    ids_TK = (torch.arange(num_tokens, device=device).unsqueeze(1) + torch.arange(slots, device=device)) % num_experts
    return torch.full((num_tokens, slots), 1.0 / slots, device=device), ids_TK


class RouterGate(TopKGate):
    """A moe-lm `Router` behind DeepSpeed's `TopKGate` contract, plus capacity and the routing record.

    1. route: the router gives probs_TE, expert_ids_TK, weights_TK and its unscaled aux losses;
    2. capacity: fixed (`capacity_factor`) or dropless (the busiest expert's load, max over the EP group);
    3. slots: assignments past capacity are dropped;
    4. l_aux = Σ coef · loss over the router's losses (the model adds it to the LM loss);
    5. record: in training with grad enabled (or always, with `record_always`, for evaluation sweeps), the sums
       the metrics need are kept in `self.record`.
    """

    def __init__(self, router: Router, moe_cfg: MoEConfig, d_model: int,
                 local_expert_w1: Callable[[], Tensor]):
        super().__init__(d_model, moe_cfg.num_experts, k=moe_cfg.top_k, capacity_factor=moe_cfg.capacity_factor,
                         eval_capacity_factor=moe_cfg.eval_capacity_factor, min_capacity=moe_cfg.min_capacity,
                         noisy_gate_policy=None, drop_tokens=moe_cfg.drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=False)
        del self.wg  # DeepSpeed's own linear gate: the router replaces it
        self.router = router
        self.num_experts = moe_cfg.num_experts
        self.force_balanced_routing = moe_cfg.force_balanced_routing
        self.local_expert_w1 = local_expert_w1
        self.record: dict[str, Tensor] | None = None
        self.record_always = False

    def _set_ep_group(self, ep_group) -> None:
        super()._set_ep_group(ep_group)
        self.router.ep_group = ep_group

    def _capacity(self, counts_E: Tensor, num_tokens: int, slots: int) -> int:
        if self.drop_tokens:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            return expert_capacity(num_tokens, slots, self.num_experts, factor, self.min_capacity)
        busiest = counts_E.max().clamp_min(1).to(torch.int64)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=self.ep_group)  # all-to-all chunks must match
        return int(busiest)

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise RuntimeError("RouterGate implements the sparse-route gate contract of DeepSpeed >= 0.19.4 only")
        expert_w1 = self.local_expert_w1() if self.router.needs_expert_w1 else None
        out = self.router(input, expert_w1_EFD=expert_w1)
        weights_TK, expert_ids_TK = out.weights_TK, out.expert_ids_TK
        num_tokens, slots = expert_ids_TK.shape
        if self.force_balanced_routing:
            weights_TK, expert_ids_TK = balanced_assignment(num_tokens, slots, self.num_experts, input.device)
        counts_E = assignment_counts(expert_ids_TK, self.num_experts)
        capacity = self._capacity(counts_E, num_tokens, slots)
        indices_KT, locations_KT, gates_KT = capacity_slots(expert_ids_TK, weights_TK, self.num_experts, capacity)
        coefs = self.router.loss_coefs
        l_aux = sum((coefs[name] * loss for name, loss in out.aux_losses.items()),
                    input.new_zeros((), dtype=torch.float32))
        if (self.training and torch.is_grad_enabled()) or self.record_always:
            self.record = routing_record(out, expert_ids_TK, counts_E, indices_KT, self.num_experts)
        return l_aux, capacity, self.num_experts, indices_KT, locations_KT, gates_KT, counts_E


@torch.no_grad()
def routing_record(out: RouterOutput, expert_ids_TK: Tensor, counts_E: Tensor, indices_KT: Tensor,
                   num_experts: int) -> dict[str, Tensor]:
    """Per-micro-batch sums from which `moe_lm.metrics` computes load balance, collapse and entropy."""
    used_TK = expert_ids_TK >= 0
    selected_mass = out.probs_TE.gather(-1, expert_ids_TK.clamp_min(0)) * used_TK
    record = {
        "counts_E": counts_E,
        "kept_counts_E": assignment_counts(indices_KT.long(), num_experts),
        "probs_sum_E": out.probs_TE.sum(0),
        "entropy_sum": entropy(out.probs_TE).sum(),
        "topk_mass_sum": selected_mass.sum(),
        "active_sum": used_TK.sum().float(),
        "num_tokens": torch.tensor(float(expert_ids_TK.shape[0]), device=counts_E.device),
    }
    record.update({f"loss/{name}": loss.detach().float() for name, loss in out.aux_losses.items()})
    record.update({f"stat/{name}": value.detach().float() for name, value in out.stats.items()})
    return record


def stable_seed(*parts: object) -> int:
    """A seed from a tuple of names and numbers, identical on every rank and Python process."""
    return zlib.crc32(repr(parts).encode())


class MoEFeedForward(MoE):
    """DeepSpeed's MoE layer with SwiGLU experts and a moe-lm router. forward(x) -> (y, l_aux)."""

    def __init__(self, d_model: int, d_expert: int, moe_cfg: MoEConfig, router: Router, ep_size: int,
                 ep_rank: int, init_std: float, out_init_std: float, seed: int, layer_idx: int):
        super().__init__(hidden_size=d_model, expert=SwiGLU(d_model, d_expert), num_experts=moe_cfg.num_experts,
                         ep_size=ep_size, k=moe_cfg.top_k, capacity_factor=moe_cfg.capacity_factor,
                         eval_capacity_factor=moe_cfg.eval_capacity_factor, min_capacity=moe_cfg.min_capacity,
                         drop_tokens=moe_cfg.drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
        self.deepspeed_moe.gate = RouterGate(router, moe_cfg, d_model, self.local_expert_w1)
        self.global_expert_ids = [ep_rank * self.num_local_experts + i for i in range(self.num_local_experts)]
        for expert, global_id in zip(self.local_experts, self.global_expert_ids):
            generator = torch.Generator().manual_seed(stable_seed(seed, "expert", layer_idx, global_id))
            if expert.w1.weight.is_meta:
                continue
            for linear, std in ((expert.w1, init_std), (expert.w3, init_std), (expert.w2, out_init_std)):
                with torch.no_grad():
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * std)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def gate(self) -> RouterGate:
        return self.deepspeed_moe.gate

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate.router

    def local_expert_w1(self) -> Tensor:
        """SwiGLU gate matrices of this rank's experts, [E_local, F, D] (autograd intact)."""
        return torch.stack([expert.w1.weight for expert in self.local_experts])

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
        y_BSD, l_aux, _ = super().forward(x_BSD)
        return y_BSD, l_aux
