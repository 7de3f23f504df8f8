"""Router registry: `model.moe.router.name` -> (config dataclass, router class).

Adding a router costs one file here, one line in `REGISTRY`, one recipe in `recipes/router/` and one test file.
"""

from __future__ import annotations

from moe_lm.config.schema import ConfigError, RouterConfig
from moe_lm.routers.base import Diagnostics, Router, RouterOutput
from moe_lm.routers.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter
from moe_lm.routers.grmoe import GrMoEConfig, GrMoERouter
from moe_lm.routers.hash import HashConfig, HashRouter
from moe_lm.routers.mpi import MPIConfig, MPIRouter
from moe_lm.routers.sinkhorn import SinkhornConfig, SinkhornRouter
from moe_lm.routers.softmax_topk import SoftmaxTopKConfig, SoftmaxTopKRouter

REGISTRY: dict[str, tuple[type[RouterConfig], type[Router]]] = {
    "softmax_topk": (SoftmaxTopKConfig, SoftmaxTopKRouter),
    "grmoe": (GrMoEConfig, GrMoERouter),
    "mpi": (MPIConfig, MPIRouter),
    "expert_choice": (ExpertChoiceConfig, ExpertChoiceRouter),
    "sinkhorn": (SinkhornConfig, SinkhornRouter),
    "hash": (HashConfig, HashRouter),
}


def router_config_class(name: str) -> type[RouterConfig]:
    if name not in REGISTRY:
        raise ConfigError("model.moe.router.name", f"unknown router {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name][0]


def build_router(cfg: RouterConfig, d_model: int, num_experts: int, top_k: int) -> Router:
    router_config_class(cfg.name)
    return REGISTRY[cfg.name][1](cfg, d_model, num_experts, top_k)


__all__ = ["REGISTRY", "Diagnostics", "Router", "RouterOutput", "build_router", "router_config_class"]
