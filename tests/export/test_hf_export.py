"""The transformers export (moe_lm/export/hf.py, hf_modeling.py): an exported run loads with AutoModelForCausalLM,
gives moe-lm's logits (moe-lm evaluated dropless, fp32, max abs diff <= 1e-4) and generates; a Mixtral-shaped recipe
loads as MixtralForCausalLM without remote code.

Runs are trained for a few steps by the real trainer in one spawned process (`trained_runs`, shared on disk with
test_generate.py and test_lm_eval.py); router variants that need no checkpoint are trained in-process for a few
optimizer steps (`trained_in_process`).
"""

import dataclasses
import json
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_lm.checkpoint import load_model
from moe_lm.config import load_config
from moe_lm.config.schema import RouterConfig
from moe_lm.export.hf import ExportError, export_hf, export_problems, export_state_dict, rotate_half_rows
from moe_lm.model.layers import apply_rope, rope_tables
from moe_lm.model.transformer import MoETransformer
from moe_lm.eval.evaluate import make_dropless
from tests.checkpoint.test_checkpoint import WORDS, write_corpus
from tests.distributed_utils import run_distributed

ROUTERS = ("softmax_topk", "mpi", "grmoe")
ATOL = 1e-4  # the acceptance bound; fp32 on CPU lands near 1e-6 (only summation orders differ)
SHAPE = ["model.vocab_size=300", "model.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
         "model.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2"]
IDS = (torch.arange(2 * 32) * 37 % 300).view(2, 32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second intra-op thread only adds waiting


def run_overrides(root, router, *extra):
    return [f"data.sources=[{root / 'corpus'}]", f"data.dir={root / 'data'}", "data.vocab_size=300",
            "data.val_fraction=0.1", *SHAPE, f"model.moe.router.name={router}", "train.max_steps=3",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=3",
            "train.eval_batches=1", "metrics.diagnostics_interval=1000", "wandb.mode=disabled",
            f"run.dir={root / router}", *extra]


def _train_worker(rank, world, root):
    from moe_lm.train import Trainer

    for router in ROUTERS:
        Trainer(load_config(None, run_overrides(root, router)), progress=False).train()


def trained_runs(tmp_path_factory):
    """ROOT/{softmax_topk,mpi,grmoe}: a 3-step run of each router (softmax_topk with MoE on every layer, so it fits
    Mixtral), and ROOT/data with their tokenizer. Trained once per session whichever test module asks first."""
    root = tmp_path_factory.getbasetemp() / "hf_export_runs"
    if not (root / "done").exists():
        write_corpus(root / "corpus")
        run_distributed(_train_worker, 1, root, timeout_s=300)
        (root / "done").touch()
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tokenizer trained on the test corpus, for models built in-process (no run, no trainer)."""
    import datasets

    from moe_lm.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(60)]
    train_tokenizer(datasets.Dataset.from_dict({"text": texts}), 300, folder)
    return folder


def moe_lm_logits(checkpoint, ids=IDS):
    """moe-lm's logits of a checkpoint, dropless, fp32."""
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        return make_dropless(model)(ids)[0]


def load_hf(folder, trust_remote_code=True):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                dtype=torch.float32).eval()


