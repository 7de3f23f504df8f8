"""A checkpoint's weights as one state dict, one safetensors file (`moe-lm export --out`), or a model.

The state dict is that of the model built with ep_size=1, so every expert is keyed by its global id
(`blocks.{i}.ffn.deepspeed_moe.experts.deepspeed_experts.{E}.w1.weight`) whatever the ep_size of the run;
router parameters and persistent buffers (e.g. `balance_bias_E`) are included. An exported file's header metadata
holds the resolved config (`moe_lm_config`, JSON) and the step, so the file alone rebuilds the model:

    moe-lm export runs/x/checkpoints/step_00000200 --out x.safetensors
    model, cfg = load_model("x.safetensors")       # MoETransformer(ep_size=1), weights loaded strictly
    model, cfg = load_model("runs/x")              # the same from the run's newest complete checkpoint

Weights are exported as stored: the module weights DeepSpeed saved (bf16 for a bf16 run, whose fp32 master copy
lives in the optimizer state and is not exported). The optimizer state is not exported.

Every checkpoint file is read with `torch.load(weights_only=True)` (`store.load_file`), so exporting or
evaluating a checkpoint from someone else runs none of its code; a file that needs more is refused, naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moe_lm.moe.deepspeed_checkpoint as dsckpt
from moe_lm.checkpoint import store
from moe_lm.config import Config, load_config
from moe_lm.model.transformer import MoETransformer

CONFIG_KEY = "moe_lm_config"
STEP_KEY = "moe_lm_step"
TRUST_HINT = ("moe-lm's own checkpoint files hold tensors and plain data only, so this one was written by something "
              "else or changed since; load it with consolidated_state_dict(..., trust=True) only if you trust "
              "whoever could have written it")


def consolidated_state_dict(checkpoint: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(full state dict with experts by global id, manifest) of a checkpoint directory, or of the newest complete
    checkpoint in a run or checkpoints directory. The checkpoint is validated first (sizes and hashes), and its
    files are read weights-only (`trust`: unpickle a file that needs more, running its code)."""
    path = store.find_checkpoint(str(checkpoint), checkpoint, source="checkpoint")
    manifest = store.read_manifest(path)
    version = store.checkpoint_format(path, manifest)
    layout = store.Layout(**manifest["layout"])

    def load(file: Path):
        return store.load_file(file, trust=trust, format_version=version, hint=TRUST_HINT)
    try:
        state = dsckpt.read_weights(path, layout.num_moe_layers, layout.num_experts, load)
    except ValueError as exc:
        raise store.CheckpointError(str(exc)) from exc
    return state, manifest


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the consolidated weights of `checkpoint` (see `consolidated_state_dict`) to `out` atomically."""
    state, manifest = consolidated_state_dict(checkpoint)
    tensors, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.data_ptr() in seen:  # tied embeddings share storage, which safetensors refuses
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(manifest["config"]), STEP_KEY: str(manifest["step"])}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a model file is meant to be shared
    os.replace(tmp, out)
    return out


def config_from_dict(config: dict) -> Config:
    """A typed, validated `Config` from a resolved config dict (as saved in checkpoints and exports)."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "config.yaml"
        recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        return load_config(recipe)


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """(state dict, config) of an exported file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata: not written by `moe-lm export`")
    return load_file(str(path)), config_from_dict(json.loads(metadata[CONFIG_KEY]))


def load_model(path: str | Path) -> tuple[MoETransformer, Config]:
    """(model in eval mode, its config) from an exported file, a checkpoint directory, or a run or checkpoints
    directory (its newest complete checkpoint): an ep_size=1 `MoETransformer` (every expert local), whatever the
    layout that trained it, with the weights loaded strictly."""
    if Path(path).is_file():
        state, cfg = load_exported(path)
    else:
        state, manifest = consolidated_state_dict(path)
        cfg = config_from_dict(manifest["config"])
    model = MoETransformer(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg
