"""The last step of a preparation: the splits of a prepared folder as runs of documents of its token files
(`stream.py` reads them), from complete text shards or from a Megatron dataset, plus the training token counts.

Text shards:
1. Duplicates across shards. One pass over the shards partitions their hash records by the top byte of the hash
   into `BUCKETS` temporary files; each bucket is then sorted on its own, and of the copies of a text the one in
   the lowest shard stays. Memory holds one bucket: 1/256 of the corpus' records, 40 bytes a document. Copies of a
   text lie in the same split (the split goes by hash), so dropping them never moves text between train and val.
2. Validation cap. The validation documents left, in hash order (bucket after bucket), are kept while their tokens
   stay within `data.max_val_tokens` (and at least one is); the others are trained on. If no document falls in
   validation, the training document with the lowest hash is moved there; if every one does, the one with the
   highest hash is trained on.
3. Runs. train: each shard's training documents but the duplicates, then each shard's validation documents beyond
   the cap; val: the kept validation documents in hash order over all shards, so that any prefix of the split (the
   trainer evaluates on one) samples the whole corpus.
4. Counts. `train.counts.npy`: the shards' counts of train and val tokens, less those of the documents left out of
   the train split (read back: duplicates and kept validation documents, a small part of the corpus).

A Megatron dataset is read once: each document's token bytes are hashed for the split, validation is capped the
same way, and the token counts are taken. Its documents are not deduplicated (they are used as preprocessed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moe_lm.config.schema import ConfigError
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import TokenFile, token_dtype
from moe_lm.data.megatron import MegatronTokenFile
from moe_lm.data.shards import (HASH_DTYPE, bookkeeping_path, digest, load_shard_record, token_prefix,
                                val_threshold)
from moe_lm.data.stream import RUN_COLUMNS

BUCKETS = 256
BUCKET_DTYPE = np.dtype(HASH_DTYPE.descr + [("shard", "<i8")])
MEGATRON_DOCUMENTS_PER_READ = 1 << 16


def index_shards(folder: Path, num_shards: int, max_val_tokens: int, vocab_size: int, progress: bool = False) -> dict:
    """Write train.runs.npy, val.runs.npy and train.counts.npy for the complete shards in `folder`; return the
    meta.json entries they make (token files, split sizes, bytes, duplicates). Shards are opened one at a time."""
    records = [load_shard_record(folder, number) for number in range(num_shards)]
    repeats = _cross_shard_repeats(folder, num_shards, progress)
    dropped = [[] for _ in range(num_shards)]  # document codes (train >= 0, val -1 - n) of the copies, per shard
    for shard, document in repeats["dropped"]:
        dropped[shard].append(document)
    val_offsets = [TokenFile(folder / token_prefix("val", n)).offsets for n in range(num_shards)]
    val_order = repeats["val_order"]  # (shard, val document) in hash order, copies left out
    val_lengths = np.array([val_offsets[s][i + 1] - val_offsets[s][i] for s, i in val_order.tolist()], dtype=np.int64)
    train_documents = sum(r["documents"]["train"] for r in records) - sum(d >= 0 for ds in dropped for d in ds)
    keep = _val_kept(val_lengths, max_val_tokens, train_documents)
    moved = repeats["lowest_train"] if keep == 0 else None  # no validation document: this one becomes one
    if moved is not None:
        dropped[moved[0]].append(moved[1])
    kept_val = [[] for _ in range(num_shards)]
    for shard, index in val_order[:keep].tolist():
        kept_val[shard].append(index)

    counts = np.zeros(vocab_size, dtype=np.int64)
    train_runs, val_tail_runs = [], []
    for shard in tqdm(range(num_shards), desc="indexing", unit="shard", disable=not progress):
        shard_counts = np.load(bookkeeping_path(folder, shard, ".counts.npy"))
        train = TokenFile(folder / token_prefix("train", shard))
        left_out = np.array(sorted(d for d in dropped[shard] if d >= 0), dtype=np.int64)
        counts += shard_counts[0] - _counts(train, left_out, vocab_size)
        train_runs.append(_runs(_mask(train.num_documents, left_out, keep=False), train.offsets, shard))
        val = TokenFile(folder / token_prefix("val", shard))
        not_trained = np.array(sorted(kept_val[shard] + [-1 - d for d in dropped[shard] if d < 0]), dtype=np.int64)
        if len(not_trained) < val.num_documents:  # validation documents beyond the cap: trained on
            counts += shard_counts[1] - _counts(val, not_trained, vocab_size)
            val_tail_runs.append(_runs(_mask(val.num_documents, not_trained, keep=False), val.offsets,
                                       num_shards + shard))
    if moved is not None:
        shard, document = moved
        offsets = TokenFile(folder / token_prefix("train", shard)).offsets
        val_runs = np.array([[shard, document, document + 1, offsets[document], offsets[document + 1]]])
    else:
        val_runs = _ordered_runs(val_order[:keep], val_offsets, num_shards)
    meta = _write_splits(folder, np.concatenate(train_runs + val_tail_runs), val_runs, counts)
    meta["token_files"] = [_file_entry(folder / token_prefix(split, n), token_dtype(vocab_size))
                           for split in ("train", "val") for n in range(num_shards)]
    meta["bytes"] = sum(r["bytes"] for r in records) - repeats["dropped_bytes"]
    meta["duplicate_documents_removed"] = sum(r["duplicates"] for r in records) + len(repeats["dropped"])
    meta["val_documents_trained"] = len(val_order) - keep
    return meta


def index_megatron(folder: Path, prefix: Path, val_fraction: float, max_val_tokens: int, vocab_size: int,
                   progress: bool = False) -> dict:
    """The splits of a Megatron dataset (read where it lies), as `index_shards` writes them."""
    source = MegatronTokenFile(prefix)
    offsets, threshold = source.offsets, np.uint64(val_threshold(val_fraction))
    counts = np.zeros(vocab_size, dtype=np.int64)
    candidates = []  # (hi, lo, document) of the validation documents: memory follows the validation split
    lowest = []  # (hi, lo, document) of the lowest hash of each batch
    batches = range(0, source.num_documents, MEGATRON_DOCUMENTS_PER_READ)
    for first in tqdm(batches, desc="hashing documents", unit="batch", disable=not progress):
        end = min(first + MEGATRON_DOCUMENTS_PER_READ, source.num_documents)
        tokens = source.tokens(int(offsets[first]), int(offsets[end]))
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = tokens.min() if tokens.min() < 0 else tokens.max()
            raise DataError(f"{source.label}: holds token id {bad}, outside the vocabulary [0, {vocab_size}) of "
                            "data.tokenizer: it was made with another tokenizer")
        counts += np.bincount(tokens.astype(np.int64), minlength=vocab_size)
        raw = memoryview(tokens.tobytes())
        starts = ((offsets[first:end + 1] - offsets[first]) * tokens.dtype.itemsize).tolist()
        keys = np.frombuffer(b"".join(digest(raw[a:b]) for a, b in zip(starts[:-1], starts[1:])),
                             dtype="<u8").reshape(-1, 2)
        rows = np.column_stack([keys, np.arange(first, end, dtype=np.uint64)])
        candidates.append(rows[rows[:, 0] < threshold])
        lowest.append(rows[np.lexsort((rows[:, 1], rows[:, 0]))[0]])
    candidates = np.concatenate(candidates) if candidates else np.zeros((0, 3), dtype=np.uint64)
    val_order = candidates[np.lexsort((candidates[:, 1], candidates[:, 0])), 2].astype(np.int64)
    keep = _val_kept(np.diff(offsets)[val_order], max_val_tokens, source.num_documents - len(val_order))
    # no validation document: the one with the lowest hash becomes one
    lowest = np.array(lowest)
    kept = val_order[:keep] if keep else lowest[np.lexsort((lowest[:, 1], lowest[:, 0]))[:1], 2].astype(np.int64)
    in_val = np.zeros(source.num_documents, dtype=bool)
    in_val[kept] = True
    counts -= _counts(source, kept, vocab_size)
    val_runs = _ordered_runs(np.stack([np.zeros_like(kept), kept], axis=1), [offsets], 0)
    meta = _write_splits(folder, _runs(~in_val, offsets, 0), val_runs, counts)
    meta["token_files"] = [_file_entry(Path(prefix).resolve(), source.dtype, "megatron")]
    meta["bytes"] = None  # token ids only: the text is not known
    meta["duplicate_documents_removed"] = 0
    meta["val_documents_trained"] = len(val_order) - keep
    return meta


def _cross_shard_repeats(folder: Path, num_shards: int, progress: bool) -> dict:
    """Copies of a text in a later shard (step 1), the validation documents in hash order, and the training
    document with the lowest hash."""
    dropped, val_order, lowest_train, dropped_bytes = [], [], None, 0
    with tempfile.TemporaryDirectory(dir=folder, prefix=".buckets.tmp-") as tmp:
        outs = [open(Path(tmp, f"{b:03d}"), "wb") for b in range(BUCKETS)]
        try:
            for shard in tqdm(range(num_shards), desc="partitioning hashes", unit="shard", disable=not progress):
                hashes = np.load(bookkeeping_path(folder, shard, ".hashes.npy"))
                rows = np.zeros(len(hashes), dtype=BUCKET_DTYPE)
                for name in HASH_DTYPE.names:
                    rows[name] = hashes[name]
                rows["shard"] = shard
                bounds = np.searchsorted(hashes["hi"] >> np.uint64(56), np.arange(BUCKETS + 1, dtype=np.uint64))
                for bucket in np.flatnonzero(np.diff(bounds)).tolist():
                    rows[bounds[bucket]:bounds[bucket + 1]].tofile(outs[bucket])
        finally:
            for out in outs:
                out.close()
        for bucket in range(BUCKETS):
            rows = np.fromfile(Path(tmp, f"{bucket:03d}"), dtype=BUCKET_DTYPE)
            rows = rows[np.lexsort((rows["shard"], rows["lo"], rows["hi"]))]
            repeat = np.zeros(len(rows), dtype=bool)
            repeat[1:] = (rows["hi"][1:] == rows["hi"][:-1]) & (rows["lo"][1:] == rows["lo"][:-1])
            dropped.extend(zip(rows["shard"][repeat].tolist(), rows["document"][repeat].tolist()))
            dropped_bytes += int(rows["bytes"][repeat].sum())
            kept = rows[~repeat]
            val = kept[kept["document"] < 0]
            val_order.append(np.stack([val["shard"], -1 - val["document"]], axis=1))
            train = kept[kept["document"] >= 0]
            if lowest_train is None and len(train):
                lowest_train = (int(train["shard"][0]), int(train["document"][0]))
    return {"dropped": dropped, "dropped_bytes": dropped_bytes, "lowest_train": lowest_train,
            "val_order": np.concatenate(val_order).astype(np.int64)}


def _val_kept(lengths: np.ndarray, max_val_tokens: int, train_documents: int) -> int:
    """How many of the validation documents, in hash order, stay in validation (step 2)."""
    total = len(lengths) + train_documents
    if total < 2:
        raise ConfigError("data.sources", f"the corpus has {total} document(s); a train and a validation split need "
                                          "at least 2")
    keep = len(lengths)
    if max_val_tokens:
        keep = min(keep, max(1, int(np.searchsorted(np.cumsum(lengths), max_val_tokens, side="right"))))
    if keep == total:  # every document is validation: train on the highest-hash one
        keep -= 1
    return keep


def _runs(mask: np.ndarray, offsets: np.ndarray, file: int) -> np.ndarray:
    """Runs of the consecutive documents of `file` where `mask` holds."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return np.stack([np.full(len(starts), file), starts, ends, offsets[starts], offsets[ends]],
                    axis=1).astype(np.int64).reshape(-1, len(RUN_COLUMNS))


