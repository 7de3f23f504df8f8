"""DeepSpeed-MoE behind one adapter (`deepspeed_moe.py`); nothing else in moe-lm imports `deepspeed.moe`."""

from moe_lm.moe.deepspeed_moe import MoEFeedForward, RouterGate, capacity_slots, expert_capacity

__all__ = ["MoEFeedForward", "RouterGate", "capacity_slots", "expert_capacity"]
