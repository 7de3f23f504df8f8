"""JSONL round trip, rank gating, and a real offline wandb run (no network, files under tmp)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from moe_lm.config.schema import WandbConfig
from moe_lm.metrics.loggers import JsonlLogger, Logger, MultiLogger, WandbLogger, build_loggers, read_wandb_id


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path / "run"


def test_jsonl_round_trip_appends(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"train/loss": 2.5, "tokens": 1024}, step=1)
    logger.log({"moe/load_shares": [[0.5, 0.5], [1.0, 0.0]], "perf/mfu": np.float32(0.25)}, step=2)
    assert len(path.read_text().splitlines()) == 2  # flushed without close
    logger.close()
    resumed = JsonlLogger(path)
    resumed.log({"val/loss": 2.0}, step=2)
    resumed.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 2.5, "tokens": 1024},
                    {"step": 2, "moe/load_shares": [[0.5, 0.5], [1.0, 0.0]], "perf/mfu": 0.25},
                    {"step": 2, "val/loss": 2.0}]


def test_only_rank0_writes(tmp_path):
    cfg = WandbConfig(mode="disabled")
    other = build_loggers(cfg, tmp_path / "r1", {}, rank=1)
    assert type(other) is Logger
    other.log({"a": 1.0}, step=1)
    other.close()
    assert not (tmp_path / "r1").exists()
    main = build_loggers(cfg, tmp_path / "r0", {}, rank=0)
    assert isinstance(main, MultiLogger) and [type(x) for x in main.loggers] == [JsonlLogger]
    main.log({"a": 1.0}, step=1)
    main.close()
    assert (tmp_path / "r0" / "metrics.jsonl").read_text() == '{"step": 1, "a": 1.0}\n'
    assert not (tmp_path / "r0" / "wandb").exists()


def wandb_records(path: Path) -> list:
    """Records of a .wandb file: a 7-byte header, then LevelDB-log chunks (crc32 4, length 2, type 1)
    in 32 KiB blocks, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, payload, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wait_for_records(path: Path, timeout_s: float = 30.0) -> list:
    """wandb-core writes the .wandb file asynchronously: finish() may return before the records reach disk."""
    deadline = time.monotonic() + timeout_s
    records = wandb_records(path)
    while not any(r.HasField("exit") for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
        records = wandb_records(path)
    return records


def test_wandb_offline_run_holds_metrics_and_resumes(wandb_env):
    run_dir = wandb_env
    cfg = WandbConfig(mode="offline", project="moe-lm-test", name="unit", tags=["test"])
    logger = WandbLogger(cfg, run_dir, {"model": {"d_model": 64}}, resume_id=None)
    logger.log({"train/loss": 2.5, "moe/load_cv_mean": 0.125, "moe/load_shares": [[0.5, 0.5]]}, step=3)
    logger.summary({"val_ppl": 12.0})
    logger.close()
    assert read_wandb_id(run_dir) == logger.run_id

    [offline_dir] = (run_dir / "wandb").glob(f"offline-run-*-{logger.run_id}")
    records = wait_for_records(offline_dir / f"run-{logger.run_id}.wandb")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.HasField("history")]
    assert any(h.get("train/loss") == 2.5 and h.get("moe/load_cv_mean") == 0.125 and h.get("_step") == 3
               for h in history)
    assert not any("moe/load_shares" in h for h in history)  # matrices stay in metrics.jsonl
    [run] = [r.run for r in records if r.HasField("run")]
    assert run.run_id == logger.run_id and run.display_name == "unit"
    assert {item.key: json.loads(item.value_json) for item in run.config.update}["model"] == {"d_model": 64}
    summaries = [{item.key: item.value_json for item in r.summary.update} for r in records if r.HasField("summary")]
    assert any(s.get("val_ppl") == "12.0" for s in summaries)

    resumed = WandbLogger(cfg, run_dir, {"model": {"d_model": 64}}, resume_id=read_wandb_id(run_dir))
    resumed.log({"train/loss": 2.0}, step=4)
    resumed.close()
    assert resumed.run_id == logger.run_id
