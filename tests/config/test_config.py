"""Recipes load onto the typed schema; every bad value fails at load with the key's dotted path."""

from pathlib import Path

import pytest

from moe_lm.config import ConfigError, load_config
from moe_lm.model.transformer import count_parameters

RECIPES = sorted(p for p in Path(__file__).parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_builds_on_the_meta_device(recipe):
    cfg = load_config(recipe)
    counts = count_parameters(cfg.model)
    assert counts.total >= counts.active > 0


@pytest.mark.parametrize("override, key", [
    (["model.moe.top_k=9"], "model.moe.top_k"),
    (["parallel.ep_size=3"], "parallel.ep_size"),
    (["parallel.zero_stage=3"], "parallel.zero_stage"),
    (["model.moe.router.name=nope"], "model.moe.router.name"),
    (["model.moe.router.no_such_key=1"], "model.moe.router.no_such_key"),
    (["train.no_such_key=1"], "train.no_such_key"),
    (["train.lr=fast"], "train.lr"),
    (["model.n_heads=3"], "model.n_heads"),
    (["wandb.mode=sometimes"], "wandb.mode"),
    (["train.profile_steps=0"], "train.profile_steps"),
    (["train.compile_mode=fast"], "train.compile_mode"),
    (["train.profile_start=301"], "train.profile_start"),  # the quickstart trains 300 steps
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("recipes/quickstart.yaml", override)
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_public_keys_exist_under_their_names():
    cfg = load_config("recipes/quickstart.yaml", ["model.moe.router.name=softmax_topk", "model.moe.num_experts=4",
                                                  "model.moe.top_k=1", "parallel.ep_size=2", "train.max_steps=7",
                                                  "train.seed=3", "run.dir=/tmp/x"])
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.parallel.ep_size) == (4, 1, 2)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.run.dir) == (7, 3, "/tmp/x")


def test_recipe_parts_compose_and_overrides_win(tmp_path):
    (tmp_path / "part.yaml").write_text("train:\n  lr: 0.5\n  max_steps: 3\n")
    (tmp_path / "recipe.yaml").write_text("include: [part.yaml]\ntrain:\n  max_steps: 4\n")
    cfg = load_config(tmp_path / "recipe.yaml", ["train.seed=9"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.seed) == (0.5, 4, 9)


def test_a_single_include_may_be_written_without_a_list(tmp_path):
    (tmp_path / "part.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "recipe.yaml").write_text("include: part.yaml\ntrain:\n  max_steps: 4\n")
    cfg = load_config(tmp_path / "recipe.yaml")
    assert (cfg.train.lr, cfg.train.max_steps) == (0.5, 4)


def test_an_include_that_is_neither_a_file_nor_a_list_names_the_recipe(tmp_path):
    (tmp_path / "recipe.yaml").write_text("include: {model: tiny.yaml}\n")
    with pytest.raises(ConfigError, match="recipe.yaml: include must be a file or a list of files") as err:
        load_config(tmp_path / "recipe.yaml")
    assert err.value.key == "include"


def test_switching_router_on_the_command_line_drops_the_old_routers_keys():
    from moe_lm.routers import REGISTRY
    other = next((name for name in sorted(REGISTRY) if name != "softmax_topk"), None)
    if other is None:
        pytest.skip("only one router registered")
    with pytest.warns(UserWarning, match="renormalize"):
        cfg = load_config("recipes/quickstart.yaml", [f"model.moe.router.name={other}"])
    assert cfg.model.moe.router.name == other


def test_missing_recipe_file_is_named():
    with pytest.raises(ConfigError, match="no_such_recipe.yaml"):
        load_config("recipes/no_such_recipe.yaml")


def test_interpolations_resolve_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = load_config("recipes/quickstart.yaml", ["run.name=job_${oc.env:SLURM_JOB_ID}"])
    assert cfg.run.dir == "runs/job_4242" and cfg.wandb.name == "job_4242"
