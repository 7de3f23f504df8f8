"""Shards: the unit of work of `prepare_data`, each prepared once, by any of the jobs, and kept when a preparation
is interrupted.

Plan. The pieces of the corpus (`corpus.plan_pieces`, large files cut at `data.shard_bytes`) are grouped, in
reading order, into shards of about `data.shard_bytes` of text. The plan depends only on the source files (their
sizes), so every job computes the same one without talking to the others; job i of n prepares the shards j with
j % n == i. With `data.max_bytes` the corpus is read as one shard, so that the limit stays exact.

A shard is streamed, so memory follows the shard size, not the corpus size:
1. its documents are read in order, and exact repeats within the shard dropped (blake2b-128 of the UTF-8 text;
   the first stays); repeats across shards are dropped when the shards are indexed (`index.py`);
2. a document goes to validation when the first 8 bytes of its hash, as a little-endian number, fall below
   `val_fraction * 2**64`: the same text always lands in the same split, whichever shard or corpus holds it;
3. batches of about `CHUNK_BYTES` of text are tokenized in order by `data.num_proc` worker processes (`Tokenization`,
   one pool for all the shards of a job);
4. training documents go to `train-NNNNN.bin/.idx` as they come; validation documents are kept and written to
   `val-NNNNN.bin/.idx` at the end, sorted by hash;
5. `shards/NNNNN.hashes.npy` (hash, document and byte size of every document kept, sorted by hash) and
   `shards/NNNNN.counts.npy` (occurrences of every token id, EOS included: row 0 train, row 1 val) are written,
   and last `shards/NNNNN.json`, whose presence, with every file it lists at its size, marks the shard complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moe_lm.config.schema import DataConfig
from moe_lm.data.corpus import Piece, ReadReport, cut_utf8, plan_pieces, read_pieces
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import TokenWriter, temporary_path

CHUNK_BYTES = 1 << 20  # text per tokenization task: large enough to hide the inter-process cost
CHUNK_DOCUMENTS = 4096
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: keeps them busy without reading ahead of the writer
HASH_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("document", "<i8"), ("bytes", "<i8")])
"""A kept document: its hash (hi: the first 8 bytes), its number (train: >= 0; val: -1 - its number in val) and
its UTF-8 size."""
BOOKKEEPING = "shards"


def shard_name(number: int) -> str:
    return f"{number:05d}"


def token_prefix(split: str, number: int) -> str:
    return f"{split}-{shard_name(number)}"


def bookkeeping_path(folder: Path, number: int, suffix: str) -> Path:
    return folder / BOOKKEEPING / f"{shard_name(number)}{suffix}"


def plan_shards(cfg: DataConfig) -> list[tuple[Piece, ...]]:
    """The shards of `cfg.sources`: consecutive pieces of about `cfg.shard_bytes` of text together."""
    if cfg.max_bytes:
        return [tuple(plan_pieces(cfg))]
    shards: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    size = 0
    for piece in plan_pieces(cfg, cfg.shard_bytes):
        if current and size + piece.size > cfg.shard_bytes:
            shards.append(tuple(current))
            current, size = [], 0
        current.append(piece)
        size += piece.size
    if current:
        shards.append(tuple(current))
    return shards


def plan_digest(shards: list[tuple[Piece, ...]]) -> str:
    pieces = [[[p.source, p.kind, p.path, p.start, p.stop, p.size] for p in shard] for shard in shards]
    return hashlib.sha256(json.dumps(pieces).encode()).hexdigest()[:32]


def digest(raw: bytes) -> bytes:
    """The 16-byte document hash of UTF-8 text (or of token bytes): dedup key and split key."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def val_threshold(val_fraction: float) -> int:
    return int(val_fraction * 2**64)


def is_val(document_digest: bytes, threshold: int) -> bool:
    return int.from_bytes(document_digest[:8], "little") < threshold


