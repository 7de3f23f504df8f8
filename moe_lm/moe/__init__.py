"""MoE layers. DeepSpeed-MoE stays behind one adapter (`deepspeed_moe.py`); `dispatch.py` is plain torch."""

from moe_lm.moe.deepspeed_moe import MoEFeedForward, RouterGate, expert_capacity, routing_records_paused
from moe_lm.moe.dispatch import capacity_slots, grouped_swiglu, sort_by_expert

__all__ = ["MoEFeedForward", "RouterGate", "capacity_slots", "expert_capacity", "grouped_swiglu",
           "routing_records_paused", "sort_by_expert"]
