"""DeepSpeed's checkpoint files: read without running code, recorded (size, sha256) by the rank that wrote them,
and, for a ZeRO-0 fp32 run, its optimizer state mapped to parameter names so that it can follow a run to another
world size or ep_size. `moe_lm/checkpoint/` owns the policy (what is allowed, what is checked) and asks this file
for everything that depends on DeepSpeed 0.19.8's file names and internals.

What DeepSpeed pickles (real checkpoints saved at ZeRO 0/1/2, fp32 and bf16, 1 and 2 processes, every file listed
with `torch.serialization.get_unsafe_globals_in_checkpoint`):

    mp_rank_00_model_states.pt                   tensors, dicts, lists, str, int, float, bool, None
    layer_{L}_expert_{E}_mp_rank_00_model_states.pt    tensors only
    expp_rank_{r}_mp_rank_00_optim_states.pt     ZeRO-0: the optimizer's state dict (bf16: its wrapper's), plain
    [bf16_]zero_pp_rank_{d}_mp_rank_00_optim_states.pt   ZeRO-1/2: plus ZeroStageEnum, LossScaler, fragment_address

Those three classes are plain data (an Enum, a static loss scale, a (numel, start) dataclass); `SAFE_GLOBALS`
lets `torch.load(weights_only=True)` build them and nothing else.

DeepSpeed reads and writes every checkpoint file through `engine.checkpoint_engine`; its `TorchCheckpointEngine`
loads with `torch.load(weights_only=False)`, and 0.19.8 has no setting to change that. `moe_lm_checkpoint_engine`
puts a `RecordingCheckpointEngine` there for the length of one save or load: it loads through moe-lm's safe loader,
and after each file it saves it queues the file for a background thread that fsyncs it and records its size and
sha256 (the page-cache copy the rank just wrote, overlapped with the next write). Under ZeRO-0 it also leaves out
the second copy of the optimizer state that DeepSpeed puts into the model-states file and never reads back.

Expert ids (DeepSpeed's default topology): the rank at expert-parallel position p holds experts
[p·E/ep, (p+1)·E/ep) and names them locally `...deepspeed_moe.experts.deepspeed_experts.{local}.*`; the
checkpoint's expert files and the name-keyed optimizer state use the GLOBAL id, p·E/ep + local.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from deepspeed.moe.layer import MoE
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

SAFE_GLOBALS = (ZeroStageEnum, LossScaler, fragment_address)
"""The non-container classes in DeepSpeed 0.19.8's checkpoint files (ZeRO-1/2 optimizer partitions only)."""

_EXPERT_NAME = re.compile(r"(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)")


MODEL_STATES = "mp_rank_00_model_states.pt"
"""The non-expert weights, the LR scheduler and moe-lm's client state (written by rank 0)."""


