"""`prepare_data`: corpus -> shards (deduplication, train/val split, tokenization) -> index, once per data config and
state of the sources. Layout and rules of the result: docs/data.md.

The output folder `data.dir` holds `tokenizer/` (AutoTokenizer format), the token shards `train-NNNNN.bin/.idx` and
`val-NNNNN.bin/.idx` with their records under `shards/`, the splits `train.runs.npy` / `val.runs.npy` (`stream.py`
reads them), `train.counts.npy` (each token id's count in the training split: the unigram baseline needs no pass
over the corpus) and `meta.json`. `meta.json` carries a fingerprint of the data config and of the source files, and
lists every file moe-lm wrote in the folder, with its size.
- Reuse: when the fingerprint matches and every listed file is there at its size, `prepare_data` returns at
  once and writes nothing, so prepared data on a read-only mount works and `moe-lm train` can call it on every
  start. A truncated or rewritten token file fails the size check, so the next call rebuilds it. If a source
  has gone (the corpus was not copied to a cluster), data prepared from it with the same config is used, with
  a warning.
- Rebuild: the new data is built in the sibling folder `.NAME.partial`, then swapped in by two renames (the old
  folder moves to `.NAME.previous`, and is deleted once the new one is in place). A failure or a crash before
  the swap leaves the old data as it was; a crash between the two renames is undone by the next call.
- Resume: `.NAME.partial` keeps its complete shards (`shards.py`) across a failure or a crash, and the next call
  with the same fingerprint prepares only the others; another fingerprint starts it afresh.
- Several jobs: `prepare_shards(cfg, i, n)` prepares the shards j with j % n == i (n machines or jobs sharing the
  folder), and the job that finds every shard complete indexes them (`index.py`) and swaps the result in;
  `index_data` does that step alone. `prepare_data` is `prepare_shards(cfg, 0, 1)`.
- Nothing lost: a rebuild refuses, naming them, when `data.dir` holds files that its meta.json does not list.
- A lock file `.NAME.lock` beside `data.dir` orders the builders' short steps (opening the partial folder,
  training the tokenizer, indexing and swapping); shards are prepared without it. Readers of complete, current
  data take no lock. Jobs on several machines need a shared file system where flock works (NFSv4, Lustre).

Exact duplicates are dropped within each shard, then across shards at indexing; a document goes to validation by
a hash of its text, not by position, so adding or reordering sources never moves a document between splits, and
no text is both trained on and validated on. `data.max_val_tokens` caps validation, lowest hashes first.
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
from transformers import PreTrainedTokenizerFast

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.corpus import HubDataset, ReadReport, megatron_sources, resolve_sources
from moe_lm.data.errors import DataError
from moe_lm.data.index import index_megatron, index_shards
from moe_lm.data.indexed import TMP_MARK, temporary_path
from moe_lm.data.shards import (Tokenization, build_shard, digest, hash_key, is_val, load_shard_record,
                                plan_digest, plan_shards, shard_complete, shard_name, shard_progress,
                                tokenizer_sample, val_threshold)
from moe_lm.data.tokenizer import EOS_TOKEN, MIN_VOCAB_SIZE, load_tokenizer, save_tokenizer, train_tokenizer

FORMAT_VERSION = 3
SPLITS = ("train", "val")
BATCH_SIZE = 1000
HASHED_FILE_BYTES = 1 << 20  # sources below this size are fingerprinted by content, larger ones by mtime
# format 1 listed no files in meta.json; these are the ones it wrote
FORMAT_1_FILES = frozenset({".prepare.lock", "meta.json", "train.bin", "train.idx", "val.bin", "val.idx",
                            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                            "tokenizer/special_tokens_map.json"})
FOREIGN_FILES_SHOWN = 5
UNFINGERPRINTED = ("dir", "num_proc", "blend")  # config keys that do not change the prepared files
BUILD_FILE = "build.json"  # in .NAME.partial: the fingerprint and plan its shards were prepared for


def prepare_data(cfg: DataConfig, seq_len: int | None = None, progress: bool = True) -> Path:
    """Build (or reuse) the prepared data of `cfg` in `cfg.dir` and return that folder.

    With `seq_len`, also check that both splits hold at least one training sequence (`seq_len + 1` tokens).
    """
    out = prepare_shards(cfg, 0, 1, seq_len, progress)
    assert out is not None, "a single job prepares every shard, so it indexes them"
    return out


def prepare_shards(cfg: DataConfig, job: int, jobs: int, seq_len: int | None = None,
                   progress: bool = True) -> Path | None:
    """Job `job` of `jobs`: prepare the shards j of `cfg` with j % jobs == job that are not prepared yet; if then
    every shard is complete, index them and return `cfg.dir`, else return None (another job will)."""
    if not 0 <= job < jobs:
        raise ConfigError("--shard", f"job {job} of {jobs} does not exist: use i/n with 0 <= i < n")
    meta = _prepare(cfg, job, jobs, index_only=False, progress=progress)
    if meta is None:
        return None
    if seq_len is not None:
        check_sequences_fit(meta, seq_len, Path(cfg.dir))
    return Path(cfg.dir)


def index_data(cfg: DataConfig, seq_len: int | None = None, progress: bool = True) -> Path:
    """Index the shards that `prepare_shards` jobs prepared and swap the result into `cfg.dir` (nothing to do if it
    is complete and current); a `DataError` names the shards not prepared yet."""
    meta = _prepare(cfg, 0, 1, index_only=True, progress=progress)
    if seq_len is not None:
        check_sequences_fit(meta, seq_len, Path(cfg.dir))
    return Path(cfg.dir)


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" (the command line's --shard) as (job, jobs)."""
    job, _, jobs = text.partition("/")
    try:
        job_number, job_count = int(job), int(jobs)
    except ValueError:
        raise ConfigError("--shard", f"expected i/n (job i of n, from 0), got {text!r}") from None
    if not 0 <= job_number < job_count:
        raise ConfigError("--shard", f"job {job_number} of {job_count} does not exist: use i/n with 0 <= i < n")
    return job_number, job_count


