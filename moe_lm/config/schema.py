"""The typed schema of a moe-lm recipe.

Every recipe YAML and every `key=value` override is merged onto these dataclasses (OmegaConf structured
merge), so an unknown key or a wrong type fails at load with the key's dotted path. Cross-field rules
(`top_k <= num_experts`, `num_experts % ep_size == 0`, ...) live in `validate`, which names the key too.

The router section is polymorphic: `model.moe.router.name` picks a router from the registry, and that
router's own config dataclass (a subclass of `RouterConfig`) becomes the schema of the section.
Values that can be derived (global batch, data-parallel size, expert width) are methods, never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


class ConfigError(ValueError):
    """A recipe value is missing, unknown, mistyped or impossible; the message names its dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: the default run directory, wandb run name and table label."""
    dir: str = "runs/${run.name}"
    """Where metrics.jsonl, summary.json, checkpoints and the wandb folder of this run go."""


@dataclass
class BlendSource:
    """One prepared data folder of `data.blend`."""

    dir: str = ""
    """A folder written by `moe-lm prepare-data` (every folder of a blend must share one tokenizer)."""
    weight: float = 1.0
    """Relative share of training samples drawn from it (weights are normalised to sum to 1)."""
    name: str = ""
    """Label of its validation loss `val/<name>/loss` ("" = the folder's name)."""


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    """Corpus: "stdlib" (the running interpreter's standard library sources, the embedded default),
    local .txt/.jsonl/.parquet files or folders, "hf:NAME[:CONFIG]" for a hub dataset (needs network), or
    "megatron:PATH_PREFIX" alone for a Megatron-LM indexed dataset (PREFIX.bin/.idx) tokenized with `tokenizer`."""
    dir: str = "data/stdlib"
    """Folder of the prepared data: tokenizer/, token shards, meta.json (docs/data.md)."""
    num_proc: int = 0
    """Processes that tokenize a shard (0 = every core this process may use; 1 = this process alone, where the
    Rust tokenizer's batch encoding still runs on every core)."""
    shard_bytes: int = 268435456
    """Text per shard, about (256 MiB): the corpus is cut into shards of whole files or file parts, each one
    prepared once, by one of the `--shard i/n` jobs, and kept when a preparation is interrupted."""
    tokenizer_sample_bytes: int = 1073741824
    """Text the tokenizer is trained on (1 GiB): the leading training documents of every shard, in equal parts."""
    max_val_tokens: int = 100000000
    """Cap of the validation split in tokens (0 = no cap): the validation documents with the lowest hashes are kept
    and the others are trained on."""
    blend: list[BlendSource] = field(default_factory=list)
    """Train on several prepared folders, sampled in proportion to their weights (Megatron's `--data-path 0.7 A
    0.3 B`); `sources`, `dir` and the tokenizer keys are then unused. Empty: train on `dir`."""
    vocab_size: int = 4096
    """Vocabulary of the byte-level BPE tokenizer trained by `moe-lm prepare-data`."""
    tokenizer: str = ""
    """An existing tokenizer folder (AutoTokenizer format) to use instead of training one."""
    text_key: str = "text"
    """Field holding the text in .jsonl/.parquet sources."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (chosen by a hash of the document, so stable)."""
    max_bytes: int = 0
    """Stop reading sources after this many bytes of text (0 = read everything)."""
    decode_errors: str = "replace"
    """Bytes that are not UTF-8: replace (with U+FFFD, counted and reported), skip (the whole document) or error
    (stop, naming the file)."""


@dataclass
class RouterConfig:
    """Fields shared by every router; each router extends this with its own dataclass."""

    name: str = "softmax_topk"
    """Registry name of the router: see `moe_lm.routers.REGISTRY`."""
    shape_keys: ClassVar[tuple[str, ...]] = ()
    """Dotted recipe keys, beyond the model's own, that set the shapes of this router's parameters and buffers: a
    resume that changes one is refused with the key's name."""

    def validate(self, moe: MoEConfig) -> None:
        """Router-specific rules; raise `ConfigError` with a key under `model.moe.router`."""


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    layer_freq: int = 1
    """An MoE FFN on every `layer_freq`-th layer (1 = every layer, 2 = every other layer as in DeepSpeed-MoE NLG)."""
    d_expert: int = 0
    """Hidden width of each expert's SwiGLU; 0 = `model.d_ff`."""
    capacity_factor: float = 1.25
    """Expert capacity in training = ceil(tokens * top_k / num_experts * capacity_factor)."""
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    """False = dropless: capacity grows to the busiest expert's load (all-reduced max over the EP group)."""
    force_balanced_routing: bool = False
    """Benchmark switch shared by all routers: send token t to experts (t + j) mod E, ignoring the router."""
    aux_loss_reduction: str = "sum"
    """How the MoE layers' weighted aux losses combine: "sum" (Megatron, DeepSpeed-MoE: each coefficient applies per
    layer) or "mean" (the MPI authors' code: the coefficient is shared by all layers, 1/L of "sum")."""
    router: RouterConfig = field(default_factory=RouterConfig)

    def expert_width(self, d_ff: int) -> int:
        return self.d_expert or d_ff


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    seq_len: int = 256
    """Training sequence length (packed); also the RoPE table length."""
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 704
    """SwiGLU hidden width of dense FFN layers (and of experts unless `moe.d_expert` is set)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def is_moe_layer(self, layer: int) -> bool:
        return (layer + 1) % self.moe.layer_freq == 0


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel size: ranks over which each MoE layer's experts are sharded. Dense parameters are data-parallel
    over the whole world; expert parameters over world_size // ep_size ranks."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0, 1 or 2 (native DeepSpeed MoE refuses ZeRO-3)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    init_timeout_s: int = 300
    """Timeout of process-group initialisation and collectives, so a misconfigured rank fails instead of hanging."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps."""
    seed: int = 1234
    micro_batch_size: int = 8
    """Sequences per rank per forward."""
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of `lr`."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16."""
    eval_interval: int = 100
    """Validate every this many steps, and always at the end."""
    eval_batches: int = 8
    """Validation micro-batches per rank (a fixed prefix of the validation split)."""
    log_interval: int = 10
    save_interval: int = 0
    """Checkpoint every this many steps into run.dir/checkpoints (0 = only at the end and on SIGTERM/SIGUSR1, which
    stop the run at the next step boundary). Layout and rules: docs/checkpoints.md."""
    keep_last: int = 3
    """Complete checkpoints kept on disk; the newest is never deleted."""
    resume: str = ""
    """"" (fresh start; refused if run.dir already holds checkpoints), "auto" (newest complete checkpoint in
    run.dir, or fresh if there is none) or a path (a checkpoint, or a run/checkpoints dir for its newest one)."""
    resume_weights_only: bool = False
    """Resume the weights and the progress (step, data position, LR schedule) but not the optimizer state, which is
    sharded by the parallel layout: needed to resume after changing parallel.ep_size, the world size, ZeRO stage or
    precision (the run stops otherwise); Adam moments restart from zero."""
    trust_checkpoint: bool = False
    """Allow loading checkpoint files that need pickle beyond plain tensors and containers. Unpickling runs
    whatever code a file carries: set it only for checkpoints you or your team wrote."""
    checkpoint_verify: str = "sha256"
    """What a checkpoint's manifest vouches for and a resume checks: sha256 (content hashes, computed by each rank
    over the files it wrote) or size (file sizes only: fast for very large checkpoints)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps whose loss or gradient is NaN/inf (each is skipped)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them: far less activation
    memory for about a third more compute. Routing records are taken once per micro-batch, not again in the
    recomputation."""
    compile: bool = False
    """torch.compile the parts of the model with fixed shapes: each dense block whole, and in each MoE block the
    attention half and the router; token dispatch and the experts stay eager. On in the GPU recipes
    (recipes/train/gpu_pretrain.yaml); inductor needs a C compiler on the machine."""
    compile_mode: str = "default"
    """torch.compile's mode for `compile`: default, reduce-overhead (each compiled region replays as a CUDA graph:
    fewer kernel launches from the host, more memory held), max-autotune or max-autotune-no-cudagraphs."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the fused lm-head + cross-entropy: the full [tokens, vocab] fp32 logits are never
    materialised, only one chunk of them at a time."""
    profile_start: int = 0
    """Profile `profile_steps` optimizer steps from this step on with torch.profiler (0: never). Each rank writes
    its op tables to run.dir/profile/ (`moe_lm/train/profiling.py`); logging or evaluation that falls inside the
    window is profiled too, and the tokens/s logged for that interval includes the profiler's overhead."""
    profile_steps: int = 3
    """How many optimizer steps `profile_start` profiles."""
    profile_trace: bool = False
    """Also write each rank's Chrome trace of the profiled steps (for chrome://tracing or Perfetto; tens of MB)."""
    keep_freed_host_memory: bool = True
    """On CPU: serve tensors from the C heap and never hand freed memory back to the OS, so that a step does not
    page-fault its activations in again (`moe_lm/train/host_memory.py`; faster steps, docs/performance.md). The
    process then keeps its peak resident memory. No effect on GPUs."""

    def global_batch_size(self, dp_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * dp_size


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default: files under run.dir/wandb, `wandb sync` later), online or disabled."""
    project: str = "moe-lm"
    entity: str = ""
    name: str = "${run.name}"
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class MetricsConfig:
    per_layer: bool = False
    """Log every MoE layer's metrics (and per-expert loads) besides the summary over layers."""
    dead_expert_share: float = 0.1
    """An expert is dead when its token share is below this fraction of the uniform share 1/E."""
    diagnostics_interval: int = 50
    """Steps between router-specific diagnostics that cost extra compute (e.g. SVD alignment for mpi)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""The `train.compile_mode`s whose compiled regions replay as CUDA graphs."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: Config) -> None:
    """Cross-field rules that the types cannot express. World-size rules are checked at launch."""
    m, moe, t, p = cfg.model, cfg.model.moe, cfg.train, cfg.parallel
    for key, value in [("model.vocab_size", m.vocab_size), ("model.seq_len", m.seq_len),
                       ("model.n_layers", m.n_layers), ("model.d_model", m.d_model),
                       ("model.n_heads", m.n_heads), ("model.d_ff", m.d_ff),
                       ("model.moe.num_experts", moe.num_experts), ("model.moe.top_k", moe.top_k),
                       ("model.moe.layer_freq", moe.layer_freq), ("parallel.ep_size", p.ep_size),
                       ("train.micro_batch_size", t.micro_batch_size),
                       ("train.grad_accum_steps", t.grad_accum_steps), ("train.max_steps", t.max_steps),
                       ("train.eval_batches", t.eval_batches), ("train.log_interval", t.log_interval),
                       ("train.eval_interval", t.eval_interval), ("train.keep_last", t.keep_last),
                       ("train.max_bad_steps", t.max_bad_steps), ("data.vocab_size", cfg.data.vocab_size)]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(m.d_model % m.n_heads == 0, "model.n_heads",
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "the head dimension must be even for RoPE")
    _require(moe.top_k <= moe.num_experts, "model.moe.top_k",
             f"top_k={moe.top_k} > model.moe.num_experts={moe.num_experts}")
    _require(moe.num_experts % p.ep_size == 0, "parallel.ep_size",
             f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep_size={p.ep_size}")
    _require(moe.layer_freq <= m.n_layers, "model.moe.layer_freq",
             f"{moe.layer_freq} > model.n_layers={m.n_layers}: the model would have no MoE layer")
    _require(moe.d_expert >= 0, "model.moe.d_expert", f"must be >= 0, got {moe.d_expert}")
    _require(moe.capacity_factor > 0, "model.moe.capacity_factor", f"must be > 0, got {moe.capacity_factor}")
    _require(moe.eval_capacity_factor > 0, "model.moe.eval_capacity_factor",
             f"must be > 0, got {moe.eval_capacity_factor}")
    _require(moe.aux_loss_reduction in ("sum", "mean"), "model.moe.aux_loss_reduction",
             f"must be 'sum' or 'mean', got {moe.aux_loss_reduction!r}")
    _require(p.zero_stage in (0, 1, 2), "parallel.zero_stage",
             f"must be 0, 1 or 2, got {p.zero_stage}: native DeepSpeed MoE is not supported with ZeRO-3")
    _require(p.backend in ("auto", "nccl", "gloo"), "parallel.backend",
             f"must be auto, nccl or gloo, got {p.backend!r}")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision",
             f"must be auto, fp32 or bf16, got {t.precision!r}")
    _require(t.compile_mode in COMPILE_MODES, "train.compile_mode",
             f"must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(bool(cfg.data.tokenizer) or cfg.data.vocab_size >= 257, "data.vocab_size",
             f"must be >= 257 for a byte-level BPE (the 256 byte tokens and <|endoftext|>), got {cfg.data.vocab_size}")
    _require(t.checkpoint_verify in ("sha256", "size"), "train.checkpoint_verify",
             f"must be sha256 or size, got {t.checkpoint_verify!r}")
    _require(t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens", f"must be >= 1, got {t.loss_chunk_tokens}")
    _require(cfg.data.decode_errors in ("replace", "skip", "error"), "data.decode_errors",
             f"must be replace, skip or error, got {cfg.data.decode_errors!r}")
    for key, value in [("data.num_proc", cfg.data.num_proc), ("data.max_val_tokens", cfg.data.max_val_tokens)]:
        _require(value >= 0, key, f"must be >= 0, got {value}")
    for key, value in [("data.shard_bytes", cfg.data.shard_bytes),
                       ("data.tokenizer_sample_bytes", cfg.data.tokenizer_sample_bytes)]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    for i, part in enumerate(cfg.data.blend):
        _require(bool(part.dir), f"data.blend[{i}].dir", "must name a prepared data folder")
        _require(part.weight > 0, f"data.blend[{i}].weight", f"must be > 0, got {part.weight}")
        _require("/" not in part.name, f"data.blend[{i}].name", f"must not hold '/', got {part.name!r}")
    _require(t.save_interval >= 0, "train.save_interval", f"must be >= 0, got {t.save_interval}")
    _require(t.profile_start >= 0, "train.profile_start", f"must be >= 0, got {t.profile_start}")
    _require(t.profile_steps >= 1, "train.profile_steps", f"must be >= 1, got {t.profile_steps}")
    _require(t.profile_start <= t.max_steps, "train.profile_start",
             f"{t.profile_start} > train.max_steps={t.max_steps}: no step would be profiled")
    _require(0 < cfg.data.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")
    _require(cfg.wandb.mode in ("offline", "online", "disabled"), "wandb.mode",
             f"must be offline, online or disabled, got {cfg.wandb.mode!r}")
    _require(0 < cfg.metrics.dead_expert_share < 1, "metrics.dead_expert_share",
             f"must be in (0, 1), got {cfg.metrics.dead_expert_share}")
    moe.router.validate(moe)
