"""Decoder building blocks: RMSNorm, rotary embeddings, causal self-attention, SwiGLU.

Shape suffixes: B batch, S sequence, D model width, H heads, Dh head width, F SwiGLU hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32: the mean of squares overflows/underflows easily in bf16
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, Dh/2] of rotary position embeddings (Su et al. 2021), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSDh: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) by its position's angle: one complex multiplication,
    (x1 + i·x2)·(cos + i·sin), in fp32 (a single pass in eager mode, where four real products and a stack took
    five). Under torch.compile the same product in real arithmetic: inductor does not lower complex ops (each
    would run as its own eager kernel) but fuses the real form into one kernel."""
    seq = x_BHSDh.shape[-2]
    if torch.compiler.is_compiling():
        x1, x2 = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:seq].float(), sin[:seq].float()
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2).to(x_BHSDh.dtype)
    pairs = torch.view_as_complex(x_BHSDh.float().unflatten(-1, (-1, 2)))
    rotated = torch.view_as_real(pairs * torch.complex(cos[:seq].float(), sin[:seq].float())).flatten(-2)
    return rotated.to(x_BHSDh.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, S, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class SwiGLU(nn.Module):
    """silu(x W1ᵀ) ⊙ (x W3ᵀ) W2ᵀ (Shazeer 2020). `w1` is the gate matrix MPI routes with.

    Acts on the last dimension only, so DeepSpeed's expert buffers [ep, 1, C, D] pass through unchanged.
    """

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
