"""`prepare_data`: corpus -> deduplication -> train/val split -> tokenizer -> token files, once per data config
and state of the sources.

The output folder `data.dir` holds `tokenizer/` (AutoTokenizer format), `train.bin/.idx`, `val.bin/.idx` and
`meta.json`. `meta.json` carries a fingerprint of the data config and of the source files, and lists every
file moe-lm wrote in the folder, with its size.
- Reuse: when the fingerprint matches and every listed file is there at its size, `prepare_data` returns at
  once and writes nothing, so prepared data on a read-only mount works and `moe-lm train` can call it on every
  start. A truncated or rewritten token file fails the size check, so the next call rebuilds it. If a source
  has gone (the corpus was not copied to a cluster), data prepared from it with the same config is used, with
  a warning.
- Rebuild: the new data is built in the sibling folder `.NAME.partial`, then swapped in by two renames (the old
  folder moves to `.NAME.previous`, and is deleted once the new one is in place). A failure or a crash before
  the swap leaves the old data as it was; a crash between the two renames is undone by the next call.
- Nothing lost: a rebuild refuses, naming them, when `data.dir` holds files that its meta.json does not list.
- A lock file `.NAME.lock` beside `data.dir` makes concurrent builders (several ranks on one machine) wait for
  the first one; readers of complete, current data take no lock.

Exact-duplicate documents are dropped before the split (their count goes to meta.json), so no text is both
trained on and validated on. Documents go to validation by a hash of their text, not by position: adding or
reordering sources never moves a document between splits.
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
import warnings
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import datasets
import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.corpus import HubDataset, ReadReport, corpus_bytes, load_corpus, resolve_sources
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import write_tokens
from moe_lm.data.tokenizer import EOS_TOKEN, MIN_VOCAB_SIZE, load_tokenizer, save_tokenizer, train_tokenizer

FORMAT_VERSION = 2
SPLITS = ("train", "val")
BATCH_SIZE = 1000
TOKENIZE_BATCH_SIZE = 64  # documents per Rust call: small enough to keep both cores busy to the end
HASHED_FILE_BYTES = 1 << 20  # sources below this size are fingerprinted by content, larger ones by mtime
# format 1 listed no files in meta.json; these are the ones it wrote
FORMAT_1_FILES = frozenset({".prepare.lock", "meta.json", "train.bin", "train.idx", "val.bin", "val.idx",
                            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                            "tokenizer/special_tokens_map.json"})
FOREIGN_FILES_SHOWN = 5


def prepare_data(cfg: DataConfig, seq_len: int | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the prepared data of `cfg` in `cfg.dir` and return that folder.

    With `seq_len`, also check that both splits hold at least one training sequence (`seq_len + 1` tokens).
    """
    if not cfg.tokenizer and cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError("data.vocab_size", f"must be >= {MIN_VOCAB_SIZE} for a byte-level BPE (the 256 byte "
                                             f"tokens and {EOS_TOKEN}), got {cfg.vocab_size}")
    out = Path(cfg.dir)
    meta = _complete_meta(out)
    try:
        fingerprint = data_fingerprint(cfg)
    except ConfigError as exc:
        if meta is None or meta["fingerprint"].get("config") != config_fingerprint(cfg):
            raise
        warnings.warn(f"{exc}: using the data prepared from it in {out}", stacklevel=2)
        fingerprint = meta["fingerprint"]
    if meta is None or meta["fingerprint"] != fingerprint:
        meta = _rebuild(cfg, out, fingerprint, progress)
    if seq_len is not None:
        _check_sequences_fit(meta, seq_len, out)
    return out


def load_meta(data_dir: str | Path) -> dict:
    """The `meta.json` of a prepared data folder."""
    return json.loads((Path(data_dir) / "meta.json").read_text())


def data_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """What decides the prepared files: the data config (`config`) and the state of its files (`sources`)."""
    return {"config": config_fingerprint(cfg), "sources": sources_fingerprint(cfg)}


