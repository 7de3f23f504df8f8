"""`moe-lm export RUN_DIR --hf OUT_DIR`: a checkpoint as a folder that transformers loads and generates with.

    moe-lm export runs/quickstart --hf exports/quickstart
    model = AutoModelForCausalLM.from_pretrained("exports/quickstart", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("exports/quickstart")

Two layouts (`layout`):
- "mixtral": a recipe Mixtral expresses exactly (`mixtral_problems` is empty: softmax_topk with renormalised top-k
  and no selection bias, an MoE feed-forward on every layer) becomes a `MixtralForCausalLM` in the layout of
  mistralai/Mixtral-8x7B (`block_sparse_moe.experts.{e}.w1`...), which loads without remote code and which
  vLLM or llama.cpp's converter read. Two conversions: the fused qkv is split into q/k/v_proj, and the rows of
  every q and k head are permuted from moe-lm's interleaved rotary pairs (x[2i], x[2i+1]) to the rotate-half pairs
  (x[i], x[i + Dh/2]) of Llama/Mixtral; q·k is unchanged by a permutation shared by q and k, so are the scores.
- "moe_lm": any recipe whose router has an inference path in `hf_modeling.py` (softmax_topk, mpi, grmoe), which
  is copied beside the weights as `modeling_moe_lm.py` and named in config.json's `auto_map`: load it with
  `trust_remote_code=True`. Router constants that only change in training are computed here (grmoe's frames,
  concentrations and Bingham normalisers) and shipped as buffers, in fp32.
"auto" (the default) is "mixtral" when the recipe fits, else "moe_lm". A router without an inference path here,
or a model that routes by something else than its router, fails the export (`ExportError`, `export_problems`).

The folder: config.json, generation_config.json, the weights as safetensors (one file, or shards and an index past
5 GB) in the checkpoint's dtype, the run's tokenizer with `model_max_length` = model.seq_len and bos = pad = eos
where unset, and modeling_moe_lm.py for "moe_lm". Both layouts run dropless, as transformers MoE models do: compare
them with moe-lm evaluated at `model.moe.drop_tokens=false`. Files are written 0644 into a staging folder beside
OUT_DIR that is renamed into place, so OUT_DIR never holds half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moe_lm.checkpoint import config_from_dict, consolidated_state_dict
from moe_lm.config import Config
from moe_lm.export import hf_modeling

LAYOUTS = ("auto", "mixtral", "moe_lm")
MODELING_FILE = "modeling_moe_lm.py"
MAX_SHARD_SIZE = "5GB"
FILE_MODE = 0o644
DIR_MODE = 0o755
NO_INFERENCE_PATH = {
    "expert_choice": "each expert picks its tokens among the batch (or the sequence), so a token's experts depend on "
                     "the other tokens, later ones included: there is no per-token, causal routing to export",
}
"""Why some routers of the registry have no inference path in the export (others get a generic message)."""


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what would work."""


@dataclass(frozen=True)
class HFExport:
    path: Path
    layout: str
    """"mixtral" or "moe_lm" (the layout written, after resolving "auto")."""
    not_mixtral: list[str] = field(default_factory=list)
    """Why the recipe does not fit Mixtral (empty when the layout is "mixtral")."""


# ---- what can be exported ----------------------------------------------------------------------------------------

def export_problems(cfg: Config) -> list[str]:
    """Why `cfg`'s model has no transformers inference path (empty: it can be exported)."""
    moe = cfg.model.moe
    problems = []
    if moe.router.name not in hf_modeling.ROUTERS:
        why = NO_INFERENCE_PATH.get(moe.router.name, "the transformers export has no inference path for it yet")
        problems.append(f"model.moe.router.name={moe.router.name}: {why} (exportable: {sorted(hf_modeling.ROUTERS)})")
    if moe.force_balanced_routing:
        problems.append("model.moe.force_balanced_routing=true: tokens were routed by their place in the batch, not "
                        "by the router, so no exported router reproduces the model")
    return problems


def mixtral_problems(cfg: Config) -> list[str]:
    """Why `cfg`'s model is not a Mixtral (empty: it is, exactly)."""
    moe, router = cfg.model.moe, cfg.model.moe.router
    problems = []
    if router.name != "softmax_topk":
        problems.append(f"router {router.name} (Mixtral routes by softmax top-k)")
    else:
        if not router.renormalize:
            problems.append("model.moe.router.renormalize=false (Mixtral renormalises the top-k weights)")
        if router.bias_update_rate > 0:
            problems.append("model.moe.router.bias_update_rate > 0 (Mixtral has no expert selection bias)")
    if moe.layer_freq != 1:
        problems.append(f"model.moe.layer_freq={moe.layer_freq} (Mixtral has an MoE feed-forward on every layer)")
    return problems


