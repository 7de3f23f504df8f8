"""Checkpoints, for training and everything after it (docs/checkpoints.md).

`store.py`: the on-disk format and its policy: atomic saves with a manifest, validation, rotation, which
checkpoint a resume takes, what may change on resume, and loading that runs no pickled code. `consolidated.py`: a
checkpoint's weights as one state dict (every expert by global id), one safetensors file, or a model
(`load_model`). DeepSpeed's file names and engine calls stay behind `moe_lm/moe/deepspeed_checkpoint.py`.
"""

from moe_lm.checkpoint.consolidated import (config_from_dict, consolidated_state_dict, export_checkpoint,
                                            load_exported, load_model)
from moe_lm.checkpoint.store import (CHECKPOINT_DIR, FORMAT, FORMAT_VERSION, LATEST, MANIFEST, RNG_STATES, STEP,
                                     TMP_PREFIX, CheckpointError, Layout, TrainingState, check_compatible,
                                     find_checkpoint, list_checkpoints, load_checkpoint, load_file, log, read_manifest,
                                     rng_state, rotate, run_dir_of, save_checkpoint, set_rng_state, step_of, tag_name,
                                     validate_checkpoint)

__all__ = [
    "CHECKPOINT_DIR", "FORMAT", "FORMAT_VERSION", "LATEST", "MANIFEST", "RNG_STATES", "STEP", "TMP_PREFIX",
    "CheckpointError", "Layout", "TrainingState", "check_compatible", "config_from_dict",
    "consolidated_state_dict", "export_checkpoint", "find_checkpoint", "list_checkpoints", "load_checkpoint",
    "load_exported", "load_file", "load_model", "log", "read_manifest", "rng_state", "rotate", "run_dir_of",
    "save_checkpoint", "set_rng_state", "step_of", "tag_name", "validate_checkpoint",
]
