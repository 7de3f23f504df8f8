"""Read a Megatron-LM / Megatron-DeepSpeed indexed dataset (`MMapIndexedDataset`) as it is, without re-tokenising.

Layout of PREFIX.idx, little-endian (`_IndexWriter` in Megatron-LM's megatron/core/datasets/indexed_dataset.py):

    9 bytes        magic b"MMIDIDX\\x00\\x00"
    <Q             version: 1
    <B             dtype code of the tokens: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
                   8 uint16 (Megatron writes uint16 below 65,500 token ids, else int32)
    <Q             sequence count S
    <Q             document index count D + 1
    S x int32      sequence lengths, in tokens
    S x int64      sequence pointers: byte offsets into PREFIX.bin
    (D+1) x int64  document indices: document d is sequences [doc_idx[d], doc_idx[d+1]), doc_idx[0] = 0

PREFIX.bin holds the sequences back to back. A document is one sequence, unless the data was preprocessed with
`--split-sentences` (one sequence per sentence). Documents end with the end-of-document token only if
preprocessing appended it (`--append-eod`); moe-lm trains on the stream as it is, like Megatron's GPTDataset.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from moe_lm.data.indexed import DocumentTokens, TokenFileError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document index count
DTYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
          5: np.dtype(np.int64), 8: np.dtype(np.uint16)}
FLOAT_CODES = {6: "float64", 7: "float32"}  # valid in the format, but not token ids


class MegatronTokenFile(DocumentTokens):
    """Read-only memory-mapped view of a Megatron dataset PREFIX.bin / PREFIX.idx, with `TokenFile`'s interface:
    `offsets` are the token offsets of the documents (D + 1 of them)."""

    def __init__(self, path_prefix: str | Path):
        self.bin_path, self.idx_path = Path(f"{path_prefix}.bin"), Path(f"{path_prefix}.idx")
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise TokenFileError(f"{path}: no such file (a Megatron dataset is PATH_PREFIX.bin and .idx)")
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r") if self.idx_path.stat().st_size else b""
        if len(index) < HEADER.size:
            raise TokenFileError(f"{self.idx_path}: truncated index ({len(index)} bytes, header is {HEADER.size})")
        magic, version, code, num_sequences, num_doc_indices = HEADER.unpack_from(bytes(index[:HEADER.size]))
        if magic != MAGIC:
            raise TokenFileError(f"{self.idx_path}: not a Megatron MMapIndexedDataset index (magic {magic!r}, "
                                 f"expected {MAGIC!r})")
        if version != VERSION:
            raise TokenFileError(f"{self.idx_path}: version {version}, moe-lm reads version {VERSION}")
        if code in FLOAT_CODES:
            raise TokenFileError(f"{self.idx_path}: holds {FLOAT_CODES[code]} values, not token ids")
        if code not in DTYPES:
            raise TokenFileError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = DTYPES[code]
        expected = HEADER.size + 12 * num_sequences + 8 * num_doc_indices
        if len(index) != expected or num_doc_indices < 1:
            raise TokenFileError(f"{self.idx_path}: {len(index)} bytes, but a header for {num_sequences} sequences "
                                 f"and {num_doc_indices} document indices needs {expected}")
        lengths = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=HEADER.size)
        pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=HEADER.size + 4 * num_sequences)
        doc_index = np.frombuffer(index, dtype=np.int64, count=num_doc_indices, offset=HEADER.size + 12 * num_sequences)
        sequence_starts = np.zeros(num_sequences + 1, dtype=np.int64)
        np.cumsum(lengths, out=sequence_starts[1:])
        if np.any(lengths < 0) or not np.array_equal(pointers, sequence_starts[:-1] * self.dtype.itemsize):
            raise TokenFileError(f"{self.idx_path}: the sequences are not stored back to back in {self.bin_path} "
                                 "(pointers do not follow the lengths)")
        if doc_index[0] != 0 or doc_index[-1] != num_sequences or np.any(np.diff(doc_index) < 0):
            raise TokenFileError(f"{self.idx_path}: document indices do not run from 0 to the {num_sequences} "
                                 "sequences in order")
        self.offsets = sequence_starts[doc_index]
        bin_size = self.bin_path.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise TokenFileError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} describes "
                                 f"{self.num_tokens} {self.dtype.name} tokens: the pair does not match")
        self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if bin_size
                        else np.empty(0, dtype=self.dtype))

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i`, as stored (with its end-of-document token, if preprocessing appended one)."""
        return self._document_span(i)
