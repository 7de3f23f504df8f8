"""Read the documents of `data.sources` one at a time, in a deterministic order.

Sources are checked before anything is read, so a typo fails at once with the key `data.sources`:
- "stdlib": the running interpreter's standard-library *.py files, test suite included (a corpus that
  every machine has, so the quickstart needs no download);
- a .py/.txt file: one document per file (code files are documents; empty files are skipped);
- a .jsonl/.parquet file: one document per non-empty row, text from `data.text_key`;
- a folder: its .py/.txt files, then its .jsonl files, then its .parquet files, each group walked recursively
  in sorted path order (hidden folders, __pycache__ and site-packages skipped; other file types ignored);
- "hf:NAME[:CONFIG]": the train split of a hub dataset (streamed when `max_bytes` is set; from the local cache
  only when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set). An unreachable hub fails in seconds, not after retries;
- "megatron:PATH_PREFIX": token ids, not text (`megatron.py` reads them; `prepare.py` takes them as they are).
`max_bytes` caps the UTF-8 size of the corpus: reading stops once it is reached, and the document that
crosses it is cut at a character boundary, so the corpus never exceeds it.

Reading streams. `plan_pieces` cuts the sources into pieces without reading any text: a text file, a byte range
of a large .jsonl file (the lines that start in it), a run of row groups of a .parquet file, a run of rows of a
hub dataset. `read_pieces` yields their documents one by one, so memory does not grow with the corpus;
`load_corpus` collects them into a `datasets.Dataset`, for small corpora.

Nothing odd is trained on unnoticed. Text is decoded strictly (UTF-8; a .py file's PEP 263 coding cookie wins),
and a document with undecodable bytes is handled as `data.decode_errors` says: replace them with U+FFFD, skip
the document, or stop with an error naming the file. Files holding NUL bytes are binary (or UTF-16) and skipped.
Both are counted in a `ReadReport` and summed up in one warning. A malformed .jsonl line or a text field that is
not a string raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError
from tqdm.auto import tqdm

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.errors import DataError

TEXT_SUFFIXES = (".py", ".txt")
TABLE_SUFFIXES = (".jsonl", ".parquet")
SKIPPED_FOLDERS = {"__pycache__", "site-packages", "dist-packages"}
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
HUB_TIMEOUT_S = 10
EXAMPLES_SHOWN = 3  # file names a warning lists before "and N more"
ROWS_PER_BATCH = 1000  # table rows converted to Python strings at a time
MEGATRON_PREFIX = "megatron:"


@dataclass(frozen=True)
class TextFiles:
    """Plain-text files, one document each."""

    paths: tuple[Path, ...]


@dataclass(frozen=True)
class TableFiles:
    """.jsonl or .parquet files, one document per row."""

    paths: tuple[Path, ...]


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None

    @property
    def label(self) -> str:
        return f"hf:{self.name}" + (f":{self.config}" if self.config else "")


@dataclass(frozen=True)
class MegatronFiles:
    """A Megatron-LM indexed dataset: PREFIX.bin (token ids) and PREFIX.idx."""

    prefix: Path

    @property
    def paths(self) -> tuple[Path, ...]:
        return Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")


Part = TextFiles | TableFiles | HubDataset | MegatronFiles


@dataclass(frozen=True)
class Piece:
    """A run of documents of one source, read as a unit."""

    source: int
    """Position of its source in `data.sources`."""
    kind: str
    """text (one file, one document), jsonl, parquet or hub."""
    path: str
    """The file, or the hub dataset's label hf:NAME[:CONFIG]."""
    start: int = 0
    """First byte (jsonl: the lines starting at or after it), row group (parquet) or row (hub)."""
    stop: int = -1
    """End of the range, excluded (-1: to the end)."""
    size: int = 0
    """Its text in bytes, about: the size on disk, uncompressed for parquet."""


@dataclass
class ReadReport:
    """What reading changed or left out; `prepare_data` copies `counts()` into meta.json."""

    undecodable: list[str] = field(default_factory=list)
    """Documents (a file, or a .jsonl file:line) holding bytes that are not valid in their encoding."""
    replaced_characters: int = 0
    """U+FFFD characters put in for those bytes (data.decode_errors=replace)."""
    binary_files: list[str] = field(default_factory=list)
    """Files skipped for holding NUL bytes."""

    def counts(self) -> dict[str, int]:
        return {"undecodable_documents": len(self.undecodable), "replaced_characters": self.replaced_characters,
                "binary_files_skipped": len(self.binary_files)}

    def warn(self, decode_errors: str) -> None:
        if self.undecodable:
            outcome = (f"{self.replaced_characters} undecodable bytes replaced with U+FFFD (data.decode_errors="
                       "replace; skip drops such documents, error stops at the first)" if decode_errors == "replace"
                       else "skipped (data.decode_errors=skip)")
            warnings.warn(f"{len(self.undecodable)} document(s) are not valid UTF-8 ({_examples(self.undecodable)}): "
                          f"{outcome}", stacklevel=3)
        if self.binary_files:
            warnings.warn(f"skipped {len(self.binary_files)} binary file(s) holding NUL bytes (binary or UTF-16): "
                          f"{_examples(self.binary_files)}", stacklevel=3)


