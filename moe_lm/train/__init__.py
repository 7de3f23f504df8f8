"""Training: process-group setup (`distributed.py`) and the DeepSpeed training loop (`trainer.py`).

`Trainer` is imported on first use, so that the launch checks in `moe_lm.train.distributed` load without
DeepSpeed and the data stack (a misconfigured launch fails in seconds).
"""

__all__ = ["Trainer"]


def __getattr__(name: str):
    if name == "Trainer":
        from moe_lm.train.trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
