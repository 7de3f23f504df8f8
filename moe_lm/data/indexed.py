"""Megatron-style token files: a flat memory-mapped `.bin` of token ids and a small `.idx` of document offsets.

`PREFIX.bin` holds every document's tokens followed by EOS, back to back (uint16 when the vocabulary fits,
else uint32), so any window of the corpus is one slice of a memmap: no per-sample files, no loading into RAM,
and every data-parallel rank can open the same file. `PREFIX.idx` is a fixed header (magic, version, dtype
code, vocab size, EOS id, document count) followed by `num_documents + 1` uint64 token offsets.
Both are written to temporary files and moved into place, and every inconsistency between them is reported
with the file's name, so a half-written or foreign file is never read silently.

`PackedDataset` is the training view: fixed-length windows over the concatenated stream, each with its
next-token targets, crossing document boundaries (the EOS tokens mark them).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from moe_lm.data.errors import DataError

MAGIC = b"MOELMTOK"
VERSION = 1
HEADER = struct.Struct("<8s5Q")  # magic, version, dtype code, vocab size, eos id, document count
DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
WRITE_CHUNK_TOKENS = 1 << 20
TMP_MARK = ".tmp-"  # in the name of a file being written


class TokenFileError(DataError):
    """A token file is missing, corrupt, or does not match its index."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of the vocabulary."""
    return DTYPES[1] if vocab_size <= np.iinfo(np.uint16).max + 1 else DTYPES[2]


def write_tokens(path_prefix: str | Path, documents: Iterable[list[int] | np.ndarray], vocab_size: int,
                 eos_id: int) -> TokenFile:
    """Write documents (each followed by `eos_id`) to `PREFIX.bin` and their offsets to `PREFIX.idx`."""
    with TokenWriter(path_prefix, vocab_size, eos_id) as writer:
        pending: list[np.ndarray] = []
        pending_tokens = 0
        for document in documents:
            pending.append(np.asarray(document, dtype=np.int64).reshape(-1))
            pending_tokens += pending[-1].size + 1
            if pending_tokens >= WRITE_CHUNK_TOKENS:
                writer.add(np.concatenate(pending), np.array([len(d) for d in pending]))
                pending, pending_tokens = [], 0
        if pending:
            writer.add(np.concatenate(pending), np.array([len(d) for d in pending]))
    return TokenFile(path_prefix)


class TokenWriter:
    """Writes `PREFIX.bin` / `PREFIX.idx` a batch of documents at a time, into temporary files that are moved into
    place when the `with` block ends without an error (and deleted when it ends with one)."""

    def __init__(self, path_prefix: str | Path, vocab_size: int, eos_id: int):
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.eos_id, self.dtype = vocab_size, eos_id, token_dtype(vocab_size)
        self.bin_path, self.idx_path = _paths(path_prefix)
        self.num_documents = self.num_tokens = 0
        self._ends: list[np.ndarray] = []  # token offset of the end of each document written

    def __enter__(self) -> TokenWriter:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin, self._tmp_idx = temporary_path(self.bin_path), temporary_path(self.idx_path)
        self._out = open(self._tmp_bin, "wb")
        return self

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given back to back in `ids`, `lengths[i]` tokens each; each one is written followed by EOS."""
        ends = np.cumsum(lengths, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(np.flatnonzero((ids < 0) | (ids >= self.vocab_size))[0])
            number = self.num_documents + int(np.searchsorted(ends, bad, side="right"))
            raise ValueError(f"document {number} holds token ids outside [0, {self.vocab_size}) (id {ids[bad]}) "
                             f"while writing {self.bin_path}")
        self._out.write(np.insert(ids.astype(self.dtype), ends, self.eos_id).tobytes())
        self._ends.append(self.num_tokens + ends + np.arange(1, len(ends) + 1))
        self.num_documents += len(ends)
        self.num_tokens += int(ids.size) + len(ends)

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._out.close()
        try:
            if exc_type is None:
                with open(self._tmp_idx, "wb") as out:
                    out.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], self.vocab_size, self.eos_id,
                                          self.num_documents))
                    out.write(np.zeros(1, dtype=np.uint64).tobytes())
                    for ends in self._ends:
                        out.write(ends.astype(np.uint64).tobytes())
                os.replace(self._tmp_bin, self.bin_path)
                os.replace(self._tmp_idx, self.idx_path)
        finally:
            self._tmp_bin.unlink(missing_ok=True)
            self._tmp_idx.unlink(missing_ok=True)


def temporary_path(path: Path) -> Path:
    """Where to write `path` before moving it into place: unique to this process on this machine (several machines
    may prepare shards in one shared folder)."""
    return path.with_name(f"{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


class DocumentTokens:
    """A memory-mapped token stream `_tokens` cut into documents at `offsets` (D + 1 token offsets), read from
    `bin_path`: what `PackedDataset` and the data pipeline read, whatever format the files have."""

    bin_path: Path
    offsets: np.ndarray
    _tokens: np.ndarray

    @property
    def label(self) -> str:
        return str(self.bin_path)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def _document_span(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents}) in {self.bin_path}")
        return self._tokens[self.offsets[i]:self.offsets[i + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """The token stream (document separators included) from `start` to `stop`, a view of the memmap."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}] in {self.bin_path}")
        return self._tokens[start:stop]