def stdlib_files() -> list[Path]:
    """The *.py files of the running interpreter's standard library, test suite included, sorted."""
    return _walk(Path(sysconfig.get_paths()["stdlib"]), (".py",))


def resolve_sources(sources: Iterable[str]) -> list[Part]:
    """Check every source and list what it will read, without reading any text yet."""
    parts: list[Part] = []
    for source in sources:
        parts.extend(_resolve(source))
    return parts


def megatron_sources(sources: Iterable[str]) -> list[MegatronFiles]:
    """The Megatron datasets among `sources` (checked: they must be the only source)."""
    sources = list(sources)
    found = [part for source in sources if source.startswith(MEGATRON_PREFIX) for part in _resolve(source)]
    if found and len(sources) > 1:
        raise ConfigError("data.sources", f"a {MEGATRON_PREFIX} source holds token ids and must be the only source "
                                          f"(got {sources}): prepare each corpus on its own and list the folders in "
                                          "data.blend")
    return found


def plan_pieces(cfg: DataConfig, piece_bytes: int = 0) -> list[Piece]:
    """The pieces of `cfg.sources`, in reading order. With `piece_bytes`, .jsonl and .parquet files and hub datasets
    larger than that are cut into pieces of about that size (hub datasets are loaded to measure them)."""
    parts = [(number, part) for number, source in enumerate(cfg.sources) for part in _resolve(source)]
    for _, part in parts:
        if isinstance(part, MegatronFiles):
            raise ConfigError("data.sources", f"{MEGATRON_PREFIX}{part.prefix} holds token ids, not text")
        if isinstance(part, HubDataset):
            _check_hub(part)  # before reading anything else: a network failure should cost seconds
    pieces: list[Piece] = []
    for number, part in parts:
        if isinstance(part, TextFiles):
            pieces.extend(Piece(number, "text", str(path), size=_file_size(path)) for path in part.paths)
        elif isinstance(part, TableFiles):
            for path in part.paths:
                cut = _parquet_pieces if path.suffix == ".parquet" else _jsonl_pieces
                pieces.extend(cut(number, path, piece_bytes))
        else:
            pieces.extend(_hub_pieces(number, part, cfg.text_key, piece_bytes))
    return pieces


def read_pieces(cfg: DataConfig, pieces: Iterable[Piece], report: ReadReport,
                progress: bool = False) -> Iterator[tuple[int, str]]:
    """(source number, text) of every non-empty document of `pieces`, in order, under `cfg.max_bytes`.
    What was replaced or skipped is added to `report` (the caller warns)."""
    reader = _SourceReader(cfg, report)
    pieces = list(pieces)
    with tqdm(total=sum(p.size for p in pieces), desc="reading", unit="B", unit_scale=True, leave=False,
              disable=not progress) as bar:
        for piece in pieces:
            if reader.budget.spent:
                return
            for text in reader.budget.cap(reader.texts(piece)):
                yield piece.source, text
            bar.update(piece.size)


def load_corpus(cfg: DataConfig, progress: bool = False, report: ReadReport | None = None) -> datasets.Dataset:
    """All documents of `cfg.sources` in order, as a Dataset with one `text` column (held in memory: for small
    corpora). What was replaced or skipped is added to `report` and warned about."""
    report = report if report is not None else ReadReport()
    texts = [text for _, text in read_pieces(cfg, plan_pieces(cfg), report, progress)]
    report.warn(cfg.decode_errors)
    return _text_dataset(texts)


class ByteBudget:
    """What is left of `data.max_bytes` (None: no limit). Reaching the limit, even inside a document, ends
    the reading: that document is cut at a character boundary and nothing after it is read."""

    def __init__(self, max_bytes: int):
        self.left = max_bytes or None

    @property
    def spent(self) -> bool:
        return self.left == 0

    def cap(self, texts: Iterable[str]) -> Iterator[str]:
        """Yield texts while the budget lasts, the one that reaches it cut to fit."""
        if self.spent:
            return
        for text in texts:
            if self.left is None:
                yield text
                continue
            size = len(text.encode())
            if size >= self.left:
                cut, self.left = cut_utf8(text, self.left), 0
                yield cut
                return
            self.left -= size
            yield text