# ---- weights -----------------------------------------------------------------------------------------------------

class _Source:
    """The moe-lm state dict, read key by key; `unread()` lists what no mapping took (a mapping bug, or a new
    parameter the export does not know)."""

    def __init__(self, state: dict[str, Tensor]):
        self.state, self.read = state, set()

    def __call__(self, key: str) -> Tensor:
        self.read.add(key)
        return self.state[key]

    def prefix(self, prefix: str) -> dict[str, Tensor]:
        keys = [k for k in self.state if k.startswith(prefix)]
        self.read.update(keys)
        return {k[len(prefix):]: self.state[k] for k in keys}

    def unread(self) -> list[str]:
        return sorted(set(self.state) - self.read)


def _experts(src: _Source, layer: int, num_experts: int, name: str) -> list[Tensor]:
    return [src(f"blocks.{layer}.ffn.deepspeed_moe.experts.deepspeed_experts.{e}.{name}.weight")
            for e in range(num_experts)]


def _router(src: _Source, cfg: Config, layer: int):
    """Layer `layer`'s moe-lm router, rebuilt from the config and loaded strictly, in eval mode."""
    from moe_lm.routers import build_router

    m = cfg.model
    router = build_router(m.moe.router, m.d_model, m.moe.num_experts, m.moe.top_k)
    router.load_state_dict(src.prefix(f"blocks.{layer}.ffn.deepspeed_moe.gate.router."), strict=True)
    return router.float().eval()


@torch.no_grad()
def router_tensors(router) -> dict[str, Tensor]:
    """A moe-lm router's inference tensors under their names in `hf_modeling`'s router of the same name, fp32."""
    name = router.cfg.name
    if name == "softmax_topk":
        out = {"weight": router.proj.weight}
        if hasattr(router, "balance_bias_E"):
            out["selection_bias"] = router.balance_bias_E
    elif name == "mpi":
        out = {"rows": router.rows}
    elif name == "grmoe":
        from moe_lm.routers.grmoe_math import bingham_log_normaliser

        kappa_E = router.concentrations()
        out = {"proj.weight": router.proj.weight, "frames": router.frames(), "kappa": kappa_E,
               "log_normalizer": bingham_log_normaliser(kappa_E, router.subspace_dim, router.routing_dim,
                                                        router.kappa_cap)}
        if router.cfg.variational == "concentration":
            out.update({f"vi_net.{k}": v for k, v in router.vi_net.state_dict().items()})
        if router.cfg.selection_bias == "learned":
            out["log_prior"] = router.log_prior_E
        elif router.cfg.selection_bias == "loss_free":
            out["selection_bias"] = router.balance_bias_E
    else:
        raise ExportError(f"router {name!r}: no inference path to export")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def router_config(router) -> dict:
    """config.router of the exported model: the settings `hf_modeling`'s router reads, resolved."""
    cfg = router.cfg
    if cfg.name == "softmax_topk":
        return {"name": cfg.name, "renormalize": cfg.renormalize, "selection_bias": cfg.bias_update_rate > 0}
    if cfg.name == "mpi":
        return {"name": cfg.name, "power": cfg.power, "power_steps": cfg.power_steps,
                "logit_scale": float(router.logit_scale), "renormalize": cfg.renormalize}
    if cfg.name == "grmoe":
        # VI option A ("logit") only adds noise in training: its evaluation routing is the plain one
        return {"name": cfg.name, "subspace_dim": router.subspace_dim, "routing_dim": router.routing_dim,
                "alpha": float(router.alpha), "eval_threshold": float(router.eval_threshold),
                "max_experts": router.max_experts, "renormalize": cfg.renormalize, "kappa_cap": router.kappa_cap,
                "variational": "concentration" if cfg.variational == "concentration" else "none",
                "vi_hidden_dim": cfg.vi_hidden_dim, "log_prior": cfg.selection_bias == "learned",
                "selection_bias": cfg.selection_bias == "loss_free"}
    raise ExportError(f"router {cfg.name!r}: no inference path to export")