def assert_generates(model, prompt_len=5, new=4):
    out = model.generate(IDS[:1, :prompt_len], attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
                         max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (1, prompt_len + new) and torch.equal(out[:, :prompt_len], IDS[:1, :prompt_len])
    assert 0 <= int(out.min()) and int(out.max()) < 300


@pytest.mark.parametrize("router", ROUTERS)
def test_a_run_of_every_router_loads_with_remote_code_gives_moe_lm_logits_and_generates(runs, tmp_path, router):
    result = export_hf(runs / router, tmp_path / "hf", layout="moe_lm")
    assert result.layout == "moe_lm" and (tmp_path / "hf" / "modeling_moe_lm.py").is_file()
    model = load_hf(tmp_path / "hf")
    assert type(model).__name__ == "MoELMForCausalLM" and model.config.router["name"] == router
    with torch.no_grad():
        logits = model(IDS).logits
    torch.testing.assert_close(logits, moe_lm_logits(runs / router), atol=ATOL, rtol=0)
    assert_generates(model)


def test_a_softmax_topk_run_with_moe_on_every_layer_loads_as_mixtral_without_remote_code(runs, tmp_path):
    from transformers import MixtralForCausalLM

    result = export_hf(runs / "softmax_topk", tmp_path / "hf")  # layout "auto"
    assert result.layout == "mixtral" and result.not_mixtral == []
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and "auto_map" not in config
    assert not (tmp_path / "hf" / "modeling_moe_lm.py").exists()
    model = load_hf(tmp_path / "hf", trust_remote_code=False)
    assert isinstance(model, MixtralForCausalLM)
    with torch.no_grad():
        logits = model(IDS).logits
    torch.testing.assert_close(logits, moe_lm_logits(runs / "softmax_topk"), atol=ATOL, rtol=0)
    assert_generates(model)


def test_the_tokenizer_ships_with_the_model_context_and_bos_eos_pad(runs, tmp_path):
    export_hf(runs / "grmoe", tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert tokenizer.model_max_length == 32 == config["max_position_embeddings"]
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tokenizer.eos_token_id,) * 3
    text = "def f(x):\n    return x * 3  # ünïcode"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_exported_files_are_readable_by_everyone_and_nothing_is_left_beside_them(runs, tmp_path):
    export_hf(runs / "mpi", tmp_path / "hf")
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "modeling_moe_lm.py"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the staging folder was renamed, not copied


def test_export_refuses_a_folder_that_holds_files(runs, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_hf(runs / "mpi", tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]


def test_mixtral_layout_is_refused_with_the_reason_for_a_recipe_mixtral_cannot_express(runs, tmp_path):
    with pytest.raises(ExportError, match="router mpi"):
        export_hf(runs / "mpi", tmp_path / "hf", layout="mixtral")
    assert not (tmp_path / "hf").exists()


def test_a_model_without_an_inference_path_fails_the_export_and_says_why(tokenizer_dir, tmp_path):
    cfg = load_config(None, SHAPE)
    expert_choice = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, moe=dataclasses.replace(cfg.model.moe, router=RouterConfig(name="expert_choice"))))
    assert "no per-token, causal routing" in export_problems(expert_choice)[0]
    balanced = load_config(None, [*SHAPE, "model.moe.force_balanced_routing=true"])
    assert "force_balanced_routing" in export_problems(balanced)[0]
    with pytest.raises(ExportError, match="cannot export.*force_balanced_routing"):
        export_state_dict(MoETransformer(balanced.model).state_dict(), balanced, tmp_path / "hf", "auto",
                          tokenizer_dir)


# ---- router variants, trained in-process -------------------------------------------------------------------------

