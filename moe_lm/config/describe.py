"""Every recipe key with its type, default and docstring, read from the schema: the text of `moe-lm train --help`.

The docstrings are the string literals placed after each field in `schema.py` and in the routers' config
dataclasses (the convention of this codebase); they are read from the source with `ast`, so the help cannot drift
from the schema. The router section is that of one router: the one the recipe and overrides on the command line
name, else the default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from importlib import metadata

from moe_lm.config.schema import Config, ConfigError, RouterConfig

DEFAULT_ROUTER = RouterConfig.name
WIDTH = 100


@dataclass(frozen=True)
class KeyDoc:
    key: str
    """Dotted path, e.g. model.moe.top_k."""
    type: str
    default: object
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} of a dataclass and its bases: the string literal right after each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (e.g. a class made at runtime)
            continue
        body = tree.body[0].body
        for stmt, following in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


def describe_keys(router: str = DEFAULT_ROUTER) -> list[KeyDoc]:
    """Every key of a recipe, in schema order, with the router section of `router`."""
    from moe_lm.routers import router_config_class

    def walk(cls: type, prefix: str) -> list[KeyDoc]:
        docs, keys = field_docs(cls), []
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if key == "model.moe.router":
                keys += walk(router_config_class(router), key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                keys += walk(type(default), key + ".")
            else:
                keys.append(KeyDoc(key, str(f.type), default, docs.get(f.name, "")))
        return keys

    return walk(Config, "")


def schema_help(router: str = DEFAULT_ROUTER) -> str:
    """`key  type = default` lines, each followed by its docstring, wrapped to WIDTH columns."""
    lines = [*textwrap.wrap(f"recipe keys, as KEY  TYPE = DEFAULT and what it does; set them in the recipe YAML or "
                            f"as KEY=VALUE overrides. The router section is {router}'s (another router: "
                            f"model.moe.router.name=NAME).", WIDTH), ""]
    for k in describe_keys(router):
        lines.append(f"  {k.key}  {k.type} = {k.default!r}")
        for paragraph in k.doc.split("\n\n") if k.doc else []:
            lines += textwrap.wrap(" ".join(paragraph.split()), WIDTH, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6, break_on_hyphens=False)
    return "\n".join(lines)


def router_name(recipe: str | None, overrides: list[str]) -> str:
    """The router a recipe and its overrides name (the default when they name none, or cannot be read)."""
    from omegaconf import OmegaConf

    from moe_lm.config.load import ROUTER_KEY, compose_recipe

    try:
        layers = [compose_recipe(recipe)] if recipe else []
        layers.append(OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
        name = OmegaConf.select(OmegaConf.merge(*layers), ROUTER_KEY + ".name", default=DEFAULT_ROUTER)
    except (ConfigError, ValueError, OSError):
        return DEFAULT_ROUTER
    return str(name)


class RecipeHelpAction(argparse.Action):
    """-h/--help of a command that takes a recipe: the usage, then every recipe key (`schema_help`) of the router
    the recipe and overrides given before --help name."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from moe_lm.routers import REGISTRY

        name = router_name(getattr(namespace, "recipe", None), getattr(namespace, "overrides", None) or [])
        parser.epilog = schema_help(name if name in REGISTRY else DEFAULT_ROUTER)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.print_help()
        parser.exit()


def version_string() -> str:
    """`moe-lm X (torch Y, deepspeed Z, transformers W)`, from the installed packages' metadata (nothing imported)."""
    from moe_lm import __version__

    def installed(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{p} {installed(p)}" for p in ("torch", "deepspeed", "transformers"))
    return f"moe-lm {__version__} ({deps})"
