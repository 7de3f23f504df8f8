"""`hash`: fixed routing by the token id, nothing learned (Roller et al. 2021, "Hash Layers For Large Sparse
Models", arXiv 2106.04426).

Token t goes to the experts h(token_id_t): a fixed pseudo-random function of the input id alone, the same for every
position, batch and step, seeded by `model.moe.router.seed`. Every MoE layer uses the same hash (`build_router`
passes no layer index), so expert e of each layer sees the same share of the vocabulary. The paper's "Random Hash"
is a random lookup table over the vocabulary; here the table is computed on the fly by a seeded polynomial hash, so
the router needs neither the vocabulary size nor a [V]-sized buffer. For k > 1 each token gets k distinct experts,
a pseudo-random ordered k-subset drawn by k steps of Fisher–Yates, each with weight 1/k. There are no parameters
and no aux loss. The paper's frequency-balanced table is not implemented. Formulas and choices in
docs/routers/hash.md.

Shape suffixes: T tokens, E experts, K selected slots per token, C hash coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from moe_lm.config.schema import ConfigError, MoEConfig, RouterConfig
from moe_lm.routers.base import Router, RouterOutput

HASH_PRIME = 2 ** 31 - 1
"""p of the hash family: a Mersenne prime, so every product of two residues (< 2^62) fits in int64 exactly."""

HASH_DEGREE = 3
"""Degree of the hash polynomial: C = 4 coefficients give a 4-wise independent family (Carter & Wegman 1979)."""


@dataclass
class HashConfig(RouterConfig):
    name: str = "hash"
    shape_keys: ClassVar[tuple[str, ...]] = ("model.moe.top_k",)  # one hash function per slot: a [K, C] buffer
    seed: int = 0
    """Seed of the hash functions (one per slot). Changing it changes every token's experts."""

    def validate(self, moe: MoEConfig) -> None:
        if self.seed < 0:
            raise ConfigError("model.moe.router.seed", f"must be >= 0, got {self.seed}")


def polynomial_hash(values_T: Tensor, coefs_C: Tensor) -> Tensor:
    """h(v) = (Σ_c a_c v^(C−1−c)) mod p, by Horner's rule in int64: a (C−1)-degree polynomial over Z_p with
    random coefficients a_c ∈ [0, p), a C-wise independent family (Carter & Wegman 1979; Wegman & Carter 1981).

    `values_T` int64 >= 0 (reduced mod p first, so any non-negative id is safe); every intermediate is below
    p² < 2^62, so no int64 overflow on any device. Returns int64 in [0, p).
    """
    v_T = values_T.long() % HASH_PRIME
    h_T = torch.zeros_like(v_T)
    for c in range(coefs_C.shape[0]):
        h_T = (h_T * v_T + coefs_C[c]) % HASH_PRIME
    return h_T


def hash_experts(token_ids_T: Tensor, coefs_KC: Tensor, num_experts: int) -> Tensor:
    """expert_ids_TK: K distinct experts per token, a deterministic function of its id; int64.

    Partial Fisher–Yates on the identity permutation of the E experts: at step j, slot j swaps with slot
    j + h_j(id) mod (E − j), h_j the j-th polynomial hash; the first K slots are the token's experts. With truly
    random h_j every ordered K-subset is equally likely; the mod bias of (E − j) over p values is below E/p ≈ 4e-9.
    Gather/scatter only: no host read.
    """
    num_slots = coefs_KC.shape[0]
    num_tokens = token_ids_T.shape[0]
    perm_TE = torch.arange(num_experts, device=token_ids_T.device).expand(num_tokens, num_experts).contiguous()
    for j in range(num_slots):
        pick_T1 = (j + polynomial_hash(token_ids_T, coefs_KC[j]) % (num_experts - j)).unsqueeze(1)
        picked_T1 = perm_TE.gather(1, pick_T1)
        perm_TE.scatter_(1, pick_T1, perm_TE[:, j:j + 1].clone())
        perm_TE[:, j:j + 1] = picked_T1
    return perm_TE[:, :num_slots].contiguous()


class HashRouter(Router):
    """Fixed hash routing.

    1. expert_ids_TK = `hash_experts(token_ids_T)`: K distinct experts per token id (the MoE layer passes the ids);
    2. weights_TK = 1/K each; probs_TE the same uniform distribution over the chosen experts (so the routing
       metrics, e.g. entropy log K, are well defined);
    3. no parameters, no aux losses. The hash coefficients are a buffer [K, C] (int64, contiguous, persistent, so
       a checkpoint keeps its routing), drawn at construction from a generator seeded by `seed`.
    """

    def __init__(self, cfg: HashConfig, d_model: int, num_experts: int, top_k: int):
        super().__init__(cfg, d_model, num_experts, top_k)
        generator = torch.Generator().manual_seed(cfg.seed)
        coefs_KC = torch.randint(0, HASH_PRIME, (top_k, HASH_DEGREE + 1), generator=generator, dtype=torch.int64)
        coefs_KC[:, 0].clamp_(min=1)  # a zero leading coefficient would lower the degree
        # not named "expert*": DeepSpeed would file the buffer with the expert shards
        self.register_buffer("hash_coefs_KC", coefs_KC)

    def forward(self, x_TD: Tensor, *, expert_w1_EFD: Tensor | None = None, token_ids_T: Tensor | None = None,
                sequence_length: int | None = None) -> RouterOutput:
        if token_ids_T is None:
            raise ValueError("the hash router routes by token id: call it with token_ids_T (the MoE layer passes "
                             "the model's input ids; MoEFeedForward(x, token_ids_BS))")
        if token_ids_T.shape[0] != x_TD.shape[0]:
            raise ValueError(f"token_ids_T has {token_ids_T.shape[0]} ids for {x_TD.shape[0]} tokens")
        expert_ids_TK = hash_experts(token_ids_T.to(x_TD.device), self.hash_coefs_KC, self.num_experts)
        weights_TK = torch.full(expert_ids_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        probs_TE = torch.zeros(x_TD.shape[0], self.num_experts, device=x_TD.device).scatter_(1, expert_ids_TK,
                                                                                              weights_TK)
        return RouterOutput(probs_TE, expert_ids_TK, weights_TK)
