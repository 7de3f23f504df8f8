"""Training: process-group setup (`distributed.py`) and the DeepSpeed training loop (`trainer.py`)."""

from moe_lm.train.trainer import Trainer

__all__ = ["Trainer"]