def tokenizer_sample(cfg: DataConfig, shards: list[tuple[Piece, ...]]) -> Iterator[str]:
    """At most `cfg.tokenizer_sample_bytes` of training text: the leading training documents of every shard, an
    equal share from each (the last one of a share cut to fit), each text once."""
    share = max(1, cfg.tokenizer_sample_bytes // max(1, len(shards)))
    threshold, seen = val_threshold(cfg.val_fraction), set()
    for shard in shards:
        left = share
        for _, text in read_pieces(cfg, shard, ReadReport()):  # the shard's own reading reports the problems
            raw = text.encode()
            key = digest(raw)
            if is_val(key, threshold) or key in seen:
                continue
            seen.add(key)
            yield text if len(raw) <= left else cut_utf8(text, left)
            left -= min(len(raw), left)
            if not left:
                break


def shard_complete(folder: Path, number: int) -> bool:
    """Whether shard `number` was prepared in `folder`: its json is there, and every file it lists at its size."""
    try:
        record = json.loads(bookkeeping_path(folder, number, ".json").read_text())
        return all((folder / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_shard_record(folder: Path, number: int) -> dict:
    return json.loads(bookkeeping_path(folder, number, ".json").read_text())


def build_shard(cfg: DataConfig, number: int, pieces: Iterable[Piece], folder: Path, tokenization: Tokenization,
                vocab_size: int, eos_id: int, report: ReadReport, progress: bool = False) -> dict:
    """Prepare shard `number` of `pieces` in `folder` (steps in the module docstring) and return its record.
    `report` (this shard's own) receives what reading replaced or skipped; its counts go into the record."""
    started = time.perf_counter()
    pieces = tuple(pieces)
    threshold = val_threshold(cfg.val_fraction)
    seen: set[bytes] = set()
    stats = {"duplicates": 0, "bytes": 0}
    counts = np.zeros((2, vocab_size), dtype=np.int64)
    train_hashes: list[bytes] = []
    train_bytes: list[int] = []
    val_documents: list[tuple[bytes, int, np.ndarray]] = []

    def documents() -> Iterator[tuple[bytes, int, str]]:
        for _, text in read_pieces(cfg, pieces, report, progress=progress):
            raw = text.encode()
            key = digest(raw)
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            stats["bytes"] += len(raw)
            yield key, len(raw), text

    (folder / BOOKKEEPING).mkdir(exist_ok=True)
    with TokenWriter(folder / token_prefix("train", number), vocab_size, eos_id) as train:
        for chunk, ids, lengths in tokenization.encode(_chunks(documents())):
            val_mask = np.array([is_val(key, threshold) for key, _, _ in chunk], dtype=bool)
            token_mask = np.repeat(val_mask, lengths)
            for row, (split_ids, docs) in enumerate([(ids[~token_mask], ~val_mask), (ids[token_mask], val_mask)]):
                counts[row] += np.bincount(split_ids, minlength=vocab_size)[:vocab_size]
                counts[row, eos_id] += int(docs.sum())
            train.add(ids[~token_mask], lengths[~val_mask])
            ends = np.cumsum(lengths)
            for (key, size, _), is_val_document, end, length in zip(chunk, val_mask, ends, lengths):
                if is_val_document:
                    val_documents.append((key, size, ids[end - length:end].astype(np.uint32)))  # a copy
                else:
                    train_hashes.append(key)
                    train_bytes.append(size)
    val_documents.sort(key=lambda document: hash_key(document[0]))
    with TokenWriter(folder / token_prefix("val", number), vocab_size, eos_id) as val:
        if val_documents:
            val.add(np.concatenate([tokens for _, _, tokens in val_documents]),
                    np.array([len(tokens) for _, _, tokens in val_documents]))
    hashes = _hash_records(train_hashes, train_bytes, [(key, size) for key, size, _ in val_documents])
    _save_array(bookkeeping_path(folder, number, ".hashes.npy"), hashes)
    _save_array(bookkeeping_path(folder, number, ".counts.npy"), counts)
    files = [f"{token_prefix(split, number)}{suffix}" for split in ("train", "val") for suffix in (".bin", ".idx")]
    files += [f"{BOOKKEEPING}/{shard_name(number)}{suffix}" for suffix in (".hashes.npy", ".counts.npy")]
    record = {"shard": number, "pieces": len(pieces),
              "documents": {"train": len(train_hashes), "val": len(val_documents)},
              "tokens": {"train": int(counts[0].sum()), "val": int(counts[1].sum())},
              "bytes": stats["bytes"], "duplicates": stats["duplicates"], "report": report.counts(),
              "seconds": round(time.perf_counter() - started, 2),
              "files": {name: (folder / name).stat().st_size for name in files}}
    path = bookkeeping_path(folder, number, ".json")
    tmp = temporary_path(path)
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


class Tokenization:
    """Encodes chunks of documents in order, in this process or in worker processes that live as long as the
    `with` block (one job's shards). With `num_proc` 1 the texts are encoded here, where the Rust tokenizer spreads
    a batch over every core; else by `num_proc` forked worker processes on one thread each (0: every core)."""

    def __init__(self, tokenizer_file: Path, num_proc: int):
        self.tokenizer_file = tokenizer_file
        self.num_proc = num_proc or len(os.sched_getaffinity(0))

    def __enter__(self) -> Tokenization:
        self._stack = contextlib.ExitStack()
        if self.num_proc == 1:
            self._tokenizer, self._pool = _load_tokenizer(self.tokenizer_file), None
        else:
            self._pool = self._stack.enter_context(_worker_pool(self.num_proc, self.tokenizer_file))
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def encode(self, chunks: Iterable[list[tuple[bytes, int, str]]]) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        """(chunk, ids, lengths) for each chunk of (hash, bytes, text) documents, in order: the token ids of its
        texts back to back (int64) and each text's number of tokens."""
        if self._pool is None:
            for chunk in chunks:
                yield (chunk, *_encode(self._tokenizer, [text for _, _, text in chunk]))
            return
        window: deque = deque()
        try:
            for chunk in chunks:
                window.append((chunk, self._pool.submit(_encode_in_worker, [text for _, _, text in chunk])))
                if len(window) >= IN_FLIGHT_PER_WORKER * self.num_proc:
                    chunk, future = window.popleft()
                    yield (chunk, *future.result())
            while window:
                chunk, future = window.popleft()
                yield (chunk, *future.result())
        except BrokenProcessPool as exc:
            raise DataError(f"a tokenizer worker process died ({exc}): if memory ran out, lower data.num_proc "
                            f"(now {self.num_proc})") from exc
        finally:
            for _, future in window:  # left by an error: their results are not wanted
                future.cancel()


def _chunks(documents: Iterator[tuple[bytes, int, str]]) -> Iterator[list[tuple[bytes, int, str]]]:
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += document[1]
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCUMENTS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _load_tokenizer(tokenizer_file: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_truncation()  # a saved truncation or padding setting would change the documents
    tokenizer.no_padding()
    return tokenizer


def _encode(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: tokenizers>=0.21
    encodings = encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(encoding.ids) for encoding in encodings], dtype=np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(encoding.ids for encoding in encodings), dtype=np.int64,
                      count=int(lengths.sum()))
    return ids, lengths


_WORKER_TOKENIZER: Tokenizer | None = None


def _start_worker(tokenizer_file: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load_tokenizer(Path(tokenizer_file))


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_WORKER_TOKENIZER, texts)


@contextlib.contextmanager
def _worker_pool(num_proc: int, tokenizer_file: Path) -> Iterator[ProcessPoolExecutor]:
    """Forked worker processes (nothing to re-import), each holding the tokenizer. They are forked with
    TOKENIZERS_PARALLELISM=false, so each encodes on one thread: the Rust thread pool of this process does not
    survive a fork, and the tokenizers library would otherwise warn and switch it off itself."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ProcessPoolExecutor(num_proc, mp_context=get_context("fork"), initializer=_start_worker,
                                   initargs=(str(tokenizer_file),))
        pool.submit(int).result()  # forks every worker now, under the setting above
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def hash_key(document_digest: bytes) -> tuple[int, int]:
    """The order of documents by hash: (first 8 bytes, last 8 bytes) as little-endian numbers."""
    return int.from_bytes(document_digest[:8], "little"), int.from_bytes(document_digest[8:], "little")


def _hash_records(train: list[bytes], train_bytes: list[int], val: list[tuple[bytes, int]]) -> np.ndarray:
    """The HASH_DTYPE records of a shard's documents, sorted by hash."""
    records = np.zeros(len(train) + len(val), dtype=HASH_DTYPE)
    digests = np.frombuffer(b"".join(train + [key for key, _ in val]), dtype="<u8").reshape(-1, 2)
    if len(records):
        records["hi"], records["lo"] = digests[:, 0], digests[:, 1]
    records["document"] = np.concatenate([np.arange(len(train)), -1 - np.arange(len(val))]).astype(np.int64)
    records["bytes"] = np.array(train_bytes + [size for _, size in val], dtype=np.int64)
    return records[np.lexsort((records["lo"], records["hi"]))]


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = temporary_path(path)
    with open(tmp, "wb") as out:
        np.save(out, array)
    os.replace(tmp, path)


def shard_progress(total: int, done: int, progress: bool) -> tqdm:
    return tqdm(total=total, initial=done, desc="shards", unit="shard", disable=not progress)