def expert_file(moe_layer: int, expert: int) -> str:
    """DeepSpeed's shard of one expert: `moe_layer` counts MoE layers only, `expert` is the GLOBAL expert id."""
    return f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def optimizer_file(ep_rank: int) -> str:
    """ZeRO-0: the whole optimizer state of expert-parallel position `ep_rank` (dense + its experts)."""
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def required_files(world_size: int, ep_size: int, zero_stage: int, num_moe_layers: int,
                   num_experts: int) -> list[str]:
    """fnmatch patterns of the files DeepSpeed writes for this layout (one match each)."""
    files = [MODEL_STATES]
    files += [expert_file(layer, expert) for layer in range(num_moe_layers) for expert in range(num_experts)]
    if zero_stage == 0:  # the whole optimizer state, once per expert-parallel rank
        files += [optimizer_file(r) for r in range(ep_size)]
    else:  # ZeRO-1/2 partitions, once per data-parallel rank ("bf16_" prefix in bf16)
        files += [f"*zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in range(world_size)]
    return files


# ----------------------------------------------------------------------------------------------------------------
# the checkpoint engine of one save or load

def file_entry(path: str | Path, sha256: bool) -> dict[str, Any]:
    """{"bytes"[, "sha256"]} of a file, fsync'd before returning, so a manifest never vouches for data still in
    flight. The hash reads the page cache while the kernel writes the file back, then the fsync waits for the rest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sha256:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)  # releases the GIL: the hashing thread overlaps the next write
        os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size
    return {"bytes": size, "sha256": digest.hexdigest()} if sha256 else {"bytes": size}


class RecordingCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with `load` replaced by `load_fn` and every saved file recorded.

    `written` maps each path this rank saved to a Future of its `file_entry` (hashed by one background thread).
    With `drop_model_states_optimizer` (an MoE model under ZeRO-0), the copy of rank 0's optimizer state that
    DeepSpeed also puts into mp_rank_00_model_states.pt is not written: DeepSpeed loads an MoE model's optimizer
    from the expp_rank files only (`DeepSpeedEngine._load_checkpoint`), so it is dead weight, about the size of
    those files again.
    """

    def __init__(self, base: TorchCheckpointEngine, load_fn: Callable[..., Any] | None, sha256: bool,
                 pool: ThreadPoolExecutor, drop_model_states_optimizer: bool = False):
        super().__init__(config_params=None)
        self.zipfile_serialization = base.zipfile_serialization
        self.base, self.load_fn, self.sha256, self.pool = base, load_fn, sha256, pool
        self.drop_model_states_optimizer = drop_model_states_optimizer
        self.written: dict[str, Future] = {}

    def save(self, state_dict, path: str):
        if self.drop_model_states_optimizer and os.path.basename(path) == MODEL_STATES:
            state_dict = {**state_dict, "optimizer": None}
        super().save(state_dict, path)
        self.written[str(path)] = self.pool.submit(file_entry, path, self.sha256)

    def load(self, path: str, map_location=None):
        if self.load_fn is None:
            return self.base.load(path, map_location=map_location)
        return self.load_fn(path, map_location=map_location)


@contextlib.contextmanager
def moe_lm_checkpoint_engine(engine, load_fn: Callable[..., Any] | None = None,
                             sha256: bool = True) -> Iterator[dict[str, dict[str, Any]]]:
    """Within: `engine` saves and loads through a `RecordingCheckpointEngine`. Yields a dict that, on a normal
    exit, is filled with {path as DeepSpeed named it: file_entry} of the files this rank saved.

    An engine without a checkpoint engine (a test double) is left alone and records nothing. One with another
    engine (DeepSpeed's fast/decoupled/datastates writers, which moe-lm never configures) is refused, since its
    loads would not be weights-only.
    """
    written: dict[str, dict[str, Any]] = {}
    base = getattr(engine, "checkpoint_engine", None)
    if base is None:
        yield written
        return
    if type(base) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed checkpoint engine {type(base).__name__}: moe-lm reads and records checkpoints "
                         f"through TorchCheckpointEngine only (do not set checkpoint writers in the DeepSpeed config)")
    # the engine's own predicates (ZeRO-0: no ZeRO optimizer wrapper holds the state)
    drop = bool(getattr(engine, "has_moe_layers", False)) and not engine.zero_optimization()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash") as pool:
        recording = RecordingCheckpointEngine(base, load_fn, sha256, pool, drop_model_states_optimizer=drop)
        engine.checkpoint_engine = recording
        try:
            yield written
        finally:
            engine.checkpoint_engine = base
        written.update({path: future.result() for path, future in recording.written.items()})


def save_engine(engine, directory: Path, client_state: dict[str, Any], sha256: bool) -> dict[str, dict[str, Any]]:
    """Write `engine`'s weights (experts by global id), optimizer and LR scheduler state and `client_state` into
    `directory` (no `latest` file); return {path: file_entry} of the files this rank wrote. Collective."""
    with moe_lm_checkpoint_engine(engine, sha256=sha256) as written:
        engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client_state,
                               save_latest=False)
    return written


def load_engine(engine, directory: Path, load_fn: Callable[..., Any], load_optimizer: bool) -> dict[str, Any] | None:
    """Load weights (experts by global id), LR scheduler and, if asked, optimizer state saved by `save_engine` into
    `engine`, reading every file with `load_fn`; return the client state, None if `directory` has no
    `MODEL_STATES`. Collective."""
    with moe_lm_checkpoint_engine(engine, load_fn=load_fn):
        load_path, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                         load_optimizer_states=load_optimizer,
                                                         load_lr_scheduler_states=True)
    return client_state if load_path is not None else None


def read_weights(directory: Path, num_moe_layers: int, num_experts: int,
                 load_fn: Callable[[Path], Any]) -> dict[str, torch.Tensor]:
    """The full state dict saved in `directory`, every expert keyed by its global id (the state dict of the model
    built with ep_size=1), each file read with `load_fn`. Raises ValueError naming an expert shard that holds other
    keys (DeepSpeed renames local ids to global ones on save: anything else is a corrupt shard)."""
    state = dict(load_fn(directory / MODEL_STATES)["module"])
    for layer in range(num_moe_layers):
        for expert in range(num_experts):
            shard_path = directory / expert_file(layer, expert)
            shard = load_fn(shard_path)
            wrong = [key for key in shard if not (match := _EXPERT_NAME.fullmatch(key)) or int(match[2]) != expert]
            if wrong:
                raise ValueError(f"{shard_path} should hold expert {expert} only, but has {wrong}")
            state.update(shard)
    return state


# ----------------------------------------------------------------------------------------------------------------
# parameter names with global expert ids

def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def ep_size(model: torch.nn.Module) -> int:
    """The expert-parallel size the model was built with (1 without MoE layers)."""
    layers = moe_layers(model)
    return layers[0].ep_size if layers else 1


def global_name(name: str, expert_ids: Sequence[int]) -> str:
    """`name` with its local expert id replaced by `expert_ids[local]`; names outside experts unchanged."""
    match = _EXPERT_NAME.fullmatch(name)
    return f"{match[1]}{expert_ids[int(match[2])]}{match[3]}" if match else name