def config_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data config (but not its folder), the format version, and for "stdlib" the interpreter whose
    library is read."""
    fields = dataclasses.asdict(cfg)
    fields.pop("dir")
    fields["format_version"] = FORMAT_VERSION
    if "stdlib" in cfg.sources:
        fields["stdlib"] = [sysconfig.get_paths()["stdlib"], platform.python_version()]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def sources_fingerprint(cfg: DataConfig) -> str:
    """Hash of every file the sources resolve to, and of the files of `data.tokenizer`: each one's path and size,
    plus its content when under 1 MB (a copy or checkout that keeps the content keeps the data) or else its
    mtime. The standard library is taken by path, size and mtime alone: it is large, and read-only in practice.
    A hub dataset counts by its name only."""
    digest = hashlib.sha256()
    for source in cfg.sources:
        for part in resolve_sources([source]):
            for path in () if isinstance(part, HubDataset) else part.paths:
                _add_file(digest, path, by_content=source != "stdlib")
    if cfg.tokenizer:
        for path in sorted(p for p in Path(cfg.tokenizer).rglob("*") if p.is_file()):
            _add_file(digest, path, by_content=True)
    return digest.hexdigest()[:32]


def drop_duplicates(corpus: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    """The corpus without exact repeats of a document (the first one stays), and the number dropped."""
    digests = b"".join(hashlib.blake2b(text.encode(), digest_size=16).digest()
                       for batch in corpus.iter(batch_size=BATCH_SIZE) for text in batch["text"])
    _, first = np.unique(np.frombuffer(digests, dtype="V16"), return_index=True)
    if len(first) == len(corpus):
        return corpus, 0
    return corpus.select(np.sort(first), keep_in_memory=True), len(corpus) - len(first)


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


def _rebuild(cfg: DataConfig, out: Path, fingerprint: dict[str, str], progress: bool) -> dict:
    """Build the data in `.NAME.partial` and swap it in for `out` (see the module docstring); its meta."""
    target = out.resolve()  # a symlinked data.dir stays a link: the folder it points to is swapped
    partial, previous = _beside(target, "partial"), _beside(target, "previous")
    try:
        with _exclusive_lock(_beside(target, "lock")):
            _finish_interrupted_swap(target, previous)
            meta = _complete_meta(target)  # another process may have built it while this one waited
            if meta is not None and meta["fingerprint"] == fingerprint:
                return meta
            shutil.rmtree(partial, ignore_errors=True)  # left by a build that crashed
            _refuse_foreign_files(target)
            partial.mkdir()
            try:
                meta = _build(cfg, partial, fingerprint, progress)
                meta["files"] = {p.relative_to(partial).as_posix(): p.stat().st_size
                                 for p in sorted(partial.rglob("*")) if p.is_file()}
                (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
                _refuse_foreign_files(target)  # again: files may have appeared there during the build
                if target.exists():
                    os.replace(target, previous)
                os.replace(partial, target)
                shutil.rmtree(previous, ignore_errors=True)  # what is left, the next rebuild deletes
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    except OSError as exc:
        raise DataError(f"cannot build the prepared data in {out}: {exc}") from exc
    return meta


def _build(cfg: DataConfig, out: Path, fingerprint: dict[str, str], progress: bool) -> dict:
    """Write the tokenizer and token files into the empty folder `out`; their meta (without the file list)."""
    started = time.perf_counter()
    report = ReadReport()
    with _datasets_progress_bars(progress):
        corpus, duplicates = drop_duplicates(load_corpus(cfg, progress=progress, report=report))
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
                    new_fingerprint=f"{fingerprint['sources']}-{name}")
                token_file = write_tokens(out / name, _token_lists(tokenized, f"writing {name}", progress),
                                          vocab_size, eos_id)
                counts[name] = {"documents": token_file.num_documents, "tokens": token_file.num_tokens}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "sources": list(cfg.sources),
            "bytes": corpus_bytes(corpus), "vocab_size": vocab_size, "eos_id": eos_id, "tokenizer": "tokenizer",
            **counts, "decode_errors": cfg.decode_errors, **report.counts(), "duplicate_documents_removed": duplicates,
            "prepare_seconds": round(time.perf_counter() - started, 2)}


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


def _add_file(digest: hashlib._Hash, path: Path, by_content: bool) -> None:
    try:
        stat = path.stat()
        content = (path.read_bytes() if by_content and stat.st_size < HASHED_FILE_BYTES
                   else str(stat.st_mtime_ns).encode())
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc
    digest.update(f"{path}\0{stat.st_size}\0".encode() + content + b"\0")


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = load_meta(folder)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _complete_meta(folder: Path) -> dict | None:
    """The meta.json of a prepared folder whose listed files are all there with their sizes, else None."""
    meta = _read_meta(folder)
    if meta is None or not isinstance(meta.get("files"), dict) or not isinstance(meta.get("fingerprint"), dict):
        return None
    for name, size in meta["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return meta


def _files_written(folder: Path) -> set[str]:
    """The files in `folder` that moe-lm wrote, by its meta.json (none known without one)."""
    meta = _read_meta(folder)
    if meta is None:
        return set()
    if meta.get("format_version") == 1:
        return set(FORMAT_1_FILES)
    return {"meta.json", *meta.get("files", [])}


def _refuse_foreign_files(folder: Path) -> None:
    """Raise, naming them, if `folder` holds files or folders that moe-lm did not write there."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError("data.dir", f"{folder} is a file, not a folder")
    ours = _files_written(folder)
    ours |= {str(parent) for name in ours for parent in PurePosixPath(name).parents if str(parent) != "."}
    foreign = []
    for root, subfolders, files in os.walk(folder):
        base = PurePosixPath(Path(root).relative_to(folder).as_posix())
        # the leaves: files, and folders that hold nothing or are links (os.walk does not enter those)
        leaves = files + [name for name in subfolders
                          if Path(root, name).is_symlink() or not any(Path(root, name).iterdir())]
        foreign.extend(str(base / name) for name in leaves if str(base / name) not in ours)
    if foreign:
        foreign.sort()
        more = len(foreign) - FOREIGN_FILES_SHOWN
        shown = ", ".join(foreign[:FOREIGN_FILES_SHOWN]) + (f" and {more} more" if more > 0 else "")
        raise ConfigError("data.dir", f"{folder} holds files that moe-lm did not write: {shown}. Nothing was "
                                      "changed: move them elsewhere, or set data.dir to a new or empty folder")


def _finish_interrupted_swap(target: Path, previous: Path) -> None:
    """Complete a swap that a crash interrupted: put the old data back if the new data never arrived, or
    delete it if it did."""
    if not previous.exists():
        return
    if not target.exists():
        os.replace(previous, target)
        return
    _refuse_foreign_files(previous)
    shutil.rmtree(previous)


def _beside(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
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
