"""Run `moe-lm train` as a child process and read back its summary: shared by the benchmark and the shootout.

A child process per run keeps runs independent (DeepSpeed keeps process groups in module state) and is how
users run them, so the figures are the trainer's own logging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def train(recipe: str, overrides: list[str], run_dir: Path, log: Path | None = None) -> dict:
    """Train `recipe` with `overrides` into `run_dir`; return its summary.json (raises with the log's tail)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = log or run_dir / "train.log"
    command = [sys.executable, "-m", "moe_lm.cli", "train", recipe, f"run.dir={run_dir}", *overrides]
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); log {log}:\n{tail}")
    return json.loads((run_dir / "summary.json").read_text())
