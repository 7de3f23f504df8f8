"""Where metrics go: metrics.jsonl (always, the source of `moe-lm compare`) and wandb (offline by default).

Only rank 0 logs; the metrics it gets are already reduced over ranks. Every other rank gets the no-op
`Logger`, so the trainer calls the same methods everywhere without checking its rank.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_lm.config.schema import WandbConfig

WANDB_ID_FILE = "wandb_id.txt"


class Logger:
    """Logs nothing: the base of the loggers and what non-zero ranks get."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record `metrics` (floats, or JSON-able values such as the load-share matrix) at optimizer step `step`."""

    def summary(self, metrics: dict[str, Any]) -> None:
        """Final values of the run (val ppl, throughput, ...)."""

    def close(self) -> None:
        """Flush and release files or the wandb run."""


class JsonlLogger(Logger):
    """One JSON object per line, {"step": step, **metrics}, appended and flushed per line.

    Appending keeps the rows of a resumed run in the same file (steps after the resumed checkpoint then
    appear twice; readers keep the last row of a step). Flushing each line means a killed run loses nothing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_wandb_id(run_dir: str | Path) -> str | None:
    """The wandb run id saved in `run_dir` by an earlier `WandbLogger`, or None."""
    path = Path(run_dir) / WANDB_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


class WandbLogger(Logger):
    """A wandb run whose files live in RUN_DIR/wandb; its id is saved to RUN_DIR/wandb_id.txt.

    Offline mode (the default) needs no account or network: `wandb sync RUN_DIR/wandb/offline-run-*` uploads
    later. Passing `resume_id` (see `read_wandb_id`) continues that wandb run after a checkpoint resume instead
    of starting a new one. Only numeric values are sent: matrices such as `moe/load_shares` stay in the JSONL.
    """

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config_dict: dict[str, Any],
                 resume_id: str | None = None):
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or None,
                              group=cfg.group or None, tags=list(cfg.tags) or None, mode=cfg.mode,
                              dir=str(run_dir), config=config_dict, id=resume_id,
                              resume="allow" if resume_id else None)
        self.run_id: str = self.run.id
        (run_dir / WANDB_ID_FILE).write_text(self.run_id + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, numbers.Number)}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


class MultiLogger(Logger):
    """Sends every call to each of `loggers`, in order."""

    def __init__(self, loggers: Sequence[Logger]):
        self.loggers = list(loggers)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(cfg: WandbConfig, run_dir: str | Path, config_dict: dict[str, Any], rank: int,
                  resume_id: str | None = None) -> Logger:
    """Rank 0: RUN_DIR/metrics.jsonl plus wandb unless `cfg.mode` is "disabled"; other ranks: the no-op Logger.

    `config_dict` is the resolved recipe (wandb's run config); `resume_id` continues an earlier wandb run.
    """
    if rank != 0:
        return Logger()
    loggers: list[Logger] = [JsonlLogger(Path(run_dir) / "metrics.jsonl")]
    if cfg.mode != "disabled":
        loggers.append(WandbLogger(cfg, run_dir, config_dict, resume_id))
    return MultiLogger(loggers)
