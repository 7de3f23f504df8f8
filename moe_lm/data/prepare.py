"""`prepare_data`: corpus -> tokenizer -> train/val split -> token files, once per data config.

The output folder `data.dir` holds `tokenizer/` (AutoTokenizer format), `train.bin/.idx`, `val.bin/.idx` and
`meta.json`. `meta.json` is written last and carries a fingerprint of the data config, so a later call with
the same config returns at once (that is how `moe-lm train` can call it on every start), and an interrupted
run is redone rather than trusted. A file lock makes concurrent callers (several ranks on one machine) wait
for the first one instead of writing the same files.

Documents go to validation by a hash of their text, not by position: adding or reordering sources never
moves a document between splits, and duplicated documents always land on the same side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.corpus import corpus_bytes, load_corpus
from moe_lm.data.indexed import write_tokens
from moe_lm.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
BATCH_SIZE = 1000
TOKENIZE_BATCH_SIZE = 64  # documents per Rust call: small enough to keep both cores busy to the end


def prepare_data(cfg: DataConfig, seq_len: int | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the prepared data of `cfg` in `cfg.dir` and return that folder.

    With `seq_len`, also check that both splits hold at least one training sequence (`seq_len + 1` tokens).
    """
    out = Path(cfg.dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = data_fingerprint(cfg)
    with _exclusive_lock(out / ".prepare.lock"):
        meta_path = out / "meta.json"
        if not (meta_path.is_file() and load_meta(out).get("fingerprint") == fingerprint):
            meta_path.unlink(missing_ok=True)
            meta = _build(cfg, out, fingerprint, progress)
            _write_json_atomically(meta_path, meta)
    if seq_len is not None:
        _check_sequences_fit(load_meta(out), seq_len, out)
    return out


def load_meta(data_dir: str | Path) -> dict:
    """The `meta.json` of a prepared data folder."""
    return json.loads((Path(data_dir) / "meta.json").read_text())


def data_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that decides the prepared files: the data config (but not its folder), the format
    version, and for "stdlib" the interpreter whose library is read."""
    fields = dataclasses.asdict(cfg)
    fields.pop("dir")
    fields["format_version"] = FORMAT_VERSION
    if "stdlib" in cfg.sources:
        fields["stdlib"] = [sysconfig.get_paths()["stdlib"], platform.python_version()]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def split_corpus(corpus: datasets.Dataset, val_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val): a document is in val when the blake2b hash of its text falls below `val_fraction`.

    Both splits get at least one document: if the hash picks none for val, the lowest-hash document moves
    there (and if it picks all of them, the highest-hash one moves to train).
    """
    if len(corpus) < 2:
        raise ConfigError("data.sources", f"the corpus has {len(corpus)} document(s); a train and a validation "
                                          "split need at least 2")
    hashes = np.fromiter((_text_hash(text) for batch in corpus.iter(batch_size=BATCH_SIZE) for text in batch["text"]),
                         dtype=np.uint64, count=len(corpus))
    is_val = hashes < np.uint64(int(val_fraction * 2**64))
    if not is_val.any():
        is_val[np.argmin(hashes)] = True
    if is_val.all():
        is_val[np.argmax(hashes)] = False
    return (corpus.select(np.flatnonzero(~is_val), keep_in_memory=True),
            corpus.select(np.flatnonzero(is_val), keep_in_memory=True))


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `val_tokens` of the add-one-smoothed unigram distribution counted on `train_tokens`:
    the floor any language model should beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64)
    if len(counts) > vocab_size or (len(val_tokens) and int(np.max(val_tokens)) >= vocab_size):
        raise ValueError(f"token ids exceed vocab_size={vocab_size}")
    log_probs = np.log(counts + 1) - np.log(counts.sum() + vocab_size)
    return float(np.exp(-log_probs[np.asarray(val_tokens)].mean()))


def _build(cfg: DataConfig, out: Path, fingerprint: str, progress: bool) -> dict:
    started = time.perf_counter()
    with _datasets_progress_bars(progress):
        corpus = load_corpus(cfg, progress=progress)
        splits = dict(zip(SPLITS, split_corpus(corpus, cfg.val_fraction)))
        tokenizer = _make_tokenizer(cfg, splits["train"], out / "tokenizer", progress)
        vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
        work = out / ".tokenized"
        counts = {}
        try:
            for name, documents in splits.items():
                tokenized = documents.map(
                    lambda batch: {"input_ids": _encode(tokenizer, batch["text"])},
                    batched=True, batch_size=TOKENIZE_BATCH_SIZE, remove_columns=["text"], desc=f"tokenizing {name}",
                    cache_file_name=str(work / f"{name}.arrow"), load_from_cache_file=False,
                    new_fingerprint=f"{fingerprint}-{name}")
                token_file = write_tokens(out / name, _token_lists(tokenized, f"writing {name}", progress),
                                          vocab_size, eos_id)
                counts[name] = {"documents": token_file.num_documents, "tokens": token_file.num_tokens}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "sources": list(cfg.sources),
            "bytes": corpus_bytes(corpus), "vocab_size": vocab_size, "eos_id": eos_id, "tokenizer": "tokenizer",
            **counts, "prepare_seconds": round(time.perf_counter() - started, 2)}


def _make_tokenizer(cfg: DataConfig, train: datasets.Dataset, out_dir: Path,
                    progress: bool) -> PreTrainedTokenizerFast:
    """`cfg.tokenizer` copied into `out_dir`, or a new one trained on the train split only (val stays unseen)."""
    if not cfg.tokenizer:
        return train_tokenizer(train, cfg.vocab_size, out_dir, progress=progress)
    if not Path(cfg.tokenizer).is_dir():
        raise ConfigError("data.tokenizer", f"{cfg.tokenizer!r} is not a tokenizer folder")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError("data.tokenizer", f"{cfg.tokenizer!r} defines no EOS token to separate documents")
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def _encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, straight from the Rust tokenizer."""
    backend = tokenizer.backend_tokenizer
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast (no offsets): tokenizers>=0.21
    return [encoding.ids for encoding in encode_batch(texts, add_special_tokens=False)]


def _token_lists(tokenized: datasets.Dataset, desc: str, progress: bool) -> Iterator[np.ndarray]:
    with tqdm(total=len(tokenized), desc=desc, unit="doc", disable=not progress) as bar:
        for batch in tokenized.with_format("numpy").iter(batch_size=BATCH_SIZE):
            yield from batch["input_ids"]
            bar.update(len(batch["input_ids"]))


def _check_sequences_fit(meta: dict, seq_len: int, out: Path) -> None:
    remedies = {"train": ("data.sources", "add sources or raise data.max_bytes"),
                "val": ("data.val_fraction", "raise data.val_fraction or add sources")}
    for name, (key, remedy) in remedies.items():
        tokens = meta[name]["tokens"]
        if tokens < seq_len + 1:
            raise ConfigError(key, f"the {name} split of {out} holds {tokens} tokens, fewer than one sequence "
                                   f"of model.seq_len={seq_len} needs ({seq_len + 1}): {remedy}")


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """Hide the `datasets` progress bars for the duration when `enabled` is False, then show them again."""
    if enabled or datasets.utils.are_progress_bars_disabled():
        yield
        return
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        datasets.utils.enable_progress_bars()