def load_meta(data_dir: str | Path) -> dict:
    """The `meta.json` of a prepared data folder."""
    return json.loads((Path(data_dir) / "meta.json").read_text())


def data_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """What decides the prepared files: the data config (`config`) and the state of its files (`sources`)."""
    return {"config": config_fingerprint(cfg), "sources": sources_fingerprint(cfg)}


def config_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data config (but not its folder, its number of processes or a blend), the format version, and
    for "stdlib" the interpreter whose library is read."""
    fields = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in UNFINGERPRINTED}
    fields["format_version"] = FORMAT_VERSION
    if "stdlib" in cfg.sources:
        fields["stdlib"] = [sysconfig.get_paths()["stdlib"], platform.python_version()]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def sources_fingerprint(cfg: DataConfig) -> str:
    """Hash of every file the sources resolve to, and of the files of `data.tokenizer`: each one's path and size,
    plus its content when under 1 MB (a copy or checkout that keeps the content keeps the data) or else its
    mtime. The standard library is taken by path, size and mtime alone: it is large, and read-only in practice.
    A hub dataset counts by its name only."""
    digest_ = hashlib.sha256()
    for source in cfg.sources:
        for part in resolve_sources([source]):
            for path in () if isinstance(part, HubDataset) else part.paths:
                _add_file(digest_, path, by_content=source != "stdlib")
    if cfg.tokenizer:
        for path in sorted(p for p in Path(cfg.tokenizer).rglob("*") if p.is_file()):
            _add_file(digest_, path, by_content=True)
    return digest_.hexdigest()[:32]


def drop_duplicates(corpus: datasets.Dataset) -> tuple[datasets.Dataset, int]:
    """The corpus without exact repeats of a document (the first one stays), and the number dropped: the rule
    each shard applies, for a corpus held in memory."""
    digests = b"".join(digest(text.encode()) for batch in corpus.iter(batch_size=BATCH_SIZE) for text in batch["text"])
    _, first = np.unique(np.frombuffer(digests, dtype="V16"), return_index=True)
    if len(first) == len(corpus):
        return corpus, 0
    return corpus.select(np.sort(first), keep_in_memory=True), len(corpus) - len(first)


def split_corpus(corpus: datasets.Dataset, val_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) of a corpus held in memory, by the rule of the shards and the index: a document is in val when
    its hash falls below `val_fraction`.

    Both splits get at least one document: if the hash picks none for val, the lowest-hash document moves
    there (and if it picks all of them, the highest-hash one moves to train).
    """
    if len(corpus) < 2:
        raise ConfigError("data.sources", f"the corpus has {len(corpus)} document(s); a train and a validation "
                                          "split need at least 2")
    keys = [digest(text.encode()) for batch in corpus.iter(batch_size=BATCH_SIZE) for text in batch["text"]]
    threshold = val_threshold(val_fraction)
    in_val = np.array([is_val(key, threshold) for key in keys], dtype=bool)
    order = sorted(range(len(keys)), key=lambda i: hash_key(keys[i]))
    if not in_val.any():
        in_val[order[0]] = True
    if in_val.all():
        in_val[order[-1]] = False
    return (corpus.select(np.flatnonzero(~in_val), keep_in_memory=True),
            corpus.select(np.flatnonzero(in_val), keep_in_memory=True))


