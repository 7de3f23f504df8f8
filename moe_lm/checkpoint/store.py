"""Checkpoints: atomic, validated, rotated DeepSpeed checkpoints that load without running code, and the client
state of an exact resume.

Layout under RUN_DIR/checkpoints (docs/checkpoints.md tells the whole story):

    latest                  tag of the newest complete checkpoint, replaced atomically (DeepSpeed's convention)
    step_00000200/          a complete checkpoint: DeepSpeed's files plus manifest.json
    .tmp-step_00000300/     a checkpoint being written, or left behind by a killed run: never loaded

Save (`save_checkpoint`, called by every rank at the same step boundary):
  1. every rank writes its DeepSpeed files into the temporary tag `.tmp-step_N`: expert shards per (MoE layer,
     global expert) from expert-data-parallel rank 0, optimizer shards per rank, and the non-expert weights with
     the client state (`TrainingState`) from rank 0; a background thread on each rank fsyncs every file right
     after the rank wrote it and records its size and, with `train.checkpoint_verify=sha256`, its sha256;
  2. the records are gathered (a file no rank recorded is hashed by a share of the ranks), the files the layout
     implies are checked to be all there, and rank 0 writes manifest.json, renames the directory to `step_N`,
     replaces `latest`, and deletes complete checkpoints beyond `train.keep_last` (never the newest); checkpoints
     of a higher step (from a branch left by resuming an earlier checkpoint) are renamed `abandoned-*` first.
A kill at any moment leaves the previous checkpoints intact plus, at most, one more complete checkpoint or a
`.tmp-` directory that the next save removes.

Load (`find_checkpoint`, then `load_checkpoint`): candidates are validated newest first (manifest present, every
file present with its size and, with sha256, its hash, each rank hashing a share); a rejected one is reported with
the file that is wrong, and the newest complete one wins. Every file is read with `torch.load(weights_only=True)`
(`load_file`): a file that needs more than tensors, containers and DeepSpeed's few data classes is refused, naming
the file, unless `train.trust_checkpoint` is set. `check_compatible` refuses a model with other shapes; a changed
world size or ep_size reshards the optimizer state by parameter name (ZeRO-0, fp32); other layout changes load the
weights only when `train.resume_weights_only` asks for that.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import moe_lm.moe.deepspeed_checkpoint as dsckpt

CHECKPOINT_DIR = "checkpoints"
"""Sub-directory of run.dir that holds the checkpoints of a run."""
MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 2
"""1: the first release. 2: RNG states without numpy objects (so weights_only needs no numpy globals), the
manifest's `verify` mode (entries may hold sizes only) and `optimizer_params`, the index that lets a ZeRO-0
optimizer state be resharded by parameter name."""
READABLE_FORMATS = (1, 2)
_TAG = re.compile(r"step_(\d+)")

# Client-state keys, stored by DeepSpeed in `dsckpt.MODEL_STATES` next to its own keys.
STEP = "moe_lm/step"
"""Optimizer steps taken (skipped non-finite steps included)."""
CONSUMED_SAMPLES = "moe_lm/consumed_samples"
"""Samples consumed: the whole state of `ResumableSampler`, whose batches are a pure function of it."""
SAMPLER = "moe_lm/sampler"
"""{"seed", "num_samples"} of the sampler: if either changed, the resumed data order differs."""
SKIPPED_STEPS = "moe_lm/skipped_steps"
"""Steps skipped because their loss or gradient was NaN/inf."""
RNG_STATES = "moe_lm/rng_states"
"""One {"python", "numpy", "torch"[, "cuda"]} per global rank, in rank order."""
CONFIG = "moe_lm/config"
"""The resolved config (dict) of the run that saved."""
LAYOUT = "moe_lm/layout"
"""`Layout` of the run that saved: what the optimizer shards depend on."""
FORMAT = "moe_lm/format"
CLIENT_STATE_KEYS = (STEP, CONSUMED_SAMPLES, SAMPLER, SKIPPED_STEPS, RNG_STATES, CONFIG, LAYOUT, FORMAT)

# Model keys that define parameter shapes: the checkpoint's values must be kept to resume (other changed keys
# only warn, since the resume is then no longer an exact continuation).
ARCHITECTURE_KEYS = ("model.vocab_size", "model.n_layers", "model.d_model", "model.n_heads", "model.d_ff",
                     "model.tie_embeddings", "model.moe.num_experts", "model.moe.layer_freq", "model.moe.d_expert",
                     "model.moe.router.name")


def architecture_keys(config: dict[str, Any]) -> tuple[str, ...]:
    """`ARCHITECTURE_KEYS` plus the shape-defining keys that the config's router declares (`shape_keys`)."""
    from moe_lm.routers import router_config_class

    return ARCHITECTURE_KEYS + router_config_class(config["model"]["moe"]["router"]["name"]).shape_keys


