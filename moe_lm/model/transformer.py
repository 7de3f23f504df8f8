"""Decoder-only MoE transformer: pre-norm blocks of causal RoPE attention and a SwiGLU FFN, where every
`model.moe.layer_freq`-th FFN is a DeepSpeed MoE layer with a moe-lm router.

forward(input_ids_BS) -> (logits_BSV, None, aux_loss) and forward(input_ids_BS, targets_BS) -> (None, lm_loss,
aux_loss): with targets the lm-head and cross-entropy run fused in chunks (`loss.py`), and no logits are returned.
aux_loss is Σ over MoE layers of each router's weighted aux losses (already scaled by their coefficients), or
their mean with `model.moe.aux_loss_reduction: mean`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_lm.config.schema import ModelConfig
from moe_lm.metrics.routing import RoutingRecord
from moe_lm.metrics.throughput import flops_per_token
from moe_lm.model.layers import CausalSelfAttention, RMSNorm, SwiGLU, rope_tables
from moe_lm.model.loss import linear_cross_entropy
from moe_lm.moe import MoEFeedForward, routing_records_paused
from moe_lm.routers import build_router


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, token_ids_BS: Tensor) -> tuple[Tensor, Tensor | None]:
        x, h = self.attend(x, cos, sin)
        if isinstance(self.ffn, MoEFeedForward):
            y, l_aux = self.ffn(h, token_ids_BS)
            return x + y, l_aux
        return x + self.ffn(h), None

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The attention half with its residual, and the FFN's normed input: (x, ffn_norm(x))."""
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x, self.ffn_norm(x)


def _recompute_without_records() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Contexts of a checkpointed block's forward and of its recomputation in backward."""
    return contextlib.nullcontext(), routing_records_paused()