def _mask(size: int, documents: np.ndarray, keep: bool) -> np.ndarray:
    """A boolean mask of `size` documents: `keep` at `documents`, the opposite elsewhere."""
    mask = np.full(size, not keep)
    mask[documents] = keep
    return mask


def _ordered_runs(documents: np.ndarray, offsets: list[np.ndarray], first_file: int) -> np.ndarray:
    """Runs of (file, document) pairs in the given order, consecutive documents of a file joined."""
    if not len(documents):
        return np.zeros((0, len(RUN_COLUMNS)), dtype=np.int64)
    files, numbers = documents[:, 0], documents[:, 1]
    new_run = np.ones(len(documents), dtype=bool)
    new_run[1:] = (files[1:] != files[:-1]) | (numbers[1:] != numbers[:-1] + 1)
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], len(documents))
    first, last = numbers[starts], numbers[ends - 1] + 1
    token_starts = np.array([offsets[f][d] for f, d in zip(files[starts].tolist(), first.tolist())], dtype=np.int64)
    token_ends = np.array([offsets[f][d] for f, d in zip(files[starts].tolist(), last.tolist())], dtype=np.int64)
    return np.stack([files[starts] + first_file, first, last, token_starts, token_ends], axis=1).astype(np.int64)


def _counts(token_file: TokenFile | MegatronTokenFile, documents: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id in `documents` of `token_file`, with each document's EOS (as stored)."""
    if not len(documents):
        return np.zeros(vocab_size, dtype=np.int64)
    offsets = token_file.offsets
    tokens = np.concatenate([token_file.tokens(int(offsets[d]), int(offsets[d + 1])) for d in documents.tolist()])
    return np.bincount(tokens.astype(np.int64), minlength=vocab_size)


def _write_splits(folder: Path, train_runs: np.ndarray, val_runs: np.ndarray, counts: np.ndarray) -> dict:
    meta = {}
    for split, runs in (("train", train_runs), ("val", val_runs)):
        np.save(folder / f"{split}.runs.npy", runs)
        meta[split] = {"documents": int((runs[:, 2] - runs[:, 1]).sum()),
                       "tokens": int((runs[:, 4] - runs[:, 3]).sum())}
    assert counts.sum() == meta["train"]["tokens"] and counts.min() >= 0, "token counts disagree with the runs"
    np.save(folder / "train.counts.npy", counts)
    return meta


def _file_entry(prefix: Path, dtype: np.dtype, kind: str = "moe-lm") -> dict:
    """A `token_files` entry of meta.json: the prefix relative to the folder (absolute for a Megatron dataset)."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    return {"prefix": prefix.name if kind == "moe-lm" else str(prefix), "format": kind, "dtype": np.dtype(dtype).name,
            "bin_bytes": bin_path.stat().st_size, "idx_bytes": idx_path.stat().st_size}
