"""What the training loop does when something goes wrong: a stop signal, or a step whose numbers are not finite.

- `StopSignals`: SIGTERM (torchrun, schedulers), SIGUSR1 (SLURM's warning before preemption,
  `--signal=USR1@120`) and a first SIGINT (Ctrl-C) only set a flag. The loop all-reduces it at the next step
  boundary, so every rank agrees, then checkpoints and exits cleanly (`moe-lm train`: status 75 when preempted,
  130 when interrupted). A second SIGINT raises `SecondInterrupt` at once, without checkpointing: checkpoints are
  written to a `.tmp-` directory and renamed when complete, so the previous complete one stays valid.
- Non-finite steps: the loop checks the loss of each micro-batch and the local gradients after the last
  backward, all-reduces the verdict, and skips the optimizer step on every rank through `SkippableAdamW`
  (DeepSpeed's overflow protocol). `TrainingDiverged` stops the run after `train.max_bad_steps` bad steps in a row.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

import torch

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*PREEMPT_SIGNALS, signal.SIGINT)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient; the last good checkpoint is untouched."""


class SecondInterrupt(KeyboardInterrupt):
    """A second SIGINT: the run stopped where it was, without checkpointing. A KeyboardInterrupt, so that no
    `except Exception` on the way swallows it."""


class StopSignals:
    """Context manager: while active, SIGTERM/SIGUSR1 and a first SIGINT set `received` (the first signal's name)
    instead of killing; a second SIGINT raises `SecondInterrupt` in the main thread.

    Handlers can only be installed from the main thread; elsewhere (and for the previous handlers on exit) the
    process keeps its defaults. A launcher that forwards signals sends each worker one SIGINT per Ctrl-C (torchrun
    starts its workers in their own session, so the terminal's SIGINT reaches only torchrun).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.preempted = False  # SIGTERM or SIGUSR1 arrived
        self.interrupted = False  # SIGINT arrived
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise SecondInterrupt("second interrupt")
            self.interrupted = True
        else:
            self.preempted = True
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW that follows DeepSpeed's overflow protocol.

    While `overflow` is True, `step()` leaves every parameter and moment untouched, and a DeepSpeed engine that
    holds this optimizer directly (ZeRO-0, fp32) counts a skipped step and does not advance the LR scheduler.
    DeepSpeed's ZeRO-1/2 and bf16 wrappers take this flag as their own NaN/inf verdict (`moe_lm/moe/engine.py`), and
    skip and count the step the same way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False

    def step(self, closure=None):
        if self.overflow:
            return None
        return super().step(closure)


@torch.no_grad()
def grads_finite(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """A device bool: every local gradient is finite (parameters without a gradient, e.g. under ZeRO-2, are
    ignored). One fused multi-tensor norm, not a check per parameter, and nothing read back to the host."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False))
