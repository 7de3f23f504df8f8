"""MoE layers, and the only code that imports DeepSpeed: the MoE layer (`deepspeed_moe.py`), the training engine
(`engine.py`) and the checkpoint files (`deepspeed_checkpoint.py`); `dispatch.py` is plain torch."""

from moe_lm.moe.deepspeed_moe import (MoEFeedForward, RouterGate, expert_capacity, routing_counts_only,
                                      routing_records_paused)
from moe_lm.moe.dispatch import capacity_slots, grouped_swiglu, sort_by_expert

__all__ = ["MoEFeedForward", "RouterGate", "capacity_slots", "expert_capacity", "grouped_swiglu",
           "routing_counts_only", "routing_records_paused", "sort_by_expert"]