# Keys that steer the run rather than define it: changing them on resume is expected and not reported.
_RUN_CONTROL_PREFIXES = ("run.", "wandb.", "metrics.", "train.resume", "train.save_interval",
                         "train.keep_last", "train.max_bad_steps", "train.log_interval", "train.eval_interval",
                         "train.eval_batches", "train.trust_checkpoint", "train.checkpoint_verify",
                         "parallel.init_timeout_s", "parallel.backend",
                         "parallel.ep_size", "parallel.zero_stage", "train.precision")  # the last three: `Layout`
# With an unchanged global batch, these may change with the world size and the run stays a continuation.
_BATCH_SPLIT_KEYS = ("train.micro_batch_size", "train.grad_accum_steps")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: incomplete, corrupt, or saved by an incompatible run. The message says why."""


@dataclass(frozen=True)
class Layout:
    """What the optimizer shards of a checkpoint depend on, and which files a complete checkpoint holds."""

    world_size: int
    ep_size: int
    zero_stage: int
    bf16: bool
    num_experts: int
    num_moe_layers: int

    def required_files(self) -> list[str]:
        """fnmatch patterns of the files a complete checkpoint of this layout holds (one match each)."""
        return dsckpt.required_files(self.world_size, self.ep_size, self.zero_stage, self.num_moe_layers,
                                     self.num_experts)

    def optimizer_changes(self, now: Layout) -> list[str]:
        """'key: saved -> now' for each difference in what the optimizer shards depend on (`check_compatible` decides
        whether the state can follow: by parameter name for world size / ep_size under ZeRO-0 fp32). ZeRO-1 and
        ZeRO-2 write the same optimizer partitions (ZeRO-2 also shards gradients, which no checkpoint holds), so a
        change between them is none."""
        names = {"world_size": "world size", "ep_size": "parallel.ep_size", "zero_stage": "parallel.zero_stage",
                 "bf16": "bf16"}
        return [f"{label} {getattr(self, key)} -> {getattr(now, key)}" for key, label in names.items()
                if getattr(self, key) != getattr(now, key)
                and not (key == "zero_stage" and min(self.zero_stage, now.zero_stage) >= 1)]


@dataclass
class TrainingState:
    """Everything besides weights, optimizer and LR scheduler (which DeepSpeed saves) that an exact resume needs."""

    step: int
    consumed_samples: int
    skipped_steps: int
    sampler: dict[str, int]
    config: dict[str, Any]
    layout: Layout
    rng_states: list[dict[str, Any]] = field(default_factory=list)

    def client_state(self) -> dict[str, Any]:
        return {STEP: self.step, CONSUMED_SAMPLES: self.consumed_samples, SKIPPED_STEPS: self.skipped_steps,
                SAMPLER: dict(self.sampler), RNG_STATES: self.rng_states, CONFIG: self.config,
                LAYOUT: asdict(self.layout), FORMAT: FORMAT_VERSION}

    @classmethod
    def from_client_state(cls, state: dict[str, Any], path: Path) -> TrainingState:
        missing = [key for key in CLIENT_STATE_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"{path / dsckpt.MODEL_STATES} lacks the moe-lm client state {missing}: not a "
                                  f"moe-lm checkpoint, or one of another format")
        return cls(state[STEP], state[CONSUMED_SAMPLES], state[SKIPPED_STEPS], state[SAMPLER], state[CONFIG],
                   Layout(**state[LAYOUT]), state[RNG_STATES])


# ----------------------------------------------------------------------------------------------------------------
# process-group helpers: every function below also works without torch.distributed (one process)

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    _, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    _, world = _rank_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def log(message: str) -> None:
    """A message for the user, from rank 0 only."""
    if _rank_world()[0] == 0:
        print(f"moe-lm: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# RNG states

def rng_state() -> dict[str, Any]:
    """This process's generators: python, numpy, torch CPU, and the current CUDA device if any. Tensors, ints,
    floats and tuples only, so that the file loads with weights_only (format 1 kept numpy's state as an ndarray)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)  # format 1: numpy's own tuple
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# reading a checkpoint file without running its code

TRUST_HINT = ("set train.trust_checkpoint=true only if you trust whoever wrote (or could have changed) this "
              "checkpoint: its sha256 manifest travels with the files, so it vouches for nothing")


def _numpy_array_globals() -> list[Any]:
    """What a pickled uint32 ndarray needs (format 1 kept numpy's RNG key that way): numpy's array rebuilder, under
    its numpy 2 and numpy 1 names, ndarray and the dtype classes. They rebuild arrays only; the allowlist the torch
    docs give for numpy arrays."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _allowed_globals(format_version: int) -> list[Any]:
    return [*dsckpt.SAFE_GLOBALS, *(_numpy_array_globals() if format_version < 2 else [])]


def _refusal(file: str | Path, reason: str, hint: str) -> str:
    return (f"{file} holds more than tensors and plain data ({reason}). Loading it would unpickle that, and "
            f"unpickling runs whatever code the file carries, so it was not loaded: {hint}")


def load_file(path: str | Path, *, trust: bool = False, format_version: int = FORMAT_VERSION,
              map_location: Any = "cpu", hint: str = TRUST_HINT) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, containers, numbers and strings, DeepSpeed's data classes
    (`dsckpt.SAFE_GLOBALS`) and, for a format-1 checkpoint, numpy arrays. Anything else raises `CheckpointError`
    naming the file, unless `trust`, which unpickles it (running whatever code it carries) and says so."""
    try:
        with torch.serialization.safe_globals(_allowed_globals(format_version)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(exc))
        reason = found.group(1).strip() if found else str(exc).splitlines()[0]
        if not trust:
            raise CheckpointError(_refusal(path, reason, hint)) from None
        log(f"train.trust_checkpoint=true: unpickling {path} ({reason}); this runs any code the file carries")
        return torch.load(path, map_location=map_location, weights_only=False)


def files_needing_trust(path: Path, names: list[str], format_version: int) -> list[str]:
    """A refusal (as `load_file` words it) for each of the files `names` of checkpoint `path` whose pickle names
    a global beyond the allowed ones. Reads the pickles' opcodes only, runs nothing. Collective: each rank scans
    a share and every rank gets the whole list, so that all refuse before any of them starts loading (a rank
    stopping alone in the middle of DeepSpeed's load would leave the others waiting in its collectives)."""
    rank, world = _rank_world()
    allowed = {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
               for entry in _allowed_globals(format_version)}
    problems = []
    for name in sorted(names)[rank::world]:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path / name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a torch zip checkpoint (e.g. a script): `load_file` decides if it is ever loaded
        extra = sorted(set(found) - allowed)
        if extra:
            problems.append(_refusal(path / name, "needs " + ", ".join(extra), TRUST_HINT))
    return sorted({p for share in _all_gather(problems) for p in share})


# ----------------------------------------------------------------------------------------------------------------
# names, manifest, validation

def tag_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a complete-checkpoint directory name `step_N`, else None."""
    match = _TAG.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """`step_N` directories in `save_dir`, newest (highest step) first; complete or not."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p), reverse=True)


def run_dir_of(path: str | Path) -> Path:
    """The run folder of a run, checkpoints or `step_N` folder."""
    path = Path(path)
    if path.parent.name == CHECKPOINT_DIR:  # RUN_DIR/checkpoints/step_N
        return path.parent.parent
    if path.name == CHECKPOINT_DIR:
        return path.parent
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest_path = Path(path) / MANIFEST
    try:
        return json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint was never completed") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable ({exc})") from exc


