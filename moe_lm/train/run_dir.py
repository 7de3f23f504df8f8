"""The run directory: checked before anything is written there, and locked so that one live run uses it.

`run.dir` holds config.yaml, metrics.jsonl, summary.json, checkpoints/ and wandb/. Two runs writing there at once
(a requeued SLURM job racing its predecessor, a second `moe-lm train` in another shell) would interleave their
metrics and rotate each other's checkpoints, so rank 0 holds RUN_DIR/run.lock for the whole run:

- The lock is a JSON file: host, pid, start time, a token naming this holder, and a heartbeat (wall-clock time)
  that a daemon thread rewrites every `heartbeat_s` seconds. A thread, not the training loop, so that a long
  evaluation or checkpoint never makes a live run look dead.
- It is stale when its process is gone (same host), or when its heartbeat is older than `STALE_BEATS` periods
  (a holder on another host, or a frozen one). A stale lock is taken over with a warning; a live one refuses the
  run with a `RunDirError` naming its holder.
- A heartbeat's age is measured on one clock, the file system's: the lock file's modification time against that of
  a probe file the reader writes beside it (`filesystem_time`), not the holder's wall clock against the reader's.
  On a local disk and on NFS (where the server stamps writes) a clock skew between hosts does not move the stale
  timeout.
- It is created atomically, as a hard link to a complete file (NFS and Lustre honour link), so a reader never
  sees half a lock; it is removed when the run ends, on errors too.

Other ranks never touch the lock: `claim_run_dir` broadcasts rank 0's verdict, so every rank fails the same way.
`check_checkpoint_source` tells `moe-lm export` / `eval` what a folder that is not a run lacks, and
`newest_complete_checkpoint` names the checkpoint an aborted run leaves.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch.distributed as dist

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
"""Seconds between two heartbeats of a live run."""
STALE_BEATS = 5
"""A lock whose heartbeat is this many periods old is stale."""


class RunDirError(RuntimeError):
    """`run.dir` cannot be used: not a folder, not writable, or held by another live run. The message says why."""


@dataclass(frozen=True)
class LockInfo:
    """The content of a lock file."""

    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    heartbeat: float  # the last heartbeat: as read (`read_lock`), the lock file's modification time
    heartbeat_s: float
    token: str  # one per `RunLock`, so a holder recognises its own lock

    def holder(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}, since {since}"

    def stale_reason(self, now: float) -> str | None:
        """Why this lock's holder is presumed gone, or None if it looks alive."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on {self.host} is gone"
        age = now - self.heartbeat
        if age > STALE_BEATS * self.heartbeat_s:
            return f"its last heartbeat was {age:.0f} s ago ({STALE_BEATS} x {self.heartbeat_s:g} s make it stale)"
        return None

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie (exited, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): trust kill
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_lock(path: str | Path) -> LockInfo | None:
    """The lock at `path`, or None if there is none. Its heartbeat is the file's modification time, stamped by the
    file system when the holder last rewrote it. A file that is not a lock counts as one from an unknown holder
    (stale after `STALE_BEATS` x `HEARTBEAT_S`)."""
    path = Path(path)
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return replace(LockInfo(**json.loads(text)), heartbeat=mtime)
    except (ValueError, TypeError):
        return LockInfo(host="unknown (unreadable lock file)", pid=-1, started=mtime, heartbeat=mtime,
                        heartbeat_s=HEARTBEAT_S, token="")


def filesystem_time(folder: Path) -> float:
    """Now, on the clock that stamps files in `folder`: the modification time of a probe file written there."""
    probe = folder / f".{LOCK_FILE}.clock-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


