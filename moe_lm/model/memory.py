"""Per-GPU training memory of a recipe, estimated from its config alone (nothing allocated), so that the
micro-batch and the GPU count can be chosen before a launch: `moe-lm info RECIPE overrides --gpus N`.

Model states (bytes per parameter, the ZeRO paper's accounting, Rajbhandari et al. 2020, §3):
    fp32: weights 4, gradients 4, optimizer 8 (Adam's two moments)
    bf16: weights 2, gradients 2 + 4, optimizer 4 + 8 (fp32 master weights and Adam's two moments)
The bf16 gradients count 2 bytes for the bf16 gradient and 4 for the fp32 copy the master step reads
(DeepSpeed's bf16 optimizers keep it; the ZeRO-1/2 optimizer keeps it only for its own shard, so this is an
upper bound there). Dense parameters sit on every GPU and are data-parallel over all `world` GPUs; each MoE
layer's experts are split over `ep_size` GPUs (E/ep_size each) and data-parallel over world/ep_size GPUs.
ZeRO-1 shards the optimizer states over those data-parallel groups, ZeRO-2 the gradients too; the weights
are never sharded (ZeRO-3 is unsupported). Shards are rounded up to whole parameters.

Activations: the bytes autograd keeps for backward for one micro-batch on one GPU, counted tensor by tensor
as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4) do for GPT,
here for this model in eager mode: RMSNorm in fp32, fused qkv, RoPE, flash-style SDPA that stores no S×S
matrix, SwiGLU, the MoE layer of `moe_lm.moe`, the chunked loss of `moe_lm.model.loss`. The terms are in the
`*_bytes` functions; tests/model/test_memory.py checks their sum against the tensors a real forward saves, so
a change to what the model keeps shows up there. Left out: per-token norm statistics and routing indices
(under 1% of a block), gradients of activations during backward, the CUDA context, DeepSpeed's communication
buckets and allocator fragmentation, hence `UNMODELLED_SHARE`.

Shape letters: B micro-batch, S seq_len, T = B·S tokens per micro-batch and GPU, D d_model, H heads, F dense
SwiGLU width, Fe expert width, E experts, K top_k, R rows through the experts of one MoE layer on one GPU,
V vocab, c loss chunk tokens; `a` is the activation dtype's bytes (2 in bf16, 4 in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_lm.config.schema import Config, ModelConfig
from moe_lm.model.transformer import count_parameters
from moe_lm.moe import expert_capacity

FP32 = 4

UNMODELLED_SHARE = 0.1
"""Share of GPU memory kept free for what the estimate leaves out (module docstring): a plan `fits` only in the
rest. DeepSpeed's default reduce bucket alone is 5e8 elements, 1 GB in bf16."""


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state (module docstring)."""

    weights: int
    gradients: int
    optimizer: int


STATE_BYTES = {"bf16": StateBytes(weights=2, gradients=2 + FP32, optimizer=FP32 + 2 * FP32),
               "fp32": StateBytes(weights=FP32, gradients=FP32, optimizer=2 * FP32)}


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one micro-batch on one GPU."""

    attention: int
    """One attention sublayer, its RMSNorm included."""
    dense_ffn: int
    """One dense SwiGLU sublayer, its RMSNorm included (0 when every layer is MoE)."""
    moe_ffn: int
    """One MoE sublayer: RMSNorm, router, expert rows, experts, combine (0 without MoE layers)."""
    layers: int
    """All blocks: every sublayer's tensors or, with checkpointing, each block's input plus the largest block,
    recomputed in backward."""
    head: int
    """What the final RMSNorm and the fused loss keep for backward."""
    loss_chunk: int
    """Alive only while the loss runs, one chunk at a time."""

    @property
    def total(self) -> int:
        return self.layers + self.head + self.loss_chunk


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one training configuration."""

    dense_params: int
    """Parameters every GPU holds: embeddings, attention, norms, routers, dense FFNs, lm_head."""
    expert_params: int
    """This GPU's experts: E/ep_size per MoE layer."""
    weights: int
    gradients: int
    optimizer_states: int
    activations: ActivationBytes

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations.total

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= (1 - UNMODELLED_SHARE) * gpu_bytes


