"""Export: a checkpoint's weights as one consolidated safetensors file (`consolidated.py`; `moe-lm export`)."""

from moe_lm.export.consolidated import (build_model, config_from_dict, consolidated_state_dict, export_checkpoint,
                                        load_exported)

__all__ = ["build_model", "config_from_dict", "consolidated_state_dict", "export_checkpoint", "load_exported"]