class MoETransformer(nn.Module):
    """The decoder. `activation_checkpointing` recomputes each block in backward instead of storing its activations;
    `loss_chunk_tokens` bounds the logits held at once by the fused loss."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1, ep_rank: int = 0, seed: int = 0,
                 activation_checkpointing: bool = False, loss_chunk_tokens: int = 4096):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = loss_chunk_tokens
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2: residual projections scaled by depth
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        blocks = []
        for i in range(cfg.n_layers):
            if cfg.is_moe_layer(i):
                router = build_router(cfg.moe.router, cfg.d_model, cfg.moe.num_experts, cfg.moe.top_k)
                ffn = MoEFeedForward(cfg.d_model, cfg.moe.expert_width(cfg.d_ff), cfg.moe, router, ep_size, ep_rank,
                                     cfg.init_std, out_std, seed, layer_idx=i)
            else:
                ffn = SwiGLU(cfg.d_model, cfg.d_ff)
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_dense_weights(out_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_dense_weights(self, out_std: float) -> None:
        """Normal(0, init_std) for embeddings and dense matrices; depth-scaled for residual outputs.

        Experts are initialised by `MoEFeedForward` (per global expert) and routers by themselves.
        """
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=self.cfg.init_std)
            nn.init.normal_(block.attn.out.weight, std=out_std)
            if isinstance(block.ffn, SwiGLU):
                nn.init.normal_(block.ffn.w1.weight, std=self.cfg.init_std)
                nn.init.normal_(block.ffn.w3.weight, std=self.cfg.init_std)
                nn.init.normal_(block.ffn.w2.weight, std=out_std)
        nn.init.normal_(self.embed.weight, std=self.cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=self.cfg.init_std)

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]

    def routing_records(self) -> list[RoutingRecord | None]:
        """The routing record of each MoE layer's last training forward that took one (`moe_lm.moe.routing_record`;
        not inside `routing_counts_only`, as the trainer's steps that do not log run)."""
        return [layer.gate.record for layer in self.moe_layers()]

    def routing_counts(self) -> Tensor:
        """[L, E] assignment counts of each MoE layer's last training forward (kept by records and counts alike)."""
        return torch.stack([layer.gate.counts_E for layer in self.moe_layers()])

    def needs_step_counts(self) -> bool:
        """Whether some router keeps per-step state (e.g. an expert bias) that `after_step` must feed."""
        return any(layer.router.needs_step_counts for layer in self.moe_layers())

    def after_step(self, counts_per_layer: list[Tensor]) -> None:
        """Once per optimizer step: each MoE layer's router gets its assignment counts [E], summed over all ranks."""
        for layer, counts_E in zip(self.moe_layers(), counts_per_layer):
            layer.router.post_step(counts_E)

    def compile_static_parts(self, backend: str = "inductor", mode: str = "default") -> None:
        """torch.compile, in place (state-dict keys unchanged), every part of a block whose shapes are fixed: a
        dense block whole, and in an MoE block the attention half (`Block.attend`) and the router. Token dispatch
        and the experts stay eager: their shapes depend on the routing. Compiling fuses the many small elementwise
        ops into a few kernels (most of all the routers' math over [tokens, experts]), and few, large compiled
        regions keep the host's cost per region (guards, autograd wrappers, launches) low."""
        for block in self.blocks:
            if isinstance(block.ffn, MoEFeedForward):
                block.attend = torch.compile(block.attend, backend=backend, mode=mode)
                block.ffn.router.compile(backend=backend, mode=mode)
            else:
                block.compile(backend=backend, mode=mode)

    def forward(self, input_ids_BS: Tensor,
                targets_BS: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor]:
        if input_ids_BS.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {input_ids_BS.shape[1]} tokens > model.seq_len={self.cfg.seq_len}")
        x = self.embed(input_ids_BS)
        # built per forward (a [S, Dh/2] outer product), not kept as buffers: a bf16 engine casts buffers to bf16,
        # which rounds the angles of far positions
        cos, sin = rope_tables(input_ids_BS.shape[1], self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta,
                               x.device)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x, l_aux = checkpoint(block, x, cos, sin, input_ids_BS, use_reentrant=False,
                                      context_fn=_recompute_without_records)
            else:
                x, l_aux = block(x, cos, sin, input_ids_BS)
            if l_aux is not None:
                aux_loss = aux_loss + l_aux
        if self.cfg.moe.aux_loss_reduction == "mean":
            aux_loss = aux_loss / max(1, len(self.moe_layers()))
        h_BSD = self.norm(x)
        if targets_BS is None:
            return self.lm_head(h_BSD), None, aux_loss
        lm_loss = linear_cross_entropy(h_BSD.flatten(0, 1), self.lm_head.weight, targets_BS.flatten(),
                                       self.loss_chunk_tokens)
        return None, lm_loss, aux_loss


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    """All parameters, every expert included."""
    active: int
    """Parameters a token passes through: everything but the experts, plus top_k experts per MoE layer."""
    per_expert: int
    base: int
    """The dense base model (one FFN per layer, no router): the number in a DeepSpeed-MoE preset name."""
    embedding: int
    lm_head: int
    flops_per_token: float
    """Training FLOPs per token (`moe_lm.metrics.throughput.flops_per_token`, torchtitan convention)."""


def count_parameters(cfg: ModelConfig) -> ParameterCounts:
    """Parameter and FLOP counts of `cfg` from a model built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    moe_layers = model.moe_layers()
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for p in moe_layers[0].local_experts[0].parameters()) if moe_layers else 0
    routers = sum(p.numel() for layer in moe_layers for p in layer.router.parameters())
    experts = per_expert * cfg.moe.num_experts * len(moe_layers)
    active = total - experts + per_expert * cfg.moe.top_k * len(moe_layers)
    base = total - experts - routers + per_expert * len(moe_layers)
    embedding = model.embed.weight.numel()
    lm_head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    # a tied embedding still runs as the lm_head matmul
    flops = flops_per_token(active - embedding - lm_head, cfg.n_layers, cfg.d_model, cfg.seq_len,
                            embedding if cfg.tie_embeddings else lm_head)
    return ParameterCounts(total, active, per_expert, base, embedding, lm_head, flops)