def checkpoint_format(path: str | Path, manifest: dict[str, Any]) -> int:
    """The manifest's format version; `CheckpointError` (naming the version) if this moe-lm cannot read it."""
    version = manifest.get("format")
    if version not in READABLE_FORMATS:
        raise CheckpointError(f"{Path(path) / MANIFEST} is checkpoint format {version!r}; this moe-lm reads formats "
                              f"{', '.join(map(str, READABLE_FORMATS))} (a newer moe-lm wrote it: resume with that "
                              f"version, or export its weights with it)")
    return version


def _files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def validate_checkpoint(path: str | Path, verify: str = "sha256") -> list[str]:
    """Problems that make `path` unusable, each naming the file at fault; [] = complete. Sizes are always checked,
    hashes with `verify="sha256"` when the manifest has them. Collective when torch.distributed is initialised
    (each rank hashes a share of the files, all get the same answer)."""
    path = Path(path)
    rank, world = _rank_world()
    problems: list[str] = []
    try:
        manifest = read_manifest(path)
        files = manifest["files"]
        layout = Layout(**manifest["layout"])
    except CheckpointError as exc:
        problems.append(str(exc))
    except (KeyError, TypeError) as exc:
        problems.append(f"{path / MANIFEST} is not a moe-lm manifest (missing {exc})")
    else:
        for pattern in layout.required_files():
            if not any(fnmatch(name, pattern) for name in files):
                problems.append(f"{path / pattern} is missing from the manifest (the checkpoint is incomplete)")
        for i, (name, entry) in enumerate(sorted(files.items())):
            file = path / name
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif (size := file.stat().st_size) != entry["bytes"]:
                problems.append(f"{file} has {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)")
            elif (verify == "sha256" and "sha256" in entry and i % world == rank
                  and dsckpt.file_entry(file, sha256=True)["sha256"] != entry["sha256"]):
                problems.append(f"{file} does not match its sha256 in the manifest (corrupt)")
    return sorted({p for share in _all_gather(problems) for p in share})