def moe_lm_weights(state: dict[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], dict]:
    """(state dict of `hf_modeling.MoELMForCausalLM`, config.router) from a consolidated moe-lm state dict."""
    m = cfg.model
    src, out, routing = _Source(state), {}, None
    out["model.embed_tokens.weight"] = src("embed.weight")
    for i in range(m.n_layers):
        hf = f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = src(f"blocks.{i}.attn_norm.weight")
        out[hf + "self_attn.qkv_proj.weight"] = src(f"blocks.{i}.attn.qkv.weight")
        out[hf + "self_attn.o_proj.weight"] = src(f"blocks.{i}.attn.out.weight")
        out[hf + "post_attention_layernorm.weight"] = src(f"blocks.{i}.ffn_norm.weight")
        if m.is_moe_layer(i):
            for name in ("w1", "w3", "w2"):
                out[hf + f"mlp.experts.{name}"] = torch.stack(_experts(src, i, m.moe.num_experts, name))
            router = _router(src, cfg, i)
            out.update({hf + f"mlp.router.{k}": v for k, v in router_tensors(router).items()})
            routing = router_config(router)
        else:
            for name in ("w1", "w3", "w2"):
                out[hf + f"mlp.{name}.weight"] = src(f"blocks.{i}.ffn.{name}.weight")
    out["model.norm.weight"] = src("norm.weight")
    lm_head = src("lm_head.weight")
    if not m.tie_embeddings:  # tied: transformers ties lm_head to the embedding at load
        out["lm_head.weight"] = lm_head
    _check_all_read(src)
    return out, routing


def rotate_half_rows(weight: Tensor, num_heads: int) -> Tensor:
    """Rows of a q or k projection [H·Dh, D], reordered per head from interleaved rotary pairs (2i, 2i+1) to
    rotate-half pairs (i, i + Dh/2): new row i = old row 2i, new row Dh/2 + i = old row 2i + 1."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.view(num_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def mixtral_weights(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """The Mixtral-8x7B-layout state dict of `MixtralForCausalLM` from a consolidated moe-lm state dict."""
    m = cfg.model
    src, out = _Source(state), {}
    out["model.embed_tokens.weight"] = src("embed.weight")
    for i in range(m.n_layers):
        hf = f"model.layers.{i}."
        q, k, v = src(f"blocks.{i}.attn.qkv.weight").chunk(3, dim=0)  # rows (3, H, Dh)
        out[hf + "self_attn.q_proj.weight"] = rotate_half_rows(q, m.n_heads)
        out[hf + "self_attn.k_proj.weight"] = rotate_half_rows(k, m.n_heads)
        out[hf + "self_attn.v_proj.weight"] = v
        out[hf + "self_attn.o_proj.weight"] = src(f"blocks.{i}.attn.out.weight")
        out[hf + "input_layernorm.weight"] = src(f"blocks.{i}.attn_norm.weight")
        out[hf + "post_attention_layernorm.weight"] = src(f"blocks.{i}.ffn_norm.weight")
        gate = router_tensors(_router(src, cfg, i))["weight"]  # fp32; Mixtral runs its gate in the model dtype
        out[hf + "block_sparse_moe.gate.weight"] = gate.to(state["embed.weight"].dtype)
        for name in ("w1", "w3", "w2"):  # Mixtral's w1/w3/w2 are moe-lm's: silu(x W1ᵀ) ⊙ (x W3ᵀ) W2ᵀ
            for e, weight in enumerate(_experts(src, i, m.moe.num_experts, name)):
                out[hf + f"block_sparse_moe.experts.{e}.{name}.weight"] = weight
    out["model.norm.weight"] = src("norm.weight")
    lm_head = src("lm_head.weight")
    if not m.tie_embeddings:
        out["lm_head.weight"] = lm_head
    _check_all_read(src)
    return out


def _check_all_read(src: _Source) -> None:
    unread = src.unread()
    if unread:
        raise ExportError(f"the export does not know where these weights go: {unread[:8]}"
                          + (f" and {len(unread) - 8} more" if len(unread) > 8 else ""))


# ---- configs -----------------------------------------------------------------------------------------------------

def moe_lm_config(cfg: Config, routing: dict, tokens: dict, dtype: torch.dtype) -> dict:
    m = cfg.model
    config = hf_modeling.MoELMConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        intermediate_size=m.d_ff, expert_intermediate_size=m.moe.expert_width(m.d_ff),
        num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
        moe_layers=[i for i in range(m.n_layers) if m.is_moe_layer(i)], router=routing,
        max_position_embeddings=m.seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings, **tokens).to_dict()
    module = Path(MODELING_FILE).stem
    config.update(architectures=["MoELMForCausalLM"], auto_map={
        "AutoConfig": f"{module}.MoELMConfig", "AutoModel": f"{module}.MoELMModel",
        "AutoModelForCausalLM": f"{module}.MoELMForCausalLM"})
    return _with_dtype(config, dtype)


def mixtral_config(cfg: Config, tokens: dict, dtype: torch.dtype) -> dict:
    from transformers import MixtralConfig

    m = cfg.model
    config = MixtralConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.moe.expert_width(m.d_ff),
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads,
        max_position_embeddings=m.seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings, num_local_experts=m.moe.num_experts,
        num_experts_per_tok=m.moe.top_k, sliding_window=None, router_jitter_noise=0.0, **tokens).to_dict()
    config.update(architectures=["MixtralForCausalLM"], rope_theta=m.rope_theta)  # rope_theta: transformers 4.x
    return _with_dtype(config, dtype)


def _with_dtype(config: dict, dtype: torch.dtype) -> dict:
    name = str(dtype).removeprefix("torch.")
    config.update(dtype=name, torch_dtype=name)  # torch_dtype: the name transformers 4.x reads
    return config


# ---- writing -----------------------------------------------------------------------------------------------------

def export_hf(checkpoint: str | Path, out_dir: str | Path, layout: str = "auto",
              tokenizer: str | Path | None = None) -> HFExport:
    """Export a checkpoint (a `step_N` folder, or a run or checkpoints folder for its newest complete checkpoint)
    as a transformers folder `out_dir`, which must be new or empty. `tokenizer`: a tokenizer folder, by default the
    run's `data.dir`/tokenizer."""
    _check_layout(layout)
    state, manifest = consolidated_state_dict(checkpoint)
    cfg = config_from_dict(manifest["config"])
    return export_state_dict(state, cfg, out_dir, layout,
                             Path(cfg.data.dir) / "tokenizer" if tokenizer is None else tokenizer)