class RunLock:
    """RUN_DIR/run.lock held by this process: `acquire()`, then `release()` (idempotent)."""

    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S):
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_FILE
        now = time.time()
        self.info = LockInfo(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                             heartbeat_s=heartbeat_s, token=uuid.uuid4().hex)
        self.held = False
        self._created: list[Path] = []  # folders made for the lock, removed again at release if still empty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, creating run.dir if needed; raise `RunDirError` if run.dir is unusable or held."""
        self._make_run_dir()
        try:
            for _ in range(10):  # each turn: a stale lock was removed, by us or by a competitor
                if self._create():
                    self.held = True
                    self._thread = threading.Thread(target=self._beat, name="moe-lm run.lock heartbeat",
                                                    daemon=True)
                    self._thread.start()
                    return self
                holder = read_lock(self.path)
                if holder is None:
                    continue
                now = filesystem_time(self.run_dir)
                reason = holder.stale_reason(now)
                if reason is None and holder.is_this_process():
                    reason = "it is held by an earlier run in this process that did not finish"
                if reason is None:
                    raise RunDirError(
                        f"run.dir: {self.run_dir} is in use by another run ({holder.holder()}; last heartbeat "
                        f"{max(0.0, now - holder.heartbeat):.0f} s ago). Wait for it to end or stop it, or "
                        f"use another run.dir. If that run is dead on another host, its lock goes stale "
                        f"{STALE_BEATS * holder.heartbeat_s:g} s after its last heartbeat")
                if self._remove_stale(holder) and not holder.is_this_process():
                    warnings.warn(f"run.dir: taking over the stale lock {self.path} of {holder.holder()}: {reason}",
                                  stacklevel=2)
            raise RunDirError(f"run.dir: could not take the lock {self.path}: other processes keep taking it")
        except OSError as exc:
            self._remove_created()
            raise RunDirError(f"run.dir: {self.run_dir} is not writable ({exc.strerror or exc}): moe-lm writes its "
                              f"lock, config, metrics and checkpoints there") from exc
        except RunDirError:
            self._remove_created()
            raise

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this holder's. Safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held:
            self.held = False
            current = read_lock(self.path)
            if current is not None and current.token == self.info.token:
                self.path.unlink(missing_ok=True)
        self._remove_created()

    def _make_run_dir(self) -> None:
        for parent in (self.run_dir, *self.run_dir.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise RunDirError(f"run.dir: {self.run_dir} is a file, not a folder" if parent == self.run_dir
                                      else f"run.dir: {self.run_dir} cannot be created: {parent} is a file")
                break
            self._created.append(parent)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._created.clear()
            raise RunDirError(f"run.dir: {self.run_dir} cannot be created ({exc.strerror or exc})") from exc

    def _remove_created(self) -> None:
        for folder in self._created:  # leaf first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break
        self._created.clear()

    def _write(self, path: Path, info: LockInfo) -> None:
        with path.open("w") as f:
            f.write(json.dumps(asdict(info)))
            f.flush()
            os.fsync(f.fileno())

    def _create(self) -> bool:
        """Create the lock file from nothing; False if one exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.info.token}")
        self._write(tmp, self.info)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create (a reader may see it half-written)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(self.info)))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale(self, stale: LockInfo) -> bool:
        """Move the stale lock aside and delete it; False if it was no longer the one judged stale."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.info.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # a competitor removed it first
            return False
        if read_lock(aside) != stale:  # a competitor's fresh lock replaced it in between: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:  # a third lock took the place: that competitor's heartbeat reports the loss
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.info.token}")
        failed = False
        while not self._stop.wait(self.info.heartbeat_s):
            try:
                current = read_lock(self.path)
                if current is not None and current.token != self.info.token and current.is_this_process():
                    return  # a later run of this process took over (see `acquire`)
                if current is None or current.token != self.info.token:
                    warnings.warn(f"run.dir: lost the lock {self.path}: " + (
                        "it was deleted" if current is None else f"{current.holder()} took it over") +
                        "; another run may now write to this run.dir", stacklevel=1)
                    return
                self._write(tmp, replace(self.info, heartbeat=time.time()))
                os.replace(tmp, self.path)
                failed = False
            except OSError as exc:
                if not failed:  # once per outage
                    warnings.warn(f"run.dir: cannot refresh the lock {self.path} ({exc}); retrying", stacklevel=1)
                failed = True


def claim_run_dir(run_dir: str | Path, rank: int, heartbeat_s: float = HEARTBEAT_S) -> RunLock | None:
    """Rank 0: take RUN_DIR's lock and return it; other ranks: None. Collective under torch.distributed: a
    refusal raises the same `RunDirError` on every rank."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir, heartbeat_s).acquire()
        except RunDirError as exc:
            error = str(exc)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunDirError(error)
    return lock


def newest_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest `step_N` of RUN_DIR/checkpoints that has its manifest (complete; files not re-hashed)."""
    from moe_lm import checkpoint as ckpt

    complete = [p for p in ckpt.list_checkpoints(Path(run_dir) / ckpt.CHECKPOINT_DIR) if (p / ckpt.MANIFEST).is_file()]
    return complete[0] if complete else None


def check_checkpoint_source(path: str | Path) -> None:
    """For `moe-lm export` / `eval`: raise `RunDirError` naming `path` and what it lacks, unless it can hold a
    checkpoint (a `step_N` or manifest folder, a run directory with checkpoints/, or a checkpoints directory).
    Whether the checkpoint is complete is `checkpoint.find_checkpoint`'s to say."""
    from moe_lm import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path} does not exist")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file: expected a checkpoint folder (RUN_DIR/checkpoints/step_N), a run "
                          f"folder or its checkpoints folder")
    if (path / ckpt.MANIFEST).exists() or ckpt.step_of(path) is not None:
        return
    save_dir = path / ckpt.CHECKPOINT_DIR if (path / ckpt.CHECKPOINT_DIR).is_dir() else path
    if not ckpt.list_checkpoints(save_dir):
        what = (f"{save_dir} holds no checkpoint (step_N folder)" if save_dir != path else
                f"{path} is not a run folder: it has no {ckpt.CHECKPOINT_DIR}/ folder, no step_N checkpoint folders "
                f"and no {ckpt.MANIFEST}")
        raise RunDirError(what)
