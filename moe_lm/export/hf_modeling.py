"""A moe-lm decoder as a transformers model: `MoELMConfig` and `MoELMForCausalLM`.

`moe-lm export RUN_DIR --hf OUT_DIR` copies this file into OUT_DIR as `modeling_moe_lm.py` and names its classes in
config.json's `auto_map`, so that

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)

builds the model without moe-lm installed: the file imports torch and transformers only, never `moe_lm`. It
re-implements moe-lm's inference path, and the export tests hold its logits to moe-lm's (max abs diff <= 1e-4 in fp32):

- the decoder (moe_lm/model/layers.py): pre-norm blocks, RMSNorm computed in fp32, rotary embeddings on interleaved
  pairs (x[2i], x[2i+1]) -- not the rotate-half layout of Llama and Mixtral --, a fused qkv projection, causal
  scaled-dot-product attention, SwiGLU feed-forward layers;
- the routers in evaluation mode (moe_lm/routers/): `softmax_topk`, `mpi` and `grmoe` (`ROUTERS`), with their math
  in fp32 as in moe-lm;
- dropless dispatch: every token reaches all the experts it chose (moe-lm's capacity limit is a training device).

Generation keeps keys and values in a transformers `Cache` (a DynamicCache unless one is passed). Positions follow
the attention mask, so left-padded batches generate as if unpadded.

config.router holds what inference needs from `model.moe.router`; grmoe's post-hoc knobs (`alpha`,
`eval_threshold`, `max_experts`) can be edited in config.json without re-exporting.

Shape suffixes: B batch, S new positions, L positions in the cache (past + new), D model width, H heads, Dh head
width, R = Dh/2 rotary frequencies, T tokens (B·S), E experts, K slots per token, F expert width, M grmoe routing
dimension, P grmoe subspace dimension, N series terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 5.x renamed `past_key_values` to `cache` in forward arguments and outputs (the old name is deprecated);
# the model accepts both and returns the cache under whichever name the installed version uses.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class MoELMConfig(PretrainedConfig):
    """Shape and routing of an exported moe-lm model (`moe_lm.config.ModelConfig`, flattened to HF names).

    moe_layers: indices of the layers whose feed-forward is a mixture of experts; the others are dense SwiGLU.
    router: {"name": ..., plus the inference settings of that router}; see each router class below.
    """

    model_type = "moe_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, intermediate_size: int = 704, expert_intermediate_size: int = 704,
                 num_experts: int = 8, num_experts_per_tok: int = 2, moe_layers: list[int] | None = None,
                 router: dict | None = None, max_position_embeddings: int = 256, rope_theta: float = 10000.0,
                 rms_norm_eps: float = 1e-5, initializer_range: float = 0.02, tie_word_embeddings: bool = False,
                 use_cache: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads  # multi-head attention; caches and tools read this name
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.expert_intermediate_size = expert_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layers = list(range(num_hidden_layers)) if moe_layers is None else list(moe_layers)
        self.router = dict(router or {"name": "softmax_topk", "renormalize": True, "selection_bias": False})
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


# ---- decoder ----------------------------------------------------------------------------------------------------

class MoELMRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # the mean of squares overflows or underflows easily in bf16
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(position_ids_BS: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, S, R] of rotary embeddings (Su et al. 2021) at the given positions, in fp32.

    Computed per call rather than kept as a buffer: a non-persistent buffer would be left on the meta device by
    transformers' lazy loading. Same float32 operations as moe-lm's tables, so the same values.
    """
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids_BS.device)
                                 / head_dim)
    angles_BSR = position_ids_BS.float().unsqueeze(-1) * inv_freq_R
    return angles_BSR.cos(), angles_BSR.sin()


