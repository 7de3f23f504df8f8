"""A split of a prepared folder: runs of documents of several token files, read as one token stream.

meta.json lists the folder's token files (`token_files`: prefix, relative to the folder or absolute, format
"moe-lm" or "megatron", dtype, size of the .bin), and a split is `SPLIT.runs.npy`, rows of (file, first document,
end document, first token, end token), int64. The split's stream is the runs' tokens in row order. Runs join the
shards, leave out cross-shard duplicates and validation documents, and split a Megatron dataset, without copying
a token.

A split's files are opened when first read and kept open up to `OPEN_FILES` at a time, so a corpus of thousands
of shards stays within the open-file limit; reading a window needs only the .bin (the runs hold the offsets).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_lm.data.indexed import TokenFile, TokenFileError
from moe_lm.data.megatron import MegatronTokenFile

RUN_COLUMNS = ("file", "first_document", "end_document", "first_token", "end_token")
OPEN_FILES = 128
FORMATS = ("moe-lm", "megatron")


@dataclass(frozen=True)
class StreamFile:
    """One token file of a prepared folder."""

    prefix: Path
    format: str
    dtype: np.dtype

    def open(self) -> TokenFile | MegatronTokenFile:
        """The file with its index (checked), for reading whole documents."""
        return TokenFile(self.prefix) if self.format == "moe-lm" else MegatronTokenFile(self.prefix)


class TokenStream:
    """The tokens of `runs` (an [R, 5] int64 array, see the module docstring) of `files`, back to back: the
    interface `PackedDataset` reads (`num_tokens`, `tokens`, `label`) plus `document(i)`."""

    def __init__(self, files: list[StreamFile], runs: np.ndarray, vocab_size: int, eos_id: int, label: str):
        self.files, self.vocab_size, self.eos_id, self.label = files, vocab_size, eos_id, label
        self.runs = np.asarray(runs, dtype=np.int64).reshape(-1, len(RUN_COLUMNS))
        self._token_ends = np.cumsum(self.runs[:, 4] - self.runs[:, 3])
        self._document_ends = np.cumsum(self.runs[:, 2] - self.runs[:, 1])
        self.dtype = files[0].dtype if files else np.dtype(np.uint16)
        self._bins: OrderedDict[int, np.ndarray] = OrderedDict()
        self._indexed: OrderedDict[int, TokenFile | MegatronTokenFile] = OrderedDict()

    @property
    def num_tokens(self) -> int:
        return int(self._token_ends[-1]) if len(self.runs) else 0

    @property
    def num_documents(self) -> int:
        return int(self._document_ends[-1]) if len(self.runs) else 0

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """The stream from `start` to `stop`: a view of one file's memmap when the range lies in one run, else a
        copy joining the runs it crosses."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}] in {self.label}")
        pieces, position = [], start
        run = int(np.searchsorted(self._token_ends, start, side="right"))
        while position < stop:
            file, _, _, first_token, end_token = self.runs[run].tolist()
            run_start = int(self._token_ends[run]) - (end_token - first_token)
            end = min(stop, int(self._token_ends[run]))
            pieces.append(self._bin(file)[first_token + position - run_start:first_token + end - run_start])
            position, run = end, run + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def document(self, i: int) -> np.ndarray:
        """Tokens of the stream's document `i`, as its file's `document` gives them."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents}) in {self.label}")
        run = int(np.searchsorted(self._document_ends, i, side="right"))
        file, first_document, end_document = self.runs[run, :3].tolist()
        within = i - (int(self._document_ends[run]) - (end_document - first_document))
        return _cached(self._indexed, file, self.files[file].open).document(first_document + within)

    def _bin(self, file: int) -> np.ndarray:
        def open_bin() -> np.ndarray:
            path, dtype = Path(f"{self.files[file].prefix}.bin"), self.files[file].dtype
            return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype=dtype)

        return _cached(self._bins, file, open_bin)


def stream_files(data_dir: Path, meta: dict) -> list[StreamFile]:
    """The token files that meta.json lists, each checked to be there at the size it had when prepared."""
    files = []
    for entry in meta["token_files"]:
        prefix = data_dir / entry["prefix"]  # an absolute prefix (a Megatron dataset) stays as it is
        bin_path = Path(f"{prefix}.bin")
        size = bin_path.stat().st_size if bin_path.is_file() else None
        if size != entry["bin_bytes"]:
            raise TokenFileError(f"{bin_path}: " + (f"{size} bytes, but {data_dir}/meta.json recorded "
                                                    f"{entry['bin_bytes']}: prepare the data again" if size is not None
                                                    else "no such token file (run prepare-data first)"))
        files.append(StreamFile(prefix, entry["format"], np.dtype(entry["dtype"])))
    return files


def open_split(data_dir: str | Path, split: str) -> TokenStream:
    """The `split` ("train" or "val") of a prepared folder as one token stream."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise TokenFileError(f"{meta_path}: no such file (run prepare-data first)")
    meta = json.loads(meta_path.read_text())
    if "token_files" not in meta:
        raise TokenFileError(f"{data_dir} was prepared by an older moe-lm (format {meta.get('format_version')}): "
                             "run prepare-data again")
    files = stream_files(data_dir, meta)
    runs = np.load(data_dir / f"{split}.runs.npy")
    if runs.ndim != 2 or runs.shape[1] != len(RUN_COLUMNS) or (len(runs) and (
            runs[:, 0].max() >= len(files) or np.any(runs[:, 3] > runs[:, 4]) or np.any(runs[:, 1] > runs[:, 2]))):
        raise TokenFileError(f"{data_dir / f'{split}.runs.npy'}: not a valid table of runs: prepare the data again")
    return TokenStream(files, runs, meta["vocab_size"], meta["eos_id"], str(data_dir / split))


def load_unigram_counts(data_dir: str | Path) -> np.ndarray:
    """How often each token id occurs in the training split (int64, one per id of the vocabulary), as counted when
    the folder was prepared."""
    return np.load(Path(data_dir) / "train.counts.npy")


def _cached(cache: OrderedDict, key: int, make):
    """`cache[key]`, made on a miss; the least recently used entry goes once there are `OPEN_FILES`."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    if len(cache) > OPEN_FILES:
        cache.popitem(last=False)
    return value
