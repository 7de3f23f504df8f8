"""`moe-lm eval RUN_DIR [--text FILE]`: perplexity of a trained checkpoint, evaluated in one process on the
consolidated weights (every expert local), so any training layout can be evaluated, for every router.

Perplexity on the run's validation split, or on a text file tokenized with the run's tokenizer, plus the routing
metrics of that pass (mean active experts, capacity drop fraction, routing entropy, top-k mass), written to
`OUT/eval.json` (OUT: the run folder by default). The model routes as configured, capacity included, like the
trainer's validation; `dropless` lifts the capacity limit, as in the transformers export. The post-hoc sparsity
sweep (`--sweep`) is `moe_lm/eval/sweep.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from moe_lm.checkpoint import load_model, run_dir_of
from moe_lm.data import PackedDataset, load_tokenizer, make_batch, open_split
from moe_lm.metrics import RoutingTracker
from moe_lm.model.transformer import MoETransformer


class TokenWindows:
    """`PackedDataset`'s windows over one token sequence held in memory (a text file): window i is tokens
    [i·S, (i+1)·S + 1]; a sequence shorter than S + 1 tokens is one shorter window. Tokens past the last whole
    window are not evaluated."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < 2:
            raise ValueError(f"{len(tokens)} token(s): perplexity needs at least 2")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(1, (len(self.tokens) - 1) // self.seq_len)

    def window(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        return self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1]


def validation_data(data_dir: str | Path, seq_len: int) -> PackedDataset:
    """The validation split of a prepared folder, packed into sequences as in training."""
    return PackedDataset(open_split(data_dir, "val"), seq_len)


def text_windows(path: str | Path, tokenizer_dir: str | Path, seq_len: int) -> TokenWindows:
    """The text file at `path` as one document (its tokens, then the eos token), in windows of `seq_len`."""
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    return TokenWindows(np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int64), seq_len)


def make_dropless(model: MoETransformer) -> MoETransformer:
    """Lift every MoE layer's capacity limit (`model.moe.drop_tokens=false`): each token reaches all its experts, as
    in the transformers export."""
    for layer in model.moe_layers():
        layer.moe_cfg = dataclasses.replace(layer.moe_cfg, drop_tokens=False)
    return model


def make_training_capacity(model: MoETransformer) -> MoETransformer:
    """Evaluate at the training capacity factor (`model.moe.capacity_factor`, not `eval_capacity_factor`): with
    micro-batches of `train.micro_batch_size` sequences each expert gets the buffer it had in training."""
    for layer in model.moe_layers():
        layer.moe_cfg = dataclasses.replace(layer.moe_cfg, eval_capacity_factor=layer.moe_cfg.capacity_factor)
    return model


@torch.no_grad()
def evaluate_setting(model: MoETransformer, data: PackedDataset | TokenWindows, num_samples: int,
                     batch_size: int) -> dict[str, float]:
    """Loss over the first `num_samples` sequences of `data` and the routing metrics of that pass."""
    layers = model.moe_layers()
    tracker = RoutingTracker(len(layers), model.cfg.moe.num_experts)
    loss_sum = tokens = 0.0
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        inputs, targets = make_batch(data, [i % len(data) for i in range(first, min(first + batch_size, num_samples))])
        _, lm_loss, _ = model(inputs, targets)
        loss_sum += lm_loss.item() * targets.numel()
        tokens += targets.numel()
        for i, layer in enumerate(layers):
            tracker.record(i, layer.gate.record)
    seconds = time.perf_counter() - start
    routing = tracker.compute()
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss), "active_experts": routing["moe/active_experts"],
            "drop_frac": routing["moe/drop_frac"], "token_entropy": routing["moe/token_entropy"],
            "topk_mass": routing["moe/topk_mass"], "effective_experts": routing["moe/effective_experts"],
            "tokens_per_s": tokens / seconds}


def evaluate(checkpoint: str | Path, out_dir: str | Path | None = None, text: str | Path | None = None,
             num_samples: int | None = None, data_dir: str | None = None, dropless: bool = False,
             batch_size: int | None = None) -> dict:
    """Perplexity and routing metrics of a checkpoint (any router) on its validation split, or on the text file
    `text`; written to `out_dir`/eval.json (default: the run folder) and returned.

    `num_samples`: sequences of model.seq_len tokens to evaluate (default: all of them). `data_dir`: the prepared
    data folder (default: the run's data.dir), whose val split and tokenizer are used.
    """
    model, cfg = load_model(checkpoint)
    if dropless:
        make_dropless(model)
    data_dir = Path(data_dir or cfg.data.dir)
    if text is None:
        data = validation_data(data_dir, cfg.model.seq_len)
    else:
        data = text_windows(text, data_dir / "tokenizer", cfg.model.seq_len)
    samples = len(data) if num_samples is None else min(num_samples, len(data))
    for layer in model.moe_layers():
        layer.gate.record_always = True
    result = evaluate_setting(model, data, samples, batch_size or cfg.train.micro_batch_size)
    report = {"checkpoint": str(checkpoint), "router": cfg.model.moe.router.name,
              "data": str(text) if text is not None else str(data_dir / "val"), "samples": samples,
              "tokens": samples * (len(data.window(0)) - 1), "dropless": dropless or not cfg.model.moe.drop_tokens,
              "loss": result["val_loss"], "perplexity": result["val_ppl"],
              **{k: result[k] for k in ("active_experts", "drop_frac", "token_entropy", "topk_mass",
                                        "effective_experts", "tokens_per_s")}}
    out_dir = Path(out_dir) if out_dir is not None else run_dir_of(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