def norm_bytes(tokens: int, d_model: int, act_bytes: int) -> int:
    """What RMSNorm itself keeps: its fp32 copy of the input, 4TD (in fp32, the input itself), and the normalised
    tensor for the gain's gradient, aTD. Its output is counted by whoever keeps it."""
    return tokens * d_model * (FP32 + act_bytes)


def attention_bytes(tokens: int, d_model: int, n_heads: int, act_bytes: int) -> int:
    """RMSNorm and its output (the qkv input), then 3aTD for the fused qkv output (SDPA keeps v as a view of it, so
    all of it stays), 2aTD for q and k after RoPE, aTD for the SDPA output, 4TH for flash attention's
    log-sum-exp: (4 + 8a)·TD + 4TH. The flash kernels (CUDA, and CPU's too) return the output in [B, S, H, Dh]
    layout, so the output projection's [B, S, D] input is a view of it, not a copy."""
    return (norm_bytes(tokens, d_model, act_bytes) + (1 + 3 + 2 + 1) * act_bytes * tokens * d_model
            + FP32 * tokens * n_heads)


def dense_ffn_bytes(tokens: int, d_model: int, d_ff: int, act_bytes: int) -> int:
    """RMSNorm and its output (the input of w1 and w3), then w2(silu(w1 x) ⊙ w3 x) keeps 4aTF: w1 x (silu's
    input), silu(w1 x) and w3 x (the product's factors), and the product (w2's input)."""
    return norm_bytes(tokens, d_model, act_bytes) + act_bytes * tokens * (d_model + 4 * d_ff)


def expert_rows(tokens: int, model: ModelConfig, ep_size: int) -> int:
    """R: on one GPU (ep_size 1) grouped GEMMs run over exactly the K·T routed rows, a capacity limit only
    zeroing weights. Under expert parallelism every GPU's E/ep experts get C rows from each of ep GPUs, E·C rows;
    dropless C is the busiest expert's load, taken here at a perfect balance (E·C = K·T): a lower bound."""
    moe = model.moe
    if ep_size == 1 or not moe.drop_tokens:
        return moe.top_k * tokens
    return moe.num_experts * expert_capacity(tokens, moe.top_k, moe.num_experts, moe.capacity_factor,
                                             moe.min_capacity)


def moe_ffn_bytes(tokens: int, model: ModelConfig, act_bytes: int, ep_size: int) -> int:
    """RMSNorm, whose output nothing keeps but the router's fp32 copy of it, 4TD (the same tensor in fp32); 2·4TE
    for the router's logits and probabilities; aRD for the expert input rows; 4aR·Fe inside the SwiGLU experts
    (as `dense_ffn_bytes`); on one GPU aRD more for the expert outputs that the scatter back to token order keeps;
    and 4KTD for each token's K expert outputs in fp32, kept by the gate-weighted sum. The experts' stacked weights
    are views of the parameters (`dispatch.stack_weights`), so they add nothing:
    (8 + a)·TD + 8TE + aR·(D + 4Fe) [+ aRD] + 4KTD."""
    d, moe = model.d_model, model.moe
    width = moe.expert_width(model.d_ff)
    rows = expert_rows(tokens, model, ep_size)
    scattered_outputs = act_bytes * rows * d if ep_size == 1 else 0
    return (norm_bytes(tokens, d, act_bytes) + FP32 * tokens * d + 2 * FP32 * tokens * moe.num_experts
            + act_bytes * rows * (d + 4 * width) + scattered_outputs
            + FP32 * moe.top_k * tokens * d)


def head_bytes(tokens: int, model: ModelConfig, act_bytes: int) -> int:
    """The final RMSNorm, and what the fused lm-head + cross-entropy keeps: it computes the gradients in the
    forward, aTD for the hidden states' and 4VD (fp32) for the lm-head weight's."""
    return norm_bytes(tokens, model.d_model, act_bytes) + act_bytes * tokens * model.d_model + (
        FP32 * model.vocab_size * model.d_model)


