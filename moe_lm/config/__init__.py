"""Typed recipes: the schema (`schema.py`) and the loader that composes YAML parts and overrides (`load.py`)."""

from moe_lm.config.load import compose_recipe, load_config, to_dict, to_yaml
from moe_lm.config.schema import (Config, ConfigError, DataConfig, MetricsConfig, ModelConfig, MoEConfig,
                                  ParallelConfig, RouterConfig, RunConfig, TrainConfig, WandbConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "MetricsConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
           "RouterConfig", "RunConfig", "TrainConfig", "WandbConfig", "compose_recipe", "load_config", "to_dict",
           "to_yaml"]