def global_param_names(model: torch.nn.Module) -> dict[int, str]:
    """{id(parameter): name with global expert ids} for every parameter of `model` (an MoETransformer, whose MoE
    layers know their `global_expert_ids`)."""
    names = {}
    expert_ids = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MoE):
            expert_ids[f"{module_name}.deepspeed_moe.experts.deepspeed_experts."] = module.global_expert_ids
    for name, param in model.named_parameters():
        match = _EXPERT_NAME.fullmatch(name)
        names[id(param)] = global_name(name, expert_ids[match[1]]) if match else name
    return names


def plain_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer holding the model's own parameters, when DeepSpeed steps it directly (ZeRO-0 without
    bf16/fp16); None under a ZeRO-1/2 or bf16 wrapper, whose state lives in flat fp32 partitions."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or optimizer is not getattr(engine, "basic_optimizer", None):
        return None
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def optimizer_index(engine) -> list[dict[str, Any]] | None:
    """What each entry of the optimizer's state dict is: per param group, whether it is an MoE group and the LOCAL
    names of its parameters in order (the same list on every expert-parallel rank). None if not a plain optimizer."""
    optimizer = plain_optimizer(engine)
    if optimizer is None:
        return None
    names = {id(param): name for name, param in engine.module.named_parameters()}
    return [{"moe": bool(group.get("moe", False)), "params": [names[id(p)] for p in group["params"]]}
            for group in optimizer.param_groups]


def load_optimizer_by_name(engine, path: Path, saved_ep_size: int, num_experts: int,
                           index: list[dict[str, Any]], load_fn: Callable[..., Any]) -> int:
    """Load a ZeRO-0 checkpoint's optimizer state into `engine`'s plain torch optimizer by parameter name, whatever
    ep_size / world size saved it. Returns the number of parameters given a state. Raises ValueError naming the
    file or parameter at fault.

    The saved `expp_rank_{p}` file holds the state of position p's optimizer, entry j of group i being the
    parameter `index[i]["params"][j]` with local expert ids mapped to p·E/ep + local. This rank reads the files of
    the positions that held its experts (dense states are the same in each, so they come from the first), picks its
    parameters' states, and loads them with the saved group hyperparameters (lr, betas, ...).
    """
    optimizer = plain_optimizer(engine)
    if optimizer is None:
        raise ValueError("optimizer state by parameter name needs ZeRO-0 in fp32 (DeepSpeed stepping the torch "
                         "optimizer directly)")
    names = global_param_names(engine.module)
    current = optimizer.state_dict()
    saved_shape = [(group["moe"], len(group["params"])) for group in index]
    now_shape = [(bool(group.get("moe", False)), len(group["params"])) for group in optimizer.param_groups]
    if [moe for moe, _ in saved_shape] != [moe for moe, _ in now_shape]:
        raise ValueError(f"{path}: the saved optimizer has param groups (moe, size) {saved_shape}, this one "
                         f"{now_shape}")
    per_file = num_experts // saved_ep_size
    wanted = set(names.values())
    positions = sorted({int(match[2]) // per_file for name in wanted if (match := _EXPERT_NAME.fullmatch(name))}) or [0]
    states: dict[str, dict[str, torch.Tensor] | None] = {}
    saved_groups: list[dict[str, Any]] = []
    for position in positions:
        file = path / optimizer_file(position)
        saved = load_fn(file, map_location="cpu")["optimizer"]
        if len(saved["param_groups"]) != len(index):
            raise ValueError(f"{file} has {len(saved['param_groups'])} param groups, the manifest's index "
                             f"{len(index)}")
        saved_groups = saved_groups or saved["param_groups"]
        expert_ids = range(position * per_file, (position + 1) * per_file)
        for group, group_index in zip(saved["param_groups"], index):
            if len(group["params"]) != len(group_index["params"]):
                raise ValueError(f"{file}: a param group of {len(group['params'])} parameters, the manifest's index "
                                 f"lists {len(group_index['params'])}")
            for entry, local in zip(group["params"], group_index["params"]):
                name = global_name(local, expert_ids)
                if name in wanted and name not in states:
                    states[name] = saved["state"].get(entry)  # None: never stepped
        del saved
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    for group, entries, saved_group in zip(optimizer.param_groups, current["param_groups"], saved_groups):
        for param, entry in zip(group["params"], entries["params"]):
            name = names[id(param)]
            if name not in states:
                raise ValueError(f"{path}: no optimizer state for parameter {name}")
            if states[name] is None:
                continue
            for key, value in states[name].items():
                if value.ndim and value.shape != param.shape:
                    raise ValueError(f"{path}: optimizer state {key} of {name} has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(param.shape)}")
            state[entry] = states[name]
        # hyperparameters as saved (the LR the scheduler set last, as an exact resume restores them); the group's
        # name and moe flag are this layout's (DeepSpeed finds the expert process group by the name)
        hyper = {key: value for key, value in saved_group.items() if key not in ("params", "name", "moe")}
        groups.append({**entries, **hyper})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return len(state)