def unigram_perplexity_from_counts(counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """Perplexity on `val_tokens` of the add-one-smoothed unigram distribution of `counts` (occurrences of each
    token id in the training data, one entry per id of the vocabulary): the floor any language model should beat.
    Its cost follows the validation tokens and the vocabulary, never the training set.

        p(v) = (counts[v] + 1) / (sum(counts) + V),    ppl = exp(-mean over val tokens t of log p(t))
    """
    counts = np.asarray(counts, dtype=np.float64)
    val_tokens = np.asarray(val_tokens)
    if len(val_tokens) and (int(val_tokens.min()) < 0 or int(val_tokens.max()) >= len(counts)):
        raise ValueError(f"token ids exceed the vocabulary of the counts ({len(counts)})")
    log_probs = np.log(counts + 1) - np.log(counts.sum() + len(counts))
    return float(np.exp(-log_probs[val_tokens].mean()))


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """`unigram_perplexity_from_counts` with the counts taken from `train_tokens` (a pass over them)."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size)
    if len(counts) > vocab_size:
        raise ValueError(f"token ids exceed vocab_size={vocab_size}")
    return unigram_perplexity_from_counts(counts, val_tokens)


def _prepare(cfg: DataConfig, job: int, jobs: int, index_only: bool, progress: bool) -> dict | None:
    """The meta of the complete, current data in `cfg.dir`, built as far as job `job` of `jobs` can (None when
    shards of other jobs are missing)."""
    if not cfg.tokenizer and cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError("data.vocab_size", f"must be >= {MIN_VOCAB_SIZE} for a byte-level BPE (the 256 byte "
                                             f"tokens and {EOS_TOKEN}), got {cfg.vocab_size}")
    out = Path(cfg.dir)
    meta = complete_meta(out)
    try:
        fingerprint = data_fingerprint(cfg)
    except ConfigError as exc:
        if meta is None or meta["fingerprint"].get("config") != config_fingerprint(cfg):
            raise
        warnings.warn(f"{exc}: using the data prepared from it in {out}", stacklevel=3)
        return meta
    if meta is not None and meta["fingerprint"] == fingerprint:
        return meta
    target = out.resolve()  # a symlinked data.dir stays a link: the folder it points to is swapped
    partial, previous, lock = (_beside(target, kind) for kind in ("partial", "previous", "lock"))
    try:
        megatron = megatron_sources(cfg.sources)
        plan = [] if megatron else plan_shards(cfg)  # reads file sizes only, no lock needed
        with _exclusive_lock(lock):
            _finish_interrupted_swap(target, previous)
            meta = complete_meta(target)  # another process may have built it while this one waited
            if meta is not None and meta["fingerprint"] == fingerprint:
                return meta
            _refuse_foreign_files(target)
            _open_partial(partial, fingerprint, plan)
            if index_only:
                _require_shards(partial, len(plan), out)
            tokenizer = _ensure_tokenizer(cfg, partial, plan, progress)
        vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
        if not index_only:
            _build_shards(cfg, partial, plan, range(job, len(plan), jobs), vocab_size, eos_id, progress)
        with _exclusive_lock(lock):
            meta = complete_meta(target)
            if meta is not None and meta["fingerprint"] == fingerprint:
                return meta
            if not all(shard_complete(partial, number) for number in range(len(plan))):
                return None  # the job that completes the last shard indexes
            meta = _index(cfg, partial, plan, megatron, fingerprint, vocab_size, eos_id, progress)
            _swap_in(partial, target, previous, meta)
    except OSError as exc:
        raise DataError(f"cannot build the prepared data in {out}: {exc}") from exc
    return meta


def _require_shards(partial: Path, num_shards: int, out: Path) -> None:
    missing = [number for number in range(num_shards) if not shard_complete(partial, number)]
    if missing:
        shown = ", ".join(map(shard_name, missing[:FOREIGN_FILES_SHOWN]))
        raise DataError(f"{len(missing)} of {num_shards} shards of {out} are not prepared yet ({shown}"
                        f"{' ...' if len(missing) > FOREIGN_FILES_SHOWN else ''}): run prepare-data --shard i/n for "
                        "them (or prepare-data alone) first")


def _open_partial(partial: Path, fingerprint: dict[str, str], plan: list) -> None:
    """Make `partial` the build folder of this fingerprint and plan: kept (with its complete shards) if it is one
    already, else started afresh."""
    wanted = {"fingerprint": fingerprint, "plan": plan_digest(plan), "shards": len(plan)}
    if partial.exists():
        try:
            built_for = json.loads((partial / BUILD_FILE).read_text())
        except (OSError, ValueError):
            built_for = None
        if isinstance(built_for, dict) and {k: built_for.get(k) for k in wanted} == wanted:
            return
        shutil.rmtree(partial)
    partial.mkdir()
    _write_json(partial / BUILD_FILE, wanted)


def _ensure_tokenizer(cfg: DataConfig, partial: Path, plan: list, progress: bool) -> PreTrainedTokenizerFast:
    """The tokenizer of the build: `cfg.tokenizer` copied, or a new one trained on a sample of training text
    (`shards.tokenizer_sample`; validation stays unseen), made once by the first job and moved into place whole."""
    folder = partial / "tokenizer"
    if folder.is_dir():
        return load_tokenizer(folder)
    started = time.perf_counter()
    scratch = temporary_path(folder)
    shutil.rmtree(scratch, ignore_errors=True)
    if cfg.tokenizer:
        if not Path(cfg.tokenizer).is_dir():
            raise ConfigError("data.tokenizer", f"{cfg.tokenizer!r} is not a tokenizer folder")
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError("data.tokenizer", f"{cfg.tokenizer!r} defines no EOS token to separate documents")
        save_tokenizer(tokenizer, scratch)
    else:
        if megatron_sources(cfg.sources):
            raise ConfigError("data.tokenizer", "a megatron: source needs the tokenizer it was made with: set "
                                                "data.tokenizer to its folder (AutoTokenizer format)")
        train_tokenizer(tokenizer_sample(cfg, plan), cfg.vocab_size, scratch, progress=progress)
    os.replace(scratch, folder)
    build = json.loads((partial / BUILD_FILE).read_text())
    _write_json(partial / BUILD_FILE, build | {"tokenizer_seconds": round(time.perf_counter() - started, 2)})
    return load_tokenizer(folder)


def _build_shards(cfg: DataConfig, partial: Path, plan: list, numbers: range, vocab_size: int, eos_id: int,
                  progress: bool) -> None:
    todo = [number for number in numbers if not shard_complete(partial, number)]
    if not todo:
        return
    report = ReadReport()  # of this job, warned about once
    tokenization = Tokenization(partial / "tokenizer" / "tokenizer.json", cfg.num_proc)
    with shard_progress(len(numbers), len(numbers) - len(todo), progress) as bar, tokenization:
        for number in todo:
            shard_report = ReadReport()
            build_shard(cfg, number, plan[number], partial, tokenization, vocab_size, eos_id, shard_report, progress)
            report.undecodable += shard_report.undecodable
            report.binary_files += shard_report.binary_files
            report.replaced_characters += shard_report.replaced_characters
            bar.update(1)
    report.warn(cfg.decode_errors)


def _index(cfg: DataConfig, partial: Path, plan: list, megatron: list, fingerprint: dict[str, str], vocab_size: int,
           eos_id: int, progress: bool) -> dict:
    """Write the splits into `partial` (`index.py`) and return its meta (with the file list)."""
    started = time.perf_counter()
    if megatron:
        meta = index_megatron(partial, megatron[0].prefix, cfg.val_fraction, cfg.max_val_tokens, vocab_size, progress)
        records = []
    else:
        meta = index_shards(partial, len(plan), cfg.max_val_tokens, vocab_size, progress)
        records = [load_shard_record(partial, number) for number in range(len(plan))]
    build = json.loads((partial / BUILD_FILE).read_text())
    (partial / BUILD_FILE).unlink()
    for leftover in partial.rglob(f"*{TMP_MARK}*"):  # of jobs that crashed while writing
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    report = {key: sum(r.get("report", {}).get(key, 0) for r in records) for key in ReadReport().counts()}
    seconds = {"tokenizer": build.get("tokenizer_seconds", 0.0), "shards": round(sum(r["seconds"] for r in records), 2),
               "index": round(time.perf_counter() - started, 2)}
    meta = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "sources": list(cfg.sources),
            "bytes": meta.pop("bytes"), "vocab_size": vocab_size, "eos_id": eos_id, "tokenizer": "tokenizer",
            "train": meta.pop("train"), "val": meta.pop("val"), "shards": len(plan), "decode_errors": cfg.decode_errors,
            **report, **meta, "prepare_seconds": round(sum(seconds.values()), 2), "seconds": seconds}
    meta["files"] = {p.relative_to(partial).as_posix(): p.stat().st_size
                     for p in sorted(partial.rglob("*")) if p.is_file()}
    return meta


def _swap_in(partial: Path, target: Path, previous: Path, meta: dict) -> None:
    """Write meta.json into `partial` and swap it in for `target` (see the module docstring)."""
    (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _refuse_foreign_files(target)  # again: files may have appeared there during the build
    if target.exists():
        os.replace(target, previous)
    os.replace(partial, target)
    shutil.rmtree(previous, ignore_errors=True)  # what is left, the next rebuild deletes


def check_sequences_fit(meta: dict, seq_len: int, out: Path) -> None:
    remedies = {"train": ("data.sources", "add sources or raise data.max_bytes"),
                "val": ("data.val_fraction", "raise data.val_fraction (or data.max_val_tokens) or add sources")}
    for name, (key, remedy) in remedies.items():
        tokens = meta[name]["tokens"]
        if tokens < seq_len + 1:
            raise ConfigError(key, f"the {name} split of {out} holds {tokens} tokens, fewer than one sequence "
                                   f"of model.seq_len={seq_len} needs ({seq_len + 1}): {remedy}")


def _write_json(path: Path, value: dict) -> None:
    tmp = temporary_path(path)
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _add_file(digest_: hashlib._Hash, path: Path, by_content: bool) -> None:
    try:
        stat = path.stat()
        content = (path.read_bytes() if by_content and stat.st_size < HASHED_FILE_BYTES
                   else str(stat.st_mtime_ns).encode())
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc
    digest_.update(f"{path}\0{stat.st_size}\0".encode() + content + b"\0")


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = load_meta(folder)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def complete_meta(folder: Path) -> dict | None:
    """The meta.json of a prepared folder whose listed files (and the token files it reads from elsewhere, a
    Megatron dataset) are all there with their sizes, else None."""
    meta = _read_meta(folder)
    if meta is None or not isinstance(meta.get("files"), dict) or not isinstance(meta.get("fingerprint"), dict):
        return None
    sizes = dict(meta["files"])
    for entry in meta.get("token_files", []):
        if Path(entry["prefix"]).is_absolute():
            sizes |= {entry["prefix"] + ".bin": entry["bin_bytes"], entry["prefix"] + ".idx": entry["idx_bytes"]}
    for name, size in sizes.items():
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