def loss_chunk_bytes(tokens: int, model: ModelConfig, act_bytes: int, loss_chunk_tokens: int) -> int:
    """The loss's working set for one chunk of c = min(T, loss_chunk_tokens) tokens: the logits in fp32 (reused
    in place for their gradient) beside a copy in the activation dtype, and the chunk's lm-head weight
    gradient in the activation dtype beside its fp32 copy before accumulation: (4 + a)·V·(c + D)."""
    chunk = min(tokens, loss_chunk_tokens)
    return (FP32 + act_bytes) * model.vocab_size * (chunk + model.d_model)


def activation_bytes(model: ModelConfig, micro_batch: int, *, bf16: bool, checkpointing: bool,
                     loss_chunk_tokens: int, ep_size: int = 1) -> ActivationBytes:
    """Activations of one micro-batch of `micro_batch` sequences on one GPU.

    Without checkpointing every block's tensors are alive when the loss runs. With it (full recomputation,
    Korthikanti et al. §4.1) the forward keeps each block's input, aTD per layer, and backward recomputes one
    block at a time, whose tensors come on top. The embedding output is block 0's input, counted there. The loss
    chunk is added to the peak of the blocks although, under checkpointing, the two never coincide.
    """
    act_bytes = 2 if bf16 else FP32
    tokens, d = micro_batch * model.seq_len, model.d_model
    n_moe = sum(model.is_moe_layer(i) for i in range(model.n_layers))
    n_dense = model.n_layers - n_moe
    attention = attention_bytes(tokens, d, model.n_heads, act_bytes)
    dense = dense_ffn_bytes(tokens, d, model.d_ff, act_bytes) if n_dense else 0
    moe = moe_ffn_bytes(tokens, model, act_bytes, ep_size) if n_moe else 0
    if checkpointing:
        layers = model.n_layers * act_bytes * tokens * d + attention + max(dense, moe)
    else:
        layers = model.n_layers * attention + n_dense * dense + n_moe * moe
    return ActivationBytes(attention, dense, moe, layers, head_bytes(tokens, model, act_bytes),
                           loss_chunk_bytes(tokens, model, act_bytes, loss_chunk_tokens))


def estimate_memory(cfg: Config, world_size: int, bf16: bool) -> MemoryEstimate:
    """Bytes per GPU of training `cfg` on `world_size` GPUs (a multiple of `parallel.ep_size`, see
    `moe_lm.train.distributed.check_layout`), with bf16 or fp32 weights and activations."""
    model, parallel, train = cfg.model, cfg.parallel, cfg.train
    counts = count_parameters(model)
    n_moe = sum(model.is_moe_layer(i) for i in range(model.n_layers))
    all_experts = counts.per_expert * model.moe.num_experts * n_moe
    dense, experts = counts.total - all_experts, all_experts // parallel.ep_size
    dense_dp, expert_dp = world_size, world_size // parallel.ep_size

    def per_gpu(nbytes: int, sharded: bool) -> int:
        if not sharded:
            return nbytes * (dense + experts)
        return nbytes * (math.ceil(dense / dense_dp) + math.ceil(experts / expert_dp))

    state = STATE_BYTES["bf16" if bf16 else "fp32"]
    return MemoryEstimate(
        dense_params=dense, expert_params=experts,
        weights=per_gpu(state.weights, sharded=False),
        gradients=per_gpu(state.gradients, sharded=parallel.zero_stage >= 2),
        optimizer_states=per_gpu(state.optimizer, sharded=parallel.zero_stage >= 1),
        activations=activation_bytes(model, train.micro_batch_size, bf16=bf16,
                                     checkpointing=train.activation_checkpointing,
                                     loss_chunk_tokens=train.loss_chunk_tokens, ep_size=parallel.ep_size))