def find_checkpoint(resume: str, run_dir: str | Path, verify: str = "sha256",
                    source: str = "train.resume") -> Path | None:
    """The checkpoint `train.resume` asks for, validated (`verify`: `train.checkpoint_verify`); None = start from
    scratch. Collective. `source` names what the user gave the path as, in errors (export and eval pass
    "checkpoint").

    "" -> None, unless RUN_DIR already holds complete checkpoints: a fresh run would mix its checkpoints with
    those of the earlier run (and a later "auto" could pick the earlier run's newer step), so that raises.
    "auto" -> the newest complete checkpoint in RUN_DIR/checkpoints, or None if there is no checkpoint there at
    all. A path -> that checkpoint (a `step_N` directory), or the newest complete one in a
    checkpoints directory or run directory. A rejected candidate is reported with its bad file and the previous
    one is tried; if checkpoints exist but none is complete, this raises instead of starting from scratch.
    """
    if not resume:
        earlier = [p for p in list_checkpoints(Path(run_dir) / CHECKPOINT_DIR) if (p / MANIFEST).is_file()]
        if earlier:
            raise CheckpointError(f"run.dir={run_dir} already holds checkpoints of an earlier run (newest: "
                                  f"{earlier[0].name}): set train.resume=auto to continue it, or use another run.dir "
                                  f"(or delete {Path(run_dir) / CHECKPOINT_DIR}) to start a new run")
        return None
    explicit = resume != "auto"
    if explicit:
        path = Path(resume)
        if (path / MANIFEST).exists() or step_of(path) is not None or path.name.startswith(TMP_PREFIX):
            problems = validate_checkpoint(path, verify)
            if problems:
                raise CheckpointError(f"{source}={resume}: checkpoint not usable: " + "; ".join(problems))
            return path
        save_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        if not save_dir.is_dir():
            raise CheckpointError(f"{source}={resume}: no such checkpoint or directory")
    else:
        save_dir = Path(run_dir) / CHECKPOINT_DIR
    rejected: list[str] = []
    for candidate in list_checkpoints(save_dir):
        problems = validate_checkpoint(candidate, verify)
        if not problems:
            if rejected:
                log(f"falling back to {candidate}, the newest complete checkpoint")
            return candidate
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        log(f"skipping checkpoint {candidate}: {problems[0]}{more}")
        rejected.append(f"{candidate.name}: {problems[0]}")
    if rejected:
        hint = (". Not starting from scratch: pass another checkpoint as train.resume, or start a new run in another "
                "run.dir") if source == "train.resume" else ""
        raise CheckpointError(f"{source}={resume}: no complete checkpoint in {save_dir} (" + "; ".join(rejected)
                              + ")" + hint)
    if explicit:
        raise CheckpointError(f"{source}={resume}: no checkpoint (step_N directory) in {save_dir}")
    partial = sorted(p.name for p in save_dir.glob(TMP_PREFIX + "*")) if save_dir.is_dir() else []
    note = f" (ignoring incomplete {', '.join(partial)})" if partial else ""
    log(f"train.resume=auto: no checkpoint in {save_dir}{note}; starting from scratch")
    return None


