"""Recipe loading: compose YAML parts, apply `key=value` overrides, merge onto the typed schema, validate.

A recipe may list other recipe files under `include:` (paths relative to it; one file may be given without a
list); they are merged first, in order, then the recipe's own keys, then the command-line overrides. A layer
that sets another `model.moe.router.name` replaces the router section below it (the old router's keys would be
unknown to the new one); on the command line that is said in a warning listing the dropped keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_lm.config.schema import Config, ConfigError, validate

ROUTER_KEY = "model.moe.router"


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError("recipe", f"file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml's errors carry the line; keep them
        raise ConfigError("recipe", f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError("recipe", f"{path} must hold a mapping at the top level")
    return node


def _merge_layer(base: DictConfig, top: DictConfig, warn: bool = False) -> DictConfig:
    """`top` over `base`; if `top` names another router, `base`'s router section is dropped first."""
    old = OmegaConf.select(base, ROUTER_KEY + ".name", default="softmax_topk")
    new = OmegaConf.select(top, ROUTER_KEY + ".name", default=old)
    if new != old and OmegaConf.select(base, ROUTER_KEY) is not None:
        dropped = [k for k in base.model.moe.router if k != "name"]
        if warn and dropped:
            warnings.warn(f"router switched to {new!r}: ignoring the recipe's {old} keys {dropped}", stacklevel=3)
        del base.model.moe["router"]
    return OmegaConf.merge(base, top)


def compose_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """The recipe at `path` with its `include:` parts merged underneath it (untyped)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError("include", f"{path} includes itself (via {' -> '.join(map(str, _seen))})")
    node = _read_yaml(path)
    parts = node.pop("include", None) or []
    if isinstance(parts, str):  # `include: model/tiny.yaml` means a list of one
        parts = [parts]
    if not isinstance(parts, (list, ListConfig)):
        raise ConfigError("include", f"{path}: include must be a file or a list of files, got {parts!r}")
    merged = OmegaConf.create()
    for part in parts:
        merged = _merge_layer(merged, compose_recipe(path.parent / str(part), _seen + (path,)))
    return _merge_layer(merged, node)


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, "an override must look like key.path=value")
    return OmegaConf.from_dotlist(list(overrides))


def _config_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "recipe"
    message = str(exc).splitlines()[0]
    return ConfigError(key, message)


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Typed, validated config from a recipe file (or the schema defaults) and dotlist overrides."""
    from moe_lm.routers import router_config_class  # here: the routers import the schema from this package

    layers = _merge_layer(compose_recipe(recipe) if recipe else OmegaConf.create(), _parse_overrides(overrides),
                          warn=True)
    schema = Config()
    schema.model.moe.router = router_config_class(str(OmegaConf.select(layers, ROUTER_KEY + ".name",
                                                                       default="softmax_topk")))()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from exc
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
