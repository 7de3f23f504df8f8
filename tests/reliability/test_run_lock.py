"""One live run per run directory: moe_lm/train/run_dir.py's lock, in this process and against other processes.

A live holder is another process: a Python child holding a real `RunLock`, or a lock file naming a live `sleep`.
"""

import json
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest

from moe_lm.train.run_dir import LOCK_FILE, RunDirError, RunLock, check_checkpoint_source, read_lock

HOLD = """
import sys, time
from moe_lm.train.run_dir import RunLock
RunLock(sys.argv[1], heartbeat_s=0.2).acquire()
print("held", flush=True)
time.sleep(60)
"""


def write_lock(run_dir, host, pid, heartbeat_age_s=0.0, started_age_s=3600.0, holder_clock_skew_s=0.0):
    """A lock last rewritten `heartbeat_age_s` ago (its modification time), by a holder whose clock is off by
    `holder_clock_skew_s` (the times written inside it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder_now = now + holder_clock_skew_s
    (run_dir / LOCK_FILE).write_text(json.dumps({
        "host": host, "pid": pid, "started": holder_now - started_age_s,
        "heartbeat": holder_now - heartbeat_age_s, "heartbeat_s": 10.0, "token": "someone-else"}))
    os.utime(run_dir / LOCK_FILE, (now - heartbeat_age_s, now - heartbeat_age_s))


def test_a_second_run_is_refused_while_another_process_holds_the_lock_and_takes_it_once_that_one_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(0.5)  # a few heartbeats: the holder keeps its lock fresh
        assert read_lock(run_dir / LOCK_FILE).heartbeat > read_lock(run_dir / LOCK_FILE).started
        with pytest.raises(RunDirError, match=rf"{run_dir} is in use by another run \(host {socket.gethostname()}, "
                                              rf"pid {holder.pid}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d; last "
                                              rf"heartbeat \d+ s ago\)"):
            RunLock(run_dir).acquire()
        assert read_lock(run_dir / LOCK_FILE).pid == holder.pid  # the refusal left the holder's lock alone
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=rf"taking over the stale lock .*pid {holder.pid}.*: its process "
                                         rf"{holder.pid} on .* is gone"):
        lock = RunLock(run_dir).acquire()
    assert read_lock(run_dir / LOCK_FILE).pid == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists() and run_dir.is_dir()


def test_a_lock_file_naming_a_live_process_on_this_host_refuses_the_run(tmp_path, sleeper):
    write_lock(tmp_path, socket.gethostname(), sleeper.pid, heartbeat_age_s=2)
    with pytest.raises(RunDirError, match=rf"pid {sleeper.pid}, since .*last heartbeat 2 s ago"):
        RunLock(tmp_path).acquire()


def test_a_lock_with_an_old_heartbeat_from_another_host_is_taken_over_with_a_warning(tmp_path):
    write_lock(tmp_path, "node-17", 4242, heartbeat_age_s=600)
    with pytest.warns(UserWarning, match=r"taking over the stale lock .*host node-17, pid 4242, since .*: its last "
                                         r"heartbeat was 600 s ago \(5 x 10 s make it stale\)"):
        lock = RunLock(tmp_path).acquire()
    try:
        assert read_lock(tmp_path / LOCK_FILE).token == lock.info.token
    finally:
        lock.release()


def test_a_recent_heartbeat_from_another_host_refuses_the_run(tmp_path):
    write_lock(tmp_path, "node-17", 4242, heartbeat_age_s=20)  # below 5 x 10 s: that run may be alive
    with pytest.raises(RunDirError, match=r"host node-17, pid 4242.*goes stale 50 s after its last heartbeat"):
        RunLock(tmp_path).acquire()


def test_a_fresh_heartbeat_from_a_host_whose_clock_is_ten_minutes_behind_still_refuses_the_run(tmp_path):
    """The age is read from the file system's clock (the lock's modification time), not from the holder's."""
    write_lock(tmp_path, "node-17", 4242, heartbeat_age_s=1, holder_clock_skew_s=-600)
    with pytest.raises(RunDirError, match=r"host node-17, pid 4242.*last heartbeat 1 s ago"):
        RunLock(tmp_path).acquire()


def test_the_heartbeat_thread_refreshes_the_lock_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path / "new" / "run", heartbeat_s=0.05).acquire()
    first = read_lock(lock.path)
    time.sleep(0.3)
    assert read_lock(lock.path).heartbeat > first.heartbeat and read_lock(lock.path).started == first.started
    lock.release()
    lock.release()  # idempotent
    assert not lock._thread.is_alive()
    assert not (tmp_path / "new").exists()  # folders made only for the lock go with it when left empty


def test_a_lock_left_by_an_unfinished_run_of_this_process_is_taken_over_silently(tmp_path):
    earlier = RunLock(tmp_path, heartbeat_s=0.05).acquire()  # not released, as by a Trainer never trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lock = RunLock(tmp_path).acquire()
        time.sleep(0.2)  # the earlier heartbeat sees the new holder and stops without a word
    assert not earlier._thread.is_alive() and read_lock(lock.path).token == lock.info.token
    earlier.release()  # not its lock any more: left alone
    assert read_lock(lock.path).token == lock.info.token
    lock.release()


def test_an_unreadable_lock_file_counts_as_fresh_until_its_mtime_is_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text("not json")
    with pytest.raises(RunDirError, match=r"host unknown \(unreadable lock file\)"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with pytest.warns(UserWarning, match="taking over the stale lock"):
        RunLock(tmp_path).acquire().release()


def test_run_dir_that_is_a_file_or_under_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(RunDirError, match=rf"^run.dir: {tmp_path / 'afile'} is a file, not a folder$"):
        RunLock(tmp_path / "afile").acquire()
    with pytest.raises(RunDirError, match=rf"run.dir: {tmp_path / 'afile' / 'run'} cannot be created: "
                                          rf"{tmp_path / 'afile'} is a file"):
        RunLock(tmp_path / "afile" / "run").acquire()


def read_only_dir(tmp_path):
    """A folder this process cannot write in: chmod 555, or for root (who ignores modes) a sysfs folder."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        open("/sys/kernel/moe-lm-probe", "w").close()
    except OSError:
        return "/sys/kernel"
    pytest.skip("no folder here is read-only to root")


def test_a_read_only_run_dir_is_named(tmp_path):
    folder = read_only_dir(tmp_path)
    with pytest.raises(RunDirError, match=rf"run.dir: {folder} is not writable \((Permission denied|Read-only file "
                                          rf"system)\): moe-lm writes its lock, config, metrics and checkpoints"):
        RunLock(folder).acquire()


def test_export_and_eval_sources_that_are_not_runs_are_named_with_what_they_lack(tmp_path):
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'nope'} does not exist"):
        check_checkpoint_source(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(RunDirError, match="notes.txt is a file: expected a checkpoint folder"):
        check_checkpoint_source(tmp_path / "notes.txt")
    with pytest.raises(RunDirError, match=rf"{tmp_path} is not a run folder: it has no checkpoints/ folder, no "
                                          rf"step_N checkpoint folders and no manifest.json"):
        check_checkpoint_source(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match=rf"{tmp_path / 'checkpoints'} holds no checkpoint \(step_N folder\)"):
        check_checkpoint_source(tmp_path)
    (tmp_path / "checkpoints" / "step_00000002").mkdir()
    check_checkpoint_source(tmp_path)  # a candidate: whether it is complete is find_checkpoint's to say