def export_state_dict(state: dict[str, Tensor], cfg: Config, out_dir: str | Path, layout: str,
                      tokenizer: str | Path) -> HFExport:
    """Export a consolidated moe-lm state dict (`MoETransformer(ep_size=1).state_dict()`) of config `cfg`."""
    from moe_lm.data.tokenizer import tokenizer_for_model

    _check_layout(layout)
    problems = export_problems(cfg)
    if problems:
        raise ExportError("cannot export this model to transformers: " + "; ".join(problems))
    not_mixtral = mixtral_problems(cfg)
    if layout == "mixtral" and not_mixtral:
        raise ExportError("--layout mixtral: the model is not a Mixtral: " + "; ".join(not_mixtral)
                          + " (--layout moe_lm exports it with its own modeling code)")
    if layout == "auto":
        layout = "moe_lm" if not_mixtral else "mixtral"
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty folder: the export writes a new folder")
    if not Path(tokenizer).is_dir():
        raise ExportError(f"no tokenizer folder at {tokenizer} (data.dir of the run is relative to where it was "
                          f"trained): pass the tokenizer folder explicitly (--tokenizer)")
    tok = tokenizer_for_model(tokenizer, cfg.model.seq_len)
    if len(tok) > cfg.model.vocab_size:
        raise ExportError(f"the tokenizer at {tokenizer} has {len(tok)} tokens, more than model.vocab_size="
                          f"{cfg.model.vocab_size}: it is not this model's tokenizer")
    tokens = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    dtype = state["embed.weight"].dtype
    if layout == "mixtral":
        weights, config = mixtral_weights(state, cfg), mixtral_config(cfg, tokens, dtype)
    else:
        weights, routing = moe_lm_weights(state, cfg)
        config = moe_lm_config(cfg, routing, tokens, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_folder(staging, weights, config, tokens, tok, layout)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return HFExport(out_dir, layout, not_mixtral)


def _write_folder(folder: Path, weights: dict[str, Tensor], config: dict, tokens: dict, tokenizer,
                  layout: str) -> None:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    tensors = {k: _own_storage(v.detach().cpu().contiguous()) for k, v in weights.items()}
    save_torch_state_dict(tensors, folder, max_shard_size=MAX_SHARD_SIZE, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    GenerationConfig(**tokens).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    if layout == "moe_lm":
        shutil.copyfile(hf_modeling.__file__, folder / MODELING_FILE)
    for path in folder.rglob("*"):  # safetensors and mkdtemp create 0600/0700: make the export readable by others
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
    folder.chmod(DIR_MODE)


def _own_storage(tensor: Tensor) -> Tensor:
    """A copy of a tensor that views part of a larger storage (v of the fused qkv): safetensors refuses those."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {LAYOUTS}, got {layout!r}")