class _SourceReader:
    """Reads pieces as texts under one byte budget and one `data.decode_errors` policy."""

    def __init__(self, cfg: DataConfig, report: ReadReport):
        self.text_key = cfg.text_key
        self.decode_errors = cfg.decode_errors
        self.budget = ByteBudget(cfg.max_bytes)
        self.report = report
        self._hub_table: tuple[str, datasets.Dataset] | None = None  # the last hub dataset loaded

    def texts(self, piece: Piece) -> Iterator[str]:
        """The non-empty documents of a piece."""
        if piece.kind == "text":
            text = self._file_text(Path(piece.path))
            if text:
                yield text
        elif piece.kind == "jsonl":
            yield from self._jsonl_texts(Path(piece.path), piece.start, piece.stop)
        elif piece.kind == "parquet":
            yield from self._parquet_texts(Path(piece.path), piece.start, piece.stop)
        else:
            yield from self._hub_texts(piece)

    def _file_text(self, path: Path) -> str | None:
        """A file's text (None: skipped); .py files honour their PEP 263 coding cookie."""
        raw = path.read_bytes()
        if b"\0" in raw:
            self.report.binary_files.append(str(path))
            return None
        encoding = "utf-8"
        if path.suffix == ".py":
            try:
                encoding, _ = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)
            except SyntaxError:  # an invalid coding cookie: fall back to UTF-8
                pass
        return self._decode(raw, encoding, lambda: str(path))

    def _jsonl_texts(self, path: Path, start: int, stop: int) -> Iterator[str]:
        """The non-empty `text_key` values of the lines of a .jsonl file that start in [start, stop)."""
        key_seen, first_keys = False, None
        line_number = _LineNumbers(path)
        for offset, line in _jsonl_lines(path, start, stop):
            def where(offset=offset) -> str:
                return f"{path}:{line_number(offset)}"

            decoded = self._decode(line.rstrip(b"\r\n"), "utf-8", where)
            if decoded is None or not decoded.strip():
                continue
            try:
                row = json.loads(decoded)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where()}: not valid JSON at column {exc.colno}: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where()}: expected one JSON object per line, got {type(row).__name__}")
            first_keys = first_keys if first_keys is not None else sorted(row)
            key_seen = key_seen or self.text_key in row
            text = _text_field(row, self.text_key, where)
            if text and not _encodable(text):  # a lone surrogate escape such as "\ud800"
                text = self._decode(text.encode("utf-8", "surrogatepass"), "utf-8", where)
            if text:
                yield text
        if first_keys is not None and not key_seen:
            raise ConfigError("data.text_key", f"{path} has no field {self.text_key!r} in any row; "
                                               f"its rows have {first_keys}")

    def _parquet_texts(self, path: Path, start: int, stop: int) -> Iterator[str]:
        """The non-empty `text_key` values of row groups [start, stop) of a .parquet file."""
        try:
            table = pq.ParquetFile(path)
            column_type = _parquet_text_type(table, path, self.text_key)
            groups = list(range(table.num_row_groups))[start:None if stop < 0 else stop]
            if not _is_string(column_type):
                values = table.read(columns=[self.text_key]).column(0).to_pylist()
                row = next((i for i, value in enumerate(values) if value is not None), 0)
                raise DataError(f"{path}: column {self.text_key!r} (data.text_key) holds {column_type}, not strings "
                                f"(row {row}: {_shorten(repr(values[row] if values else None))})")
            batches = table.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=groups, columns=[self.text_key])
            for batch in batches if groups else ():
                yield from (text for text in batch.column(0).to_pylist() if text)
        except pa.ArrowException as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from exc

    def _hub_texts(self, piece: Piece) -> Iterator[str]:
        part = _hub_part(piece.path)
        # offline, the cache is read whole: a stream always needs the network
        if self.budget.left is None or datasets.config.HF_HUB_OFFLINE:
            if self._hub_table is None or self._hub_table[0] != piece.path:
                self._hub_table = piece.path, _hub_text_table(part, self.text_key)
            table = self._hub_table[1]
            stop = len(table) if piece.stop < 0 else piece.stop
            for begin in range(piece.start, stop, ROWS_PER_BATCH):
                rows = table.with_format("arrow")[begin:min(begin + ROWS_PER_BATCH, stop)][self.text_key]
                yield from (text for text in rows.to_pylist() if text)
            return
        stream = _load_hub(part, streaming=True)
        if self.text_key not in (stream.column_names or [self.text_key]):
            raise ConfigError("data.text_key", f"{part.label} has no column {self.text_key!r}; "
                                               f"it has {stream.column_names}")
        for number, row in enumerate(stream):
            text = _text_field(row, self.text_key, lambda number=number: f"{part.label} row {number}")
            if text:
                yield text

    def _decode(self, raw: bytes, encoding: str, where: Callable[[], str]) -> str | None:
        """`raw` as text under `data.decode_errors`; None when the document is skipped."""
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            if self.decode_errors == "error":
                raise DataError(f"{where()}: byte {exc.start} ({raw[exc.start:exc.start + 1]!r}) is not valid "
                                f"{encoding} (data.decode_errors=error; replace or skip reads on)") from None
            self.report.undecodable.append(where())
            if self.decode_errors == "skip":
                return None
            text = raw.decode(encoding, errors="replace")
            # a U+FFFD the file itself holds is text: count only the ones the decoding put in
            self.report.replaced_characters += (text.count("\ufffd")
                                                 - raw.decode(encoding, errors="ignore").count("\ufffd"))
            return text