def apply_rope(x_BHSDh: Tensor, cos_BSR: Tensor, sin_BSR: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angles of frequency i."""
    x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_BSR.unsqueeze(1), sin_BSR.unsqueeze(1)  # broadcast over heads
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x_BHSDh.dtype)


class MoELMAttention(nn.Module):
    def __init__(self, config: MoELMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)  # rows: q, k, v
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x_BSD: Tensor, cos_BSR: Tensor, sin_BSR: Tensor, mask_B1SL: Tensor | None,
                cache: Cache | None) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv_proj(x_BSD).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B,H,S,Dh)
        q, k = apply_rope(q, cos_BSR, sin_BSR), apply_rope(k, cos_BSR, sin_BSR)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, L, Dh)
        # no mask = plain causal attention over S == L positions (SDPA's is_causal aligns to the top-left corner, so
        # it is only right without a past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SL, is_causal=mask_B1SL is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, D))


class MoELMMLP(nn.Module):
    """silu(x W1ᵀ) ⊙ (x W3ᵀ) W2ᵀ: the dense feed-forward layer (moe-lm `SwiGLU`)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---- routers (inference path) -------------------------------------------------------------------------------------

def topk_weights(probs_TE: Tensor, k: int, renormalize: bool,
                 selection_scores_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(weights_TK, expert_ids_TK): the top-k experts by `selection_scores_TE` (default: the probs), weighted by their
    unbiased probs, renormalised over the k when asked (moe-lm `routers.functional.topk_routing`)."""
    scores_TE = probs_TE if selection_scores_TE is None else selection_scores_TE
    expert_ids_TK = scores_TE.topk(k, dim=-1).indices
    weights_TK = probs_TE.gather(-1, expert_ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)
    return weights_TK, expert_ids_TK


class SoftmaxTopKRouter(nn.Module):
    """probs = softmax(W x); top-k by probs, or by probs + the aux-loss-free selection bias when there is one.

    config.router: renormalize (bool), selection_bias (bool).
    """

    def __init__(self, config: MoELMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = bool(config.router["renormalize"])
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("selection_bias", torch.zeros(config.num_experts)
                             if config.router.get("selection_bias", False) else None)

    def forward(self, x_TD: Tensor, expert_w1_EFD: Tensor) -> tuple[Tensor, Tensor]:
        probs_TE = F.linear(x_TD.float(), self.weight.float()).softmax(dim=-1)
        selection_TE = None if self.selection_bias is None else probs_TE + self.selection_bias.float()
        return topk_weights(probs_TE, self.top_k, self.renormalize, selection_TE)


class MPIRouter(nn.Module):
    """Manifold Power Iteration (Wu, Lv, Xie, Lin 2026): φ_e = normalize(W1_eᵀ W1_e r_e), `power_steps` times, from the
    learned row r_e and expert e's current SwiGLU gate matrix W1_e; logits = R·⟨x, φ_e⟩; softmax; top-k.

    config.router: power (bool; false = φ = r/||r||), power_steps (int), logit_scale (R, resolved), renormalize.
    """

    def __init__(self, config: MoELMConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.power = bool(config.router["power"])
        self.power_steps = int(config.router["power_steps"])
        self.logit_scale = float(config.router["logit_scale"])
        self.renormalize = bool(config.router["renormalize"])
        self.rows = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def directions(self, expert_w1_EFD: Tensor) -> Tensor:
        """φ [E, D], fp32."""
        phi_ED = self.rows.float()
        if not self.power:
            return F.normalize(phi_ED, dim=-1)
        w1_EFD = expert_w1_EFD.float()
        for _ in range(self.power_steps):
            u_EF = torch.einsum("efd,ed->ef", w1_EFD, phi_ED)  # W1_e φ_e
            phi_ED = F.normalize(torch.einsum("efd,ef->ed", w1_EFD, u_EF), dim=-1)  # W1_eᵀ (W1_e φ_e), retracted
        return phi_ED

    def forward(self, x_TD: Tensor, expert_w1_EFD: Tensor) -> tuple[Tensor, Tensor]:
        logits_TE = self.logit_scale * (x_TD.float() @ self.directions(expert_w1_EFD).t())
        return topk_weights(logits_TE.softmax(dim=-1), self.top_k, self.renormalize)


def log_kummer(a: float, b: float, z: Tensor, z_max: float) -> Tensor:
    """log M(a, b, z) of Kummer's confluent hypergeometric function for 0 <= z <= z_max, in float64, by its series
    Σ_n (a)_n/((b)_n n!) z^n summed in log space (moe-lm `routers.grmoe_math.log_kummer`, same series length)."""
    num_terms = int(z_max + 10 * math.sqrt(z_max)) + 60
    z64 = z.double().clamp(0.0, z_max)
    n_N = torch.arange(num_terms, dtype=torch.float64, device=z.device)
    lgamma_a_N, lgamma_b_N = torch.lgamma(n_N + a), torch.lgamma(n_N + b)
    log_c_N = (lgamma_a_N - lgamma_a_N[0]) - (lgamma_b_N - lgamma_b_N[0]) - torch.lgamma(n_N + 1)
    z_flat = z64.reshape(-1)
    out = torch.empty_like(z_flat)
    chunk = max(1, (1 << 22) // num_terms)  # bounds the [N, chunk] buffer of log-terms
    for start in range(0, z_flat.numel(), chunk):
        log_z_C = z_flat[start:start + chunk].clamp_min(torch.finfo(torch.float64).tiny).log()
        terms_NC = log_c_N[:, None] + n_N[:, None] * log_z_C[None, :]
        shift_C = terms_NC.amax(0)
        out[start:start + chunk] = shift_C + (terms_NC - shift_C).exp().sum(0).log()
    return out.view_as(z64).to(z.dtype)


class GrMoERouter(nn.Module):
    """GrMoE in evaluation mode: Bingham-mixture responsibilities of the token line x̂ = normalize(P h).

    s_e = κ_e·||U_eᵀx̂||² − log ₁F₁(p/2; m/2; κ_e), g = softmax(α·s); dispatch top-k, or with `eval_threshold` τ > 0
    the smallest set of most probable experts holding mass >= τ, at most `max_experts` (unused slots get id -1).
    The frames U [E, m, p], the concentrations κ [E] and the log-normalisers [E] are constants computed by moe-lm at
    export (buffers `frames`, `kappa`, `log_normalizer`). With per-token concentrations (VI option B,
    `variational: concentration`), κ̃_te = min(κ_e·exp(μ_φ(h_t)_e), κ_cap) and the normaliser is evaluated per token.

    A learned log-prior log π_e (`log_prior`) is added to α·s; a loss-free selection bias (`selection_bias`) is added
    to the probabilities when choosing the top-k only.

    config.router: subspace_dim p, routing_dim m, alpha, eval_threshold, max_experts, renormalize, kappa_cap,
    variational ("none" or "concentration"), vi_hidden_dim, log_prior and selection_bias (bools; absent = false).
    """

    def __init__(self, config: MoELMConfig):
        super().__init__()
        r = config.router
        num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.subspace_dim, self.routing_dim = int(r["subspace_dim"]), int(r["routing_dim"])
        self.alpha = float(r["alpha"])
        self.eval_threshold = float(r["eval_threshold"])
        self.max_experts = int(r["max_experts"])
        self.renormalize = bool(r["renormalize"])
        self.kappa_cap = float(r["kappa_cap"])
        self.per_token_kappa = r["variational"] == "concentration"
        self.proj = nn.Linear(config.hidden_size, self.routing_dim, bias=False)
        self.register_buffer("frames", torch.zeros(num_experts, self.routing_dim, self.subspace_dim))
        self.register_buffer("kappa", torch.zeros(num_experts))
        self.register_buffer("log_normalizer", torch.zeros(num_experts))
        if self.per_token_kappa:
            self.vi_net = nn.Sequential(nn.Linear(config.hidden_size, int(r["vi_hidden_dim"])), nn.SiLU(),
                                        nn.Linear(int(r["vi_hidden_dim"]), 2 * num_experts))
        for name in ("log_prior", "selection_bias"):
            self.register_buffer(name, torch.zeros(num_experts) if r.get(name, False) else None)

    def scores(self, x_TD: Tensor) -> Tensor:
        """s [T, E], fp32."""
        x_TD = x_TD.float()
        x_hat_TM = F.normalize(F.linear(x_TD, self.proj.weight.float()), dim=-1)
        affinity_TE = torch.einsum("tm,emp->tep", x_hat_TM, self.frames.float()).square().sum(-1)
        kappa_E = self.kappa.float()
        if not self.per_token_kappa:
            return kappa_E * affinity_TE - self.log_normalizer.float()
        first, second = self.vi_net[0], self.vi_net[2]
        out_TX = F.linear(F.silu(F.linear(x_TD, first.weight.float(), first.bias.float())), second.weight.float(),
                          second.bias.float())
        mu_TE = out_TX[:, :kappa_E.shape[0]]  # the posterior mean of the log-concentration offsets
        kappa_TE = (kappa_E * mu_TE.exp()).clamp(max=self.kappa_cap)
        return kappa_TE * affinity_TE - log_kummer(self.subspace_dim / 2, self.routing_dim / 2, kappa_TE,
                                                   self.kappa_cap)

    def forward(self, x_TD: Tensor, expert_w1_EFD: Tensor) -> tuple[Tensor, Tensor]:
        logits_TE = self.alpha * self.scores(x_TD)
        if self.log_prior is not None:
            logits_TE = logits_TE + self.log_prior.float()
        probs_TE = logits_TE.softmax(dim=-1)
        if self.eval_threshold <= 0:
            selection_TE = None if self.selection_bias is None else probs_TE + self.selection_bias.float()
            return topk_weights(probs_TE, self.top_k, self.renormalize, selection_TE)
        sorted_probs_TK, expert_ids_TK = probs_TE.topk(self.max_experts, dim=-1)
        used_TK = (sorted_probs_TK.cumsum(-1) - sorted_probs_TK) < self.eval_threshold  # mass of the better experts
        used_TK[:, 0] = True
        weights_TK = torch.where(used_TK, sorted_probs_TK, torch.zeros_like(sorted_probs_TK))
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)
        return weights_TK, torch.where(used_TK, expert_ids_TK, torch.full_like(expert_ids_TK, -1))


ROUTERS = {"softmax_topk": SoftmaxTopKRouter, "mpi": MPIRouter, "grmoe": GrMoERouter}


# ---- mixture of experts -----------------------------------------------------------------------------------------

class MoELMExperts(nn.Module):
    """E SwiGLU experts stored as stacked matrices: w1, w3 [E, F, D] and w2 [E, D, F]."""

    def __init__(self, config: MoELMConfig):
        super().__init__()
        E, F_, D = config.num_experts, config.expert_intermediate_size, config.hidden_size
        self.w1 = nn.Parameter(torch.empty(E, F_, D))
        self.w3 = nn.Parameter(torch.empty(E, F_, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """Σ_k weight_tk · expert_{id_tk}(x_t), accumulated in fp32; ids of -1 are unused slots."""
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for expert in expert_ids_TK.unique().tolist():  # only the experts some token chose
            if expert < 0:
                continue
            token_N, slot_N = (expert_ids_TK == expert).nonzero(as_tuple=True)
            x_ND = x_TD[token_N]
            y_ND = F.linear(F.silu(F.linear(x_ND, self.w1[expert])) * F.linear(x_ND, self.w3[expert]), self.w2[expert])
            out_TD.index_add_(0, token_N, y_ND.float() * weights_TK[token_N, slot_N].float().unsqueeze(-1))
        return out_TD.to(x_TD.dtype)


class MoELMSparseMoeBlock(nn.Module):
    """route (the router picks experts and weights per token), then compute and combine, dropless."""

    def __init__(self, config: MoELMConfig):
        super().__init__()
        name = config.router["name"]
        if name not in ROUTERS:
            raise ValueError(f"router {name!r} has no inference path here; known: {sorted(ROUTERS)}")
        self.router = ROUTERS[name](config)
        self.experts = MoELMExperts(config)

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        weights_TK, expert_ids_TK = self.router(x_TD, self.experts.w1)
        return self.experts(x_TD, expert_ids_TK, weights_TK).view_as(x_BSD)


class MoELMDecoderLayer(nn.Module):
    def __init__(self, config: MoELMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MoELMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoELMAttention(config, layer_idx)
        self.post_attention_layernorm = MoELMRMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx in config.moe_layers:
            self.mlp = MoELMSparseMoeBlock(config)
        else:
            self.mlp = MoELMMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: Cache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---- transformers models ----------------------------------------------------------------------------------------

class MoELMPreTrainedModel(PreTrainedModel):
    config_class = MoELMConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoELMDecoderLayer"]
    # routing math is fp32 in moe-lm, and the grmoe constants are exported in fp32: kept so under any load dtype
    _keep_in_fp32_modules_strict = ["router"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A fresh model's parameters (from a config, not from exported weights): normal(0, initializer_range)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoELMRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoELMExperts):
            for weight in (module.w1, module.w3, module.w2):
                nn.init.normal_(weight, std=std)
        elif isinstance(module, (SoftmaxTopKRouter, MPIRouter)):
            nn.init.normal_(module.weight if isinstance(module, SoftmaxTopKRouter) else module.rows, std=std)


def attention_mask_4d(attention_mask: Tensor | None, num_new: int, num_total: int,
                      device: torch.device) -> Tensor | None:
    """Boolean [B, 1, S, L] mask (True = attend) of causal attention restricted to unpadded keys, or None when plain
    causal attention over S == L positions does (SDPA's `is_causal`). A 4D mask passes through unchanged.

    Every query may attend to itself, so the rows of padding positions are never empty (their outputs are unused,
    and an empty row would make NaNs).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if num_new == num_total and (attention_mask is None or bool(attention_mask.all())):
        return None
    query_pos_S1 = torch.arange(num_total - num_new, num_total, device=device).unsqueeze(1)
    key_pos_1L = torch.arange(num_total, device=device).unsqueeze(0)
    allowed_BSL = (key_pos_1L <= query_pos_S1).unsqueeze(0)
    if attention_mask is not None:
        if attention_mask.shape[-1] != num_total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; past + new = {num_total}")
        allowed_BSL = allowed_BSL & attention_mask.bool().unsqueeze(1)
    allowed_BSL = allowed_BSL | (key_pos_1L == query_pos_S1).unsqueeze(0)
    return allowed_BSL.unsqueeze(1)


class MoELMModel(MoELMPreTrainedModel):
    def __init__(self, config: MoELMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoELMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoELMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, past_key_values: Cache | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = (cache if cache is not None else past_key_values) if use_cache else None
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x_BSD.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                # left padding: a sequence's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -S:]
            else:
                position_ids = torch.arange(past, past + S, device=x_BSD.device).unsqueeze(0).expand(B, S)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = attention_mask_4d(attention_mask, S, past + S, x_BSD.device)
        for layer in self.layers:
            x_BSD = layer(x_BSD, cos, sin, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BSD), **{CACHE_FIELD: cache})


def _new_cache(config: MoELMConfig) -> Cache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4.x: DynamicCache() takes no config
        return DynamicCache()


class MoELMForCausalLM(MoELMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if TRANSFORMERS_MAJOR >= 5
                          else ["lm_head.weight"])

    def __init__(self, config: MoELMConfig):
        super().__init__(config)
        self.model = MoELMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None, inputs_embeds: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        """logits [B, S, V] (the last `logits_to_keep` positions when > 0); with `labels`, the mean next-token
        cross-entropy over labels != -100, in fp32."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        hidden_BSD = out.last_hidden_state
        if logits_to_keep:
            hidden_BSD = hidden_BSD[:, -logits_to_keep:]
        logits = self.lm_head(hidden_BSD)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
