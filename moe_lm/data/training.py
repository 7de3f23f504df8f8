"""What the trainer reads: one prepared folder (`data.dir`) or a weighted blend of several (`data.blend`), as a
training view with its resumable sampler, the validation split of every source, and the unigram baseline.

    if rank == 0: prepare_training_data(cfg.data, seq_len)      # builds data.dir, or checks the blend's folders
    data = open_training_data(cfg.data, seq_len, seed)
    ids = data.sampler.global_batch(consumed, global_batch)     # -> make_batch(data.train, rank_slice(ids, ...))
    batches = data.validation_batches(eval_batches, micro_batch_size * world)
    data.unigram_perplexity(batches)                            # from stored counts: O(vocab + val tokens)

Validation of a blend: `train.eval_batches` batches are shared out among the sources in proportion to their weights
(at least one each), and each batch holds one source only, so the loss of every source (`val/<name>/loss`) and the
overall loss (over all batches, so weighted like the blend) come from the same forward passes. The unigram
baseline of a blend counts the training tokens of each source in proportion to its weight:
counts = N * sum_k w_k counts_k / N_k, with N_k the tokens of source k and N their sum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.blend import BLOCK, BlendedSampler, ConcatenatedSamples
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import PackedDataset
from moe_lm.data.prepare import (check_sequences_fit, complete_meta, load_meta, prepare_data,
                                 unigram_perplexity_from_counts)
from moe_lm.data.sampler import ResumableSampler, make_batch
from moe_lm.data.stream import load_unigram_counts, open_split


@dataclass(frozen=True)
class ValidationSource:
    name: str
    """Label in `val/<name>/loss`."""
    dataset: PackedDataset
    weight: float
    """Normalised blend weight (1.0 without a blend)."""


@dataclass
class TrainingData:
    train: PackedDataset | ConcatenatedSamples
    """Training samples; `sampler` gives their ids."""
    sampler: ResumableSampler | BlendedSampler
    val: list[ValidationSource]
    vocab_size: int
    """Size of the tokenizer's vocabulary (the model's must be at least this)."""
    unigram_counts: np.ndarray
    """Occurrences of each token id in the training data (blend-weighted: float64)."""

    def validation_batches(self, eval_batches: int, batch_size: int) -> list[tuple[int, list[int]]]:
        """(source, sample ids) of each validation batch of `batch_size` samples (all ranks together): a fixed
        prefix of each source's validation split, wrapped if short; `eval_batches` shared out by weight."""
        shares = _apportion([source.weight for source in self.val], max(eval_batches, len(self.val)))
        batches = []
        for k, (source, count) in enumerate(zip(self.val, shares)):
            size = len(source.dataset)
            batches += [(k, [(b * batch_size + i) % size for i in range(batch_size)]) for b in range(count)]
        return batches

    def validation_targets(self, batches: list[tuple[int, list[int]]]) -> np.ndarray:
        """Every target token of `batches`, flattened: the tokens that validation scores."""
        return np.concatenate([make_batch(self.val[k].dataset, ids)[1].flatten().numpy() for k, ids in batches])

    def unigram_perplexity(self, batches: list[tuple[int, list[int]]]) -> float:
        """The unigram baseline on exactly the tokens `batches` score, from the stored counts."""
        return unigram_perplexity_from_counts(self.unigram_counts, self.validation_targets(batches))


def prepare_training_data(cfg: DataConfig, seq_len: int | None = None, progress: bool = True) -> list[Path]:
    """Make the training data of `cfg` ready (once, on one rank): prepare `data.dir`, or check that every folder of
    `data.blend` is prepared, fits a sequence in both splits and shares one tokenizer. Returns the folders."""
    if not cfg.blend:
        return [prepare_data(cfg, seq_len, progress)]
    folders, models = [], []
    for i, part in enumerate(cfg.blend):
        folder = Path(part.dir)
        meta = complete_meta(folder)
        if meta is None or "token_files" not in meta:
            raise DataError(f"{folder} (data.blend[{i}].dir) is not a complete prepared data folder of this moe-lm: "
                            "prepare it first with its own recipe (moe-lm prepare-data RECIPE data.dir=...)")
        if seq_len is not None:
            check_sequences_fit(meta, seq_len, folder)
        folders.append(folder)
        models.append(json.loads((folder / meta["tokenizer"] / "tokenizer.json").read_text()).get("model"))
    for i, model in enumerate(models[1:], start=1):
        if model != models[0]:
            raise ConfigError(f"data.blend[{i}].dir", f"{folders[i]} was tokenized with another tokenizer than "
                                                      f"{folders[0]}: prepare it with data.tokenizer="
                                                      f"{folders[0] / 'tokenizer'}")
    return folders


def open_training_data(cfg: DataConfig, seq_len: int, seed: int) -> TrainingData:
    """The training view, sampler, validation sources and unigram counts of `data.dir` or `data.blend` (prepared)."""
    if not cfg.blend:
        folder = Path(cfg.dir)
        train = PackedDataset(open_split(folder, "train"), seq_len)
        val = PackedDataset(open_split(folder, "val"), seq_len)
        return TrainingData(train, ResumableSampler(len(train), seed), [ValidationSource(folder.name, val, 1.0)],
                            load_meta(folder)["vocab_size"], load_unigram_counts(folder))
    names = [part.name or Path(part.dir).resolve().name for part in cfg.blend]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"data.blend[{i}].name", f"{name!r} names two folders of the blend: set data.blend[i]"
                                                       ".name to tell their validation losses apart")
    total = sum(part.weight for part in cfg.blend)
    weights = [part.weight / total for part in cfg.blend]
    for i, weight in enumerate(weights):
        if weight * BLOCK < 1:
            raise ConfigError(f"data.blend[{i}].weight", f"{cfg.blend[i].weight} is less than 1/{BLOCK} of the "
                                                         "total: the folder would never be sampled")
    trains = [PackedDataset(open_split(part.dir, "train"), seq_len) for part in cfg.blend]
    vals = [PackedDataset(open_split(part.dir, "val"), seq_len) for part in cfg.blend]
    counts = [load_unigram_counts(part.dir).astype(np.float64) for part in cfg.blend]
    vocab_size = max(load_meta(part.dir)["vocab_size"] for part in cfg.blend)
    blended = sum(w * np.pad(c, (0, vocab_size - len(c))) / c.sum() for w, c in zip(weights, counts))
    return TrainingData(ConcatenatedSamples(trains), BlendedSampler([len(t) for t in trains], weights, seed),
                        [ValidationSource(n, v, w) for n, v, w in zip(names, vals, weights)], vocab_size,
                        blended * sum(c.sum() for c in counts))


def _apportion(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders, then at least 1 each (taken from the
    largest shares; `total` >= len(weights))."""
    quotas = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    shares = np.floor(quotas).astype(int)
    shares[np.argsort(-(quotas - shares), kind="stable")[:total - int(shares.sum())]] += 1
    while shares.min() == 0:
        shares[np.argmax(shares)] -= 1
        shares[np.argmin(shares)] += 1
    return shares.tolist()