# ----------------------------------------------------------------------------------------------------------------
# save

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(directory: Path) -> None:
    """Delete a directory tree, first renaming it to a `.tmp-` name so that a kill mid-way leaves no `step_N`."""
    doomed = directory.with_name(f"{TMP_PREFIX}deleting-{directory.name}-{time.time_ns()}")
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def set_aside_newer(save_dir: str | Path, step: int) -> list[Path]:
    """Rename checkpoints of a higher step than `step` to `abandoned-step_N-TIME` (kept, never loaded or rotated).

    They belong to a branch this run left by resuming from an earlier checkpoint (a rollback, or a fallback past
    a corrupt newest one); left in place they would win the next `train.resume=auto` and crowd the rotation.
    """
    moved = []
    for newer in list_checkpoints(save_dir):
        if step_of(newer) > step:
            aside = newer.with_name(f"abandoned-{newer.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(newer, aside)
            moved.append(aside)
            log(f"moved {newer} aside to {aside.name}: it is ahead of this run, which resumed from an earlier step")
    return moved


def rotate(save_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints (those with a manifest) beyond the `keep_last` newest; return them."""
    complete = [p for p in list_checkpoints(save_dir) if (p / MANIFEST).is_file()]
    doomed = complete[max(1, keep_last):]  # the newest complete checkpoint is never deleted
    for path in doomed:
        _remove(path)
    return doomed


def _gather_file_entries(tmp: Path, written: dict[str, dict[str, Any]], sha256: bool) -> dict[str, dict[str, Any]]:
    """{name under `tmp`: entry} of every file there: those the ranks recorded while writing, and any other (a file
    written outside DeepSpeed's checkpoint engine) fsync'd and measured by a share of the ranks. Collective."""
    rank, world = _rank_world()
    recorded = {os.path.relpath(path, tmp): entry for path, entry in written.items()}
    recorded = {name: entry for name, entry in recorded.items() if not name.startswith("..")}
    files = {name: entry for share in _all_gather(recorded) for name, entry in share.items()}
    unrecorded = [name for name in _files_under(tmp) if name not in files]
    measured = {name: dsckpt.file_entry(tmp / name, sha256) for name in unrecorded[rank::world]}
    files.update({name: entry for share in _all_gather(measured) for name, entry in share.items()})
    return dict(sorted(files.items()))


def save_checkpoint(engine, save_dir: str | Path, state: TrainingState, keep_last: int) -> Path:
    """Write a complete checkpoint of `state.step` and return its directory. Collective: every rank calls it.

    What the manifest records for each file follows the saved config's `train.checkpoint_verify` (sha256: size
    and hash; size: size only); each rank records the files it wrote (`dsckpt.save_engine`).
    """
    rank, world = _rank_world()
    save_dir = Path(save_dir)
    tag = tag_name(state.step)
    tmp = save_dir / (TMP_PREFIX + tag)
    verify = state.config.get("train", {}).get("checkpoint_verify", "sha256")
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(TMP_PREFIX + "*"):  # left by a killed save or deletion
            shutil.rmtree(stale, ignore_errors=True)
    state.rng_states = _all_gather(rng_state())
    _barrier()
    written = dsckpt.save_engine(engine, tmp, state.client_state(), sha256=verify == "sha256")
    _barrier()
    files = _gather_file_entries(tmp, written, verify == "sha256")
    missing = [p for p in state.layout.required_files() if not any(fnmatch(name, p) for name in files)]
    if missing:  # every rank sees the same gathered listing, so every rank raises
        raise CheckpointError(f"checkpoint {tmp} is incomplete after every rank wrote it: no {missing}")
    error = None
    if rank == 0:
        try:
            final = save_dir / tag
            manifest = {"format": FORMAT_VERSION, "tag": tag, "step": state.step,
                        "consumed_samples": state.consumed_samples, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "layout": asdict(state.layout), "config": state.config, "verify": verify,
                        "optimizer_params": dsckpt.optimizer_index(engine), "files": files}
            _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            set_aside_newer(save_dir, state.step)
            if final.exists():  # the same step saved again (e.g. after resuming from an older checkpoint)
                _remove(final)
            os.rename(tmp, final)
            _fsync_dir(save_dir)
            _write_atomic(save_dir / LATEST, tag)
            _fsync_dir(save_dir)
            rotate(save_dir, keep_last)
        except OSError as exc:
            error = f"could not finalise checkpoint {tmp}: {exc}"
    error = _from_rank0(error)
    if error:
        raise CheckpointError(error)
    return save_dir / tag


# ----------------------------------------------------------------------------------------------------------------
# load

def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def elastic_refusal(manifest: dict[str, Any], saved: Layout, now: Layout) -> str | None:
    """Why the optimizer state of a checkpoint saved with layout `saved` cannot be resharded to `now`; None if it
    can (ZeRO-0 fp32 on both sides, format 2 or later, only the world size and ep_size changed)."""
    version = manifest.get("format")
    if version < 2:
        return (f"it is a format-{version} checkpoint, written before moe-lm could reshard optimizer state by "
                f"parameter name (format 2)")
    if saved.zero_stage or now.zero_stage:
        return (f"resharding covers ZeRO-0 only (saved: ZeRO-{saved.zero_stage}, now: ZeRO-{now.zero_stage}); "
                f"ZeRO-1/2 keep Adam's state in flat partitions per data-parallel rank")
    if saved.bf16 or now.bf16:
        return (f"resharding covers fp32 only (saved: {'bf16' if saved.bf16 else 'fp32'}, now: "
                f"{'bf16' if now.bf16 else 'fp32'}); bf16 keeps fp32 master weights and Adam's state in flat groups")
    if not manifest.get("optimizer_params"):
        return "its manifest has no optimizer index (optimizer_params)"
    return None


def check_compatible(path: Path, manifest: dict[str, Any], config: dict[str, Any], layout: Layout,
                     weights_only: bool) -> bool:
    """Whether the optimizer state of checkpoint `path` is loaded into this run (False: weights only).

    Raises `CheckpointError` if the model shapes differ, if the format is unknown, or if the parallel layout
    changed in a way the optimizer state cannot follow (see `elastic_refusal`) and `weights_only` is off; warns
    about every other setting that differs from the checkpoint's.
    """
    checkpoint_format(path, manifest)
    saved, now = _flatten(manifest["config"]), _flatten(config)
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    architecture = [key for key in changed if key in architecture_keys(manifest["config"])]
    if architecture:
        raise CheckpointError(f"{path} holds another model: " + ", ".join(
            f"{key}={saved.get(key)!r} in the checkpoint, {now.get(key)!r} now" for key in architecture)
            + ". Resume with the checkpoint's model settings (its config is in manifest.json)")
    saved_layout = Layout(**manifest["layout"])
    others = [key for key in changed if key not in architecture and not key.startswith(_RUN_CONTROL_PREFIXES)]
    batches = _global_batch(saved, saved_layout.world_size), _global_batch(now, layout.world_size)
    differences = [f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in others
                   if batches[0] != batches[1] or key not in _BATCH_SPLIT_KEYS]
    if batches[0] != batches[1]:
        differences.insert(0, f"global batch {batches[0]} -> {batches[1]} sequences")
    if differences:
        log("resuming with settings that differ from the checkpoint's, so this is not an exact continuation: "
            + ", ".join(differences))
    changes = saved_layout.optimizer_changes(layout)
    if saved_layout.zero_stage != layout.zero_stage and not changes:
        log(f"parallel.zero_stage {saved_layout.zero_stage} -> {layout.zero_stage}: ZeRO-1 and ZeRO-2 keep the same "
            f"optimizer partitions, so the optimizer state loads as saved")
    if not changes:
        return not weights_only
    if weights_only:
        log(f"layout changed ({', '.join(changes)}): loading weights and progress, not the optimizer state")
        return False
    refusal = elastic_refusal(manifest, saved_layout, layout)
    if refusal:
        raise CheckpointError(
            f"{path} was saved with another parallel layout ({', '.join(changes)}). Its model weights can be loaded "
            f"(experts are stored per global id) but its optimizer state cannot follow: {refusal}. Set "
            f"train.resume_weights_only=true to continue with the weights, step, data position and LR schedule "
            f"and a fresh optimizer state (docs/checkpoints.md), or resume with the saved layout")
    log(f"layout changed ({', '.join(changes)}): resharding the optimizer state by parameter name")
    return True


def _global_batch(flat_config: dict[str, Any], world_size: int) -> int | None:
    try:
        return flat_config["train.micro_batch_size"] * flat_config["train.grad_accum_steps"] * world_size
    except (KeyError, TypeError):
        return None


def current_layout(engine) -> tuple[int, int]:
    """(world size, ep_size) of the running engine: what the optimizer shards of a ZeRO-0 checkpoint depend on."""
    return _rank_world()[1], dsckpt.ep_size(engine.module)


def load_checkpoint(engine, path: str | Path, load_optimizer: bool, trust: bool = False) -> TrainingState:
    """Load weights (experts by global id), LR scheduler and, if asked, optimizer state into `engine`. Collective.

    Every file is read by `load_file` (weights_only; `trust` = `train.trust_checkpoint`), after the ranks have
    checked together that none needs more (`files_needing_trust`). If the world size or ep_size differs from the
    checkpoint's, the optimizer state is loaded by parameter name (`dsckpt.load_optimizer_by_name`;
    `check_compatible` has vetted that it can be).
    """
    path = Path(path)
    manifest = read_manifest(path)
    version = checkpoint_format(path, manifest)
    if not trust and (refusals := files_needing_trust(path, [n for n in manifest["files"] if n.endswith(".pt")],
                                                      version)):
        more = f" (and {len(refusals) - 1} more such file(s))" if len(refusals) > 1 else ""
        raise CheckpointError(refusals[0] + more)
    saved = Layout(**manifest["layout"])
    by_name = load_optimizer and (saved.world_size, saved.ep_size) != current_layout(engine)

    def load(file, map_location=None):
        return load_file(file, trust=trust, format_version=version, map_location=map_location)
    try:
        client_state = dsckpt.load_engine(engine, path, load, load_optimizer=load_optimizer and not by_name)
        if client_state is not None and by_name:
            dsckpt.load_optimizer_by_name(engine, path, saved.ep_size, saved.num_experts,
                                          manifest["optimizer_params"], load)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"could not load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if client_state is None:
        raise CheckpointError(f"could not load checkpoint {path}: DeepSpeed found no {dsckpt.MODEL_STATES}")
    return TrainingState.from_client_state(client_state, path)
