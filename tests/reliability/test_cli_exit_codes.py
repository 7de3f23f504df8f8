"""`moe-lm` as a user meets it: one line and an exit status, never a traceback, for interrupts and run folders.

Training commands run as subprocesses (`python -m moe_lm.cli`), since `train` initialises torch.distributed; the
commands that only read folders run in this process through `cli.main`.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from moe_lm import checkpoint as ckpt
from moe_lm import cli
from moe_lm.train.faults import SecondInterrupt
from moe_lm.train.run_dir import LOCK_FILE, read_lock
from tests.train.test_trainer import tiny_overrides

RECIPE = "recipes/quickstart.yaml"


def train_command(tmp_path, *extra):
    return [sys.executable, "-m", "moe_lm.cli", "train", RECIPE, *tiny_overrides(tmp_path, *extra)]


def run_cli(command, timeout=120):
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, pattern):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, result.stderr.strip().splitlines()[-1]), result.stderr


def test_ctrl_c_checkpoints_and_exits_130_and_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(tmp_path, "train.max_steps=100000", "train.eval_interval=100000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == cli.EXIT_INTERRUPTED == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if "interrupted" in line]
    [checkpoint] = ckpt.list_checkpoints(run_dir / "checkpoints")  # train.save_interval=0: the interrupt's only
    step = ckpt.step_of(checkpoint)
    assert line == (f"moe-lm: interrupted: checkpoint at step {step} written to {checkpoint}; resume with "
                    f"train.resume=auto")
    assert ckpt.validate_checkpoint(checkpoint) == []
    assert not (run_dir / LOCK_FILE).exists()

    # resuming with another model shape is refused before config.yaml or a wandb run is touched
    before = sorted(p.name for p in run_dir.iterdir())
    config = (run_dir / "config.yaml").read_text()
    result = run_cli(train_command(tmp_path, "train.max_steps=100000", "train.eval_interval=100000",
                                   "train.resume=auto", "model.d_ff=64", "wandb.mode=offline"))
    assert_one_line_error(result, rf"^moe-lm: {checkpoint} holds another model: model.d_ff=48 in the checkpoint, "
                                  rf"64 now")
    assert (run_dir / "config.yaml").read_text() == config
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no wandb/, no lock left


def test_train_on_a_live_runs_folder_is_refused_naming_the_holder_before_anything_is_written(tmp_path, sleeper):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    now = time.time()
    lock = {"host": socket.gethostname(), "pid": sleeper.pid, "started": now - 60, "heartbeat": now,
            "heartbeat_s": 10.0, "token": "live"}
    (run_dir / LOCK_FILE).write_text(json.dumps(lock))
    result = run_cli(train_command(tmp_path))
    assert_one_line_error(result, rf"^moe-lm: run.dir: {run_dir} is in use by another run \(host "
                                  rf"{socket.gethostname()}, pid {sleeper.pid}, since .*\)")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    assert read_lock(run_dir / LOCK_FILE).token == "live"
    assert not (tmp_path / "data").exists()  # refused before the data was prepared


def test_train_with_run_dir_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("")
    result = run_cli(train_command(tmp_path))
    assert_one_line_error(result, rf"^moe-lm: run.dir: {tmp_path / 'run'} is a file, not a folder$")


def exit_message(argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code


def test_eval_export_and_compare_on_a_folder_that_is_not_a_run_name_it_and_what_is_missing(tmp_path):
    (tmp_path / "notes").mkdir()
    folder = tmp_path / "notes"
    lacks = rf"{folder} is not a run folder: it has no checkpoints/ folder, no step_N checkpoint folders and no " \
            rf"manifest.json"
    assert exit_message(["eval", str(folder), "--out", str(tmp_path / "sweep")]) == f"moe-lm: eval: {lacks}"
    assert exit_message(["export", str(folder), "--out", str(tmp_path / "x.safetensors")]) == f"moe-lm: export: {lacks}"
    assert exit_message(["export", str(tmp_path / "gone"), "--out", "x"]) == f"moe-lm: export: {tmp_path / 'gone'} " \
                                                                            f"does not exist"
    assert exit_message(["compare", str(folder), "--out", str(tmp_path / "cmp")]) == (
        f"moe-lm: run dir {folder}: missing summary.json, metrics.jsonl, config.yaml; a run directory needs "
        f"summary.json, metrics.jsonl, config.yaml")
    assert exit_message(["compare", str(tmp_path / "a" / "b"), "--out", str(tmp_path / "cmp")]) == (
        f"moe-lm: run dir {tmp_path / 'a' / 'b'}: no such folder (nor is it a wandb run path)")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cmp").exists()


def test_usage_errors_exit_2_and_interrupts_outside_training_exit_130(monkeypatch, capsys):
    assert exit_message(["train"]) == 2

    def interrupted(args):
        raise KeyboardInterrupt

    def aborted(args):
        raise SecondInterrupt("second interrupt: aborted without checkpointing; the last complete checkpoint is x")
    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert exit_message(["info", RECIPE]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "moe-lm: interrupted"
    monkeypatch.setattr(cli, "cmd_info", aborted)
    assert exit_message(["info", RECIPE]) == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith("moe-lm: second interrupt: aborted without")


def test_exit_codes_are_the_documented_ones():
    assert (cli.EXIT_ERROR, cli.EXIT_PREEMPTED, cli.EXIT_INTERRUPTED) == (1, 75, 128 + signal.SIGINT)
    readme = open(os.path.join(os.path.dirname(cli.__file__), "..", "README.md")).read()
    for code in ("`0`", "`1`", "`2`", "`75`", "`130`"):
        assert code in readme.split("### Exit codes", 1)[1].split("\n## ", 1)[0], code