def _jsonl_lines(path: Path, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the lines of `path` that start in [start, stop) (stop -1: to the end of the file)."""
    with open(path, "rb") as lines:
        if start:
            lines.seek(start - 1)
            lines.readline()  # the rest of the line holding byte start - 1: it belongs to the piece before
        offset = lines.tell()
        while stop < 0 or offset < stop:
            line = lines.readline()
            if not line:
                return
            yield offset, line
            offset += len(line)


class _LineNumbers:
    """Line number of a byte offset of a file, counted only when asked (for an error or a report)."""

    def __init__(self, path: Path):
        self.path = path
        self.known = (0, 1)  # (offset, line number at it)

    def __call__(self, offset: int) -> int:
        known_offset, number = self.known if offset >= self.known[0] else (0, 1)
        with open(self.path, "rb") as handle:
            handle.seek(known_offset)
            left = offset - known_offset
            while left > 0:
                chunk = handle.read(min(left, 1 << 24))
                if not chunk:
                    break
                number += chunk.count(b"\n")
                left -= len(chunk)
        self.known = (offset, number)
        return number


def _resolve(source: str) -> list[Part]:
    if source == "stdlib":
        return [TextFiles(tuple(stdlib_files()))]
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise ConfigError("data.sources", f"{source!r} names no dataset: use hf:NAME or hf:NAME:CONFIG")
        return [HubDataset(name, config or None)]
    if source.startswith(MEGATRON_PREFIX):
        part = MegatronFiles(Path(source[len(MEGATRON_PREFIX):]).expanduser())
        missing = [str(path) for path in part.paths if not path.is_file()]
        if missing:
            raise ConfigError("data.sources", f"{source!r}: no file {' nor '.join(missing)} (a Megatron dataset is "
                                              "PATH_PREFIX.bin and PATH_PREFIX.idx)")
        return [part]
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError("data.sources", f"{source!r} does not exist (nor is it 'stdlib', 'hf:NAME[:CONFIG]' or "
                                          f"'{MEGATRON_PREFIX}PATH_PREFIX')")
    if path.is_file():
        if path.suffix in TEXT_SUFFIXES:
            return [TextFiles((path,))]
        if path.suffix in TABLE_SUFFIXES:
            return [TableFiles((path,))]
        raise ConfigError("data.sources", f"{source!r} has an unknown file type {path.suffix!r}: "
                                          f"expected one of {', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)}")
    parts: list[Part] = []
    text_files = _walk(path, TEXT_SUFFIXES)
    if text_files:
        parts.append(TextFiles(tuple(text_files)))
    for suffix in TABLE_SUFFIXES:
        table_files = _walk(path, (suffix,))
        if table_files:
            parts.append(TableFiles(tuple(table_files)))
    if not parts:
        raise ConfigError("data.sources", f"folder {source!r} holds no "
                                          f"{', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)} file")
    return parts


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` ending in `suffixes`, sorted by path, skipping hidden and package folders."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS]
        found.extend(Path(folder, f) for f in files if f.endswith(suffixes))
    return sorted(found)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc


def _jsonl_pieces(source: int, path: Path, piece_bytes: int) -> list[Piece]:
    size = _file_size(path)
    if not piece_bytes or size <= piece_bytes:
        return [Piece(source, "jsonl", str(path), size=size)]
    return [Piece(source, "jsonl", str(path), start, min(start + piece_bytes, size), min(piece_bytes, size - start))
            for start in range(0, size, piece_bytes)]


def _parquet_pieces(source: int, path: Path, piece_bytes: int) -> list[Piece]:
    try:
        metadata = pq.ParquetFile(path).metadata
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    if not piece_bytes:
        return [Piece(source, "parquet", str(path), size=sum(sizes))]
    return [Piece(source, "parquet", str(path), start, stop, sum(sizes[start:stop]))
            for start, stop in _cut(np.asarray(sizes, dtype=np.int64), piece_bytes)]


def _hub_pieces(source: int, part: HubDataset, text_key: str, piece_bytes: int) -> list[Piece]:
    if not piece_bytes:
        return [Piece(source, "hub", part.label)]
    table = _hub_text_table(part, text_key)
    sizes = _row_bytes(table, text_key) if len(table) else np.zeros(0, dtype=np.int64)
    return [Piece(source, "hub", part.label, start, stop, int(sizes[start:stop].sum()))
            for start, stop in _cut(sizes, piece_bytes)]


def _cut(sizes: np.ndarray, piece_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ranges of items whose sizes add up to about `piece_bytes` (each range holds at least one)."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if total and total + size > piece_bytes:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _hub_part(label: str) -> HubDataset:
    name, _, config = label[3:].partition(":")
    return HubDataset(name, config or None)


def _check_hub(part: HubDataset) -> None:
    """Ask the hub about `part` once, with a short timeout, instead of letting `load_dataset` retry for half a
    minute. Offline, or for a local dataset folder, there is nothing to ask."""
    if datasets.config.HF_HUB_OFFLINE or Path(part.name).exists():
        return
    try:
        HfApi().dataset_info(part.name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as exc:
        raise DataError(f"{part.label}: no such dataset on {constants.ENDPOINT} (or it is private or gated: log in "
                        "with `hf auth login`)") from exc
    except Exception as exc:  # whatever the network raised, the message names it
        raise DataError(f"{part.label}: the hub at {constants.ENDPOINT} is unreachable ({type(exc).__name__}: {exc}); "
                        "to use a copy in the local cache, set HF_DATASETS_OFFLINE=1") from exc


def _load_hub(part: HubDataset, **kwargs) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(part.name, part.config, split="train", **kwargs)
    except ConnectionError as exc:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{part.label} is not in the local cache ({datasets.config.HF_DATASETS_CACHE}) and "
                            "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: download it once with network access, "
                            "or unset them") from exc
        raise DataError(f"{part.label}: the hub could not be reached ({exc})") from exc


def _hub_text_table(part: HubDataset, text_key: str) -> datasets.Dataset:
    """The hub dataset (memory-mapped from the cache), checked to hold strings in `text_key`."""
    table = _load_hub(part)
    if text_key not in table.column_names:
        raise ConfigError("data.text_key", f"{part.label} has no column {text_key!r}; it has {table.column_names}")
    feature = table.features[text_key]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        row = next((i for i, value in enumerate(table[text_key]) if value is not None), 0)
        raise DataError(f"{part.label}: column {text_key!r} (data.text_key) holds "
                        f"{getattr(feature, 'dtype', feature)}, not strings "
                        f"(row {row}: {_shorten(repr(table[row][text_key]))})")
    return table.select_columns([text_key])


def _parquet_text_type(table: pq.ParquetFile, path: Path, text_key: str) -> pa.DataType:
    schema = table.schema_arrow
    if text_key not in schema.names:
        raise ConfigError("data.text_key", f"{path} has no column {text_key!r}; it has {schema.names}")
    return schema.field(text_key).type


def _is_string(column_type: pa.DataType) -> bool:
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or (
        pa.types.is_string_view(column_type))


def _text_field(row: dict, text_key: str, where: Callable[[], str]) -> str | None:
    """The row's text (None when it has none); anything but a string is an error naming the row."""
    text = row.get(text_key)
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where()}: field {text_key!r} (data.text_key) holds {type(text).__name__} "
                        f"{_shorten(repr(text))}, not a string")
    return text


def _text_dataset(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts}, features=TEXT_FEATURES)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _examples(names: list[str]) -> str:
    more = len(names) - EXAMPLES_SHOWN
    return ", ".join(names[:EXAMPLES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` of at most `max_bytes` UTF-8 bytes."""
    return text.encode()[:max_bytes].decode("utf-8", errors="ignore")


def _row_bytes(table: datasets.Dataset, column: str) -> np.ndarray:
    values = table.with_format("arrow")[:][column]
    return pc.fill_null(pc.binary_length(values), 0).to_numpy().astype(np.int64)