def trained_in_process(overrides, steps=4):
    """(model, cfg): a tiny MoETransformer after a few AdamW steps on fixed tokens, dropless, in eval mode; routers
    with per-step state (the expert bias) get their post_step, as in the trainer."""
    cfg = load_config(None, [*SHAPE, "model.moe.drop_tokens=false", *overrides])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, lm_loss, aux_loss = model(IDS, IDS.roll(-1, dims=1))
        (lm_loss + aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        if model.needs_step_counts():
            model.after_step([record.counts_E for record in model.routing_records()])
    return model.eval(), cfg


VARIANTS = {
    "grmoe_per_token_kappa_and_threshold_dispatch": (["model.moe.router.name=grmoe",
                                                      "model.moe.router.variational=concentration",
                                                      "model.moe.router.eval_threshold=0.6",
                                                      "model.moe.router.max_experts=3"], "moe_lm"),
    "grmoe_logit_vi_and_sharper_alpha": (["model.moe.router.name=grmoe", "model.moe.router.variational=logit",
                                          "model.moe.router.alpha=3"], "moe_lm"),
    "grmoe_loss_free_bias_calibrated_fast_kappa": (["model.moe.router.name=grmoe",
                                                     "model.moe.router.selection_bias=loss_free",
                                                     "model.moe.router.bias_update_rate=0.05",
                                                     "model.moe.router.kappa_calibration=true",
                                                     "model.moe.router.kappa_lr_scale=10",
                                                     "model.moe.router.alpha_jitter=0.5"], "moe_lm"),
    "grmoe_learned_log_prior": (["model.moe.router.name=grmoe", "model.moe.router.selection_bias=learned"],
                                "moe_lm"),
    "mpi_two_power_steps_unnormalised": (["model.moe.router.name=mpi", "model.moe.router.power_steps=2",
                                          "model.moe.router.renormalize=false", "model.moe.router.logit_scale=2"],
                                         "moe_lm"),
    "mpi_normalised_rows": (["model.moe.router.name=mpi", "model.moe.router.power=false"], "moe_lm"),
    "softmax_topk_bias_dense_layers_tied": (["model.moe.router.bias_update_rate=0.05", "model.moe.layer_freq=2",
                                             "model.tie_embeddings=true"], "moe_lm"),
    "softmax_topk_tied_mixtral": (["model.tie_embeddings=true", "model.moe.top_k=1"], "mixtral"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_router_variants_give_moe_lm_logits_in_the_layout_they_fit(tokenizer_dir, tmp_path, variant):
    overrides, layout = VARIANTS[variant]
    model, cfg = trained_in_process(overrides)
    result = export_state_dict(model.state_dict(), cfg, tmp_path / "hf", "auto", tokenizer_dir)
    assert result.layout == layout
    hf = load_hf(tmp_path / "hf", trust_remote_code=layout == "moe_lm")
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS)[0], atol=ATOL, rtol=0)
    assert_generates(hf)


def test_rotate_half_rows_turns_interleaved_rotary_pairs_into_rotate_half():
    """q·k is what attention sees: after the row permutation, HF's rotate-half RoPE of the permuted q (and k) is
    moe-lm's interleaved RoPE of q, permuted the same way."""
    num_heads, head_dim, seq = 2, 8, 5
    weight = torch.randn(num_heads * head_dim, 16)
    x = torch.randn(1, seq, 16)
    q_BHSDh = (x @ weight.t()).view(1, seq, num_heads, head_dim).transpose(1, 2)
    cos, sin = rope_tables(seq, head_dim, 10000.0)
    interleaved = apply_rope(q_BHSDh, cos, sin)
    q_half = (x @ rotate_half_rows(weight, num_heads).t()).view(1, seq, num_heads, head_dim).transpose(1, 2)
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotate_half = q_half * cos2 + torch.cat([-q_half[..., head_dim // 2:], q_half[..., :head_dim // 2]], -1) * sin2
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    torch.testing.assert_close(rotate_half, interleaved[..., perm])


def test_cached_decoding_and_left_padding_give_the_logits_and_tokens_of_plain_forwards(runs, tmp_path):
    export_hf(runs / "grmoe", tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    with torch.no_grad():
        full = model(IDS, use_cache=False).logits
        out = model(IDS[:, :20], use_cache=True)
        steps, cache = [out.logits], out.cache if "cache" in out else out.past_key_values
        for t in range(20, 32):
            out = model(IDS[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)

    long, short = IDS[0, :8], IDS[1, :5]
    batch = torch.stack([long, torch.cat([torch.zeros(3, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row, prompt, offset in ((0, long, 0), (1, short, 3)):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(together[row, offset:], alone[0]), row


# ---- command line (moe_lm/cli.py; skipped until cli.py wires the command) ---------------------------------------

def cli_actions(command=None):
    """{option string: argparse action} of `moe-lm` (command None) or of one of its commands ({} if none)."""
    import argparse

    from moe_lm.cli import build_parser

    parser = build_parser()
    if command is not None:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        if command not in commands:
            return {}
        parser = commands[command]
    return {option: action for action in parser._actions for option in action.option_strings}


def require_cli(command, option, action=None):
    """Skip unless `moe-lm COMMAND` has OPTION (handled by an action of class name `action`, when given)."""
    found = cli_actions(command).get(option)
    if found is None or (action is not None and type(found).__name__ != action):
        pytest.skip(f"moe-lm {command + ' ' if command else ''}{option}: not wired into moe_lm/cli.py yet")


def test_cli_export_hf_writes_a_folder_and_says_how_to_load_it(runs, tmp_path, capsys):
    require_cli("export", "--hf")
    from moe_lm.cli import main

    main(["export", str(runs / "grmoe"), "--hf", str(tmp_path / "hf")])
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert load_hf(tmp_path / "hf").config.router["name"] == "grmoe"
    main(["export", str(runs / "softmax_topk"), "--hf", str(tmp_path / "mixtral")])
    assert "MixtralForCausalLM" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="router mpi"):
        main(["export", str(runs / "mpi"), "--hf", str(tmp_path / "no"), "--layout", "mixtral"])


def test_cli_prints_its_version_and_the_resolved_recipe(capsys):
    require_cli(None, "--version")
    from moe_lm import __version__
    from moe_lm.cli import main
    from moe_lm.config import load_config, to_yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"moe-lm {__version__} (torch ")
    require_cli("config", "--help")
    main(["config", "recipes/quickstart_grmoe.yaml", "model.moe.top_k=1"])
    assert capsys.readouterr().out == to_yaml(load_config("recipes/quickstart_grmoe.yaml", ["model.moe.top_k=1"]))


def test_cli_train_help_lists_every_key_of_the_schema_and_of_the_recipe_s_router(capsys):
    require_cli("train", "--help", "RecipeHelpAction")
    from moe_lm.cli import main
    from moe_lm.config.describe import describe_keys

    with pytest.raises(SystemExit):
        main(["train", "recipes/quickstart_mpi.yaml", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: moe-lm train")
    for key in describe_keys("mpi"):
        assert f"  {key.key}  {key.type} = {key.default!r}" in out
    assert "model.moe.router.power_steps  int = 1" in out and "bias_update_rate" not in out


# ---- the key listing behind `moe-lm train --help` (moe_lm/config/describe.py) ------------------------------------

def test_every_schema_and_router_key_is_listed_once_with_its_type_default_and_docstring():
    import dataclasses as dc

    from moe_lm.config.describe import describe_keys, schema_help
    from moe_lm.config.schema import Config
    from moe_lm.routers import REGISTRY

    def leaves(cls, prefix=""):
        for f in dc.fields(cls):
            default = f.default if f.default is not dc.MISSING else f.default_factory()
            if dc.is_dataclass(default):
                yield from leaves(type(default), f"{prefix}{f.name}.")
            else:
                yield prefix + f.name
    for router, (router_cls, _) in REGISTRY.items():
        keys = {k.key: k for k in describe_keys(router)}
        assert len(keys) == len(describe_keys(router))
        expected = [k for k in leaves(Config) if not k.startswith("model.moe.router.")]
        expected += [f"model.moe.router.{k}" for k in leaves(router_cls)]
        assert sorted(keys) == sorted(expected), router
        assert keys["model.moe.router.name"].default == router
    keys = {k.key: k for k in describe_keys("grmoe")}
    assert keys["model.moe.top_k"].type == "int" and keys["model.moe.top_k"].default == 2
    assert keys["model.moe.layer_freq"].doc.startswith("An MoE FFN on every `layer_freq`-th layer")
    assert keys["model.moe.router.alpha"].doc.startswith("α, the sharpness")
    assert keys["model.moe.router.name"].doc.startswith("Registry name of the router")  # inherited docstring
    assert all(len(line) <= 100 for line in schema_help("grmoe").splitlines())