class TokenFile(DocumentTokens):
    """Read-only memory-mapped view of `PREFIX.bin` / `PREFIX.idx`."""

    def __init__(self, path_prefix: str | Path):
        self.bin_path, self.idx_path = _paths(path_prefix)
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                split = Path(str(path_prefix))
                if (split.parent / f"{split.name}.runs.npy").is_file():  # a caller of the one-file layout
                    raise TokenFileError(f"{path}: no such token file: {split.parent} holds sharded splits; read "
                                         f"them with moe_lm.data.open_split({str(split.parent)!r}, {split.name!r})")
                raise TokenFileError(f"{path}: no such token file (run prepare-data first)")
        raw = self.idx_path.read_bytes()
        if len(raw) < HEADER.size:
            raise TokenFileError(f"{self.idx_path}: truncated index ({len(raw)} bytes, header is {HEADER.size})")
        magic, version, code, self.vocab_size, self.eos_id, num_documents = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise TokenFileError(f"{self.idx_path}: not a moe-lm token index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise TokenFileError(f"{self.idx_path}: format version {version}, this moe-lm reads {VERSION}")
        if code not in DTYPES:
            raise TokenFileError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = DTYPES[code]
        expected_size = HEADER.size + 8 * (num_documents + 1)
        if len(raw) != expected_size:
            raise TokenFileError(f"{self.idx_path}: {len(raw)} bytes, but a header for {num_documents} documents "
                                 f"needs {expected_size}")
        self.offsets = np.frombuffer(raw, dtype=np.uint64, offset=HEADER.size).astype(np.int64)
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 1):
            raise TokenFileError(f"{self.idx_path}: document offsets are not strictly increasing from 0")
        bin_size = self.bin_path.stat().st_size
        if bin_size != int(self.offsets[-1]) * self.dtype.itemsize:
            raise TokenFileError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} describes "
                                 f"{self.offsets[-1]} {self.dtype.name} tokens; the pair does not match "
                                 "(rewritten separately or partly written): prepare the data again")
        self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size
                        else np.empty(0, dtype=self.dtype))

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i`, without its trailing EOS."""
        return self._document_span(i)[:-1]


class PackedDataset(torch.utils.data.Dataset):
    """Sample i = tokens[i*seq_len : (i+1)*seq_len + 1], split into (input_ids, targets) of `seq_len` each.

    `token_file` is a `TokenFile` or any token stream with `num_tokens`, `tokens(start, stop)` and `label` (a split of
    a prepared folder: `stream.TokenStream`)."""

    def __init__(self, token_file: TokenFile, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.token_file = token_file
        self.seq_len = seq_len
        if len(self) == 0:
            raise ValueError(f"{token_file.label} holds {token_file.num_tokens} tokens: a sequence of "
                             f"{seq_len} needs at least {seq_len + 1}")

    def __len__(self) -> int:
        return (self.token_file.num_tokens - 1) // self.seq_len

    def window(self, i: int) -> np.ndarray:
        """The `seq_len + 1` tokens of sample `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return self.token_file.tokens(i * self.seq_len, (i + 1) * self.seq_len + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self.window(i).astype(np.int64))
        return window[:-1], window[1:]


def _paths(path_prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(path_prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")
