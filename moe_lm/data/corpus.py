"""Turn `data.sources` into one `datasets.Dataset` with a single `text` column, in a deterministic order.

Sources are checked before anything is read, so a typo fails at once with the key `data.sources`:
- "stdlib": the running interpreter's standard-library *.py files, test suite included (a corpus that
  every machine has, so the quickstart needs no download);
- a .py/.txt file: one document per file (code files are documents; empty files are skipped);
- a .jsonl/.parquet file: one document per non-empty row, text from `data.text_key`;
- a folder: its .py/.txt files, then its .jsonl files, then its .parquet files, each group walked recursively
  in sorted path order (hidden folders, __pycache__ and site-packages skipped; other file types ignored);
- "hf:NAME[:CONFIG]": the train split of a hub dataset (streamed when `max_bytes` is set; from the local cache
  only when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set). An unreachable hub fails in seconds, not after retries.
`max_bytes` caps the UTF-8 size of the corpus: reading stops once it is reached, and the document that
crosses it is cut at a character boundary, so the corpus never exceeds it.

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
from collections.abc import Iterable, Iterator
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


Part = TextFiles | TableFiles | HubDataset


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


def load_corpus(cfg: DataConfig, progress: bool = False, report: ReadReport | None = None) -> datasets.Dataset:
    """All documents of `cfg.sources` in order, as a Dataset with one `text` column. What was replaced or
    skipped is added to `report` and warned about."""
    parts = resolve_sources(cfg.sources)
    for part in parts:
        if isinstance(part, HubDataset):
            _check_hub(part)  # before reading anything else: a network failure should cost seconds
    reader = _SourceReader(cfg, report if report is not None else ReadReport(), progress)
    pieces: list[datasets.Dataset] = []
    for part in parts:
        if isinstance(part, TextFiles):
            pieces.append(reader.text_files(part.paths))
        elif isinstance(part, TableFiles):
            pieces.extend(reader.table_file(path) for path in part.paths)
        else:
            pieces.append(reader.hub(part))
    reader.report.warn(cfg.decode_errors)
    if not pieces:
        return _text_dataset([])
    return datasets.concatenate_datasets(pieces)


def corpus_bytes(corpus: datasets.Dataset) -> int:
    """UTF-8 size of all the text in a corpus."""
    return int(_row_bytes(corpus).sum()) if len(corpus) else 0


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
                cut, self.left = _cut_utf8(text, self.left), 0
                yield cut
                return
            self.left -= size
            yield text

    def cap_table(self, table: datasets.Dataset) -> datasets.Dataset:
        """The leading rows of an Arrow-backed text table that fit in the budget, the last one cut to fit."""
        if self.left is None:
            return table
        ends = np.cumsum(_row_bytes(table)) if len(table) else np.zeros(1, dtype=np.int64)
        if ends[-1] < self.left:
            self.left -= int(ends[-1])
            return table
        crossing = int(np.searchsorted(ends, self.left, side="left"))
        head = table.select(range(crossing), keep_in_memory=True)
        cut = _cut_utf8(table[crossing]["text"], self.left - (int(ends[crossing - 1]) if crossing else 0))
        self.left = 0
        return datasets.concatenate_datasets([head, _text_dataset([cut])])


class _SourceReader:
    """Reads files and hub datasets into text Datasets under one byte budget and one `data.decode_errors` policy."""

    def __init__(self, cfg: DataConfig, report: ReadReport, progress: bool):
        self.text_key = cfg.text_key
        self.decode_errors = cfg.decode_errors
        self.budget = ByteBudget(cfg.max_bytes)
        self.report = report
        self.progress = progress

    def text_files(self, paths: tuple[Path, ...]) -> datasets.Dataset:
        """Non-empty, non-binary files as documents, while the budget lasts."""
        files = tqdm(paths, desc="reading files", unit="file", disable=not self.progress or self.budget.spent)
        texts = (self._file_text(path) for path in files)
        return _text_dataset(list(self.budget.cap(text for text in texts if text)))

    def table_file(self, path: Path) -> datasets.Dataset:
        if self.budget.spent:
            return _text_dataset([])
        if path.suffix == ".jsonl":
            return _text_dataset(list(self.budget.cap(self._jsonl_texts(path))))
        try:
            names = pq.read_schema(path).names
            if self.text_key not in names:
                raise ConfigError("data.text_key", f"{path} has no column {self.text_key!r}; it has {names}")
            table = pq.read_table(path, columns=[self.text_key])
        except pa.ArrowException as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
        return self.budget.cap_table(_text_column(datasets.Dataset(table), self.text_key, str(path)))

    def hub(self, part: HubDataset) -> datasets.Dataset:
        if self.budget.spent:
            return _text_dataset([])
        # offline, the cache is read whole: a stream always needs the network
        if self.budget.left is None or datasets.config.HF_HUB_OFFLINE:
            table = _load_hub(part)
            return self.budget.cap_table(_text_column(table, self.text_key, part.label))
        stream = _load_hub(part, streaming=True)
        if self.text_key not in (stream.column_names or [self.text_key]):
            raise ConfigError("data.text_key", f"{part.label} has no column {self.text_key!r}; "
                                               f"it has {stream.column_names}")
        texts = (_text_field(row, self.text_key, f"{part.label} row {number}") for number, row in enumerate(stream))
        return _text_dataset(list(self.budget.cap(text for text in texts if text)))

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
        return self._decode(raw, encoding, str(path))

    def _jsonl_texts(self, path: Path) -> Iterator[str]:
        """The non-empty `text_key` values of a .jsonl file, line by line."""
        key_seen, first_keys = False, None
        with open(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                where = f"{path}:{number}"
                decoded = self._decode(line.rstrip(b"\r\n"), "utf-8", where)
                if decoded is None or not decoded.strip():
                    continue
                try:
                    row = json.loads(decoded)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON at column {exc.colno}: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected one JSON object per line, got {type(row).__name__}")
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

    def _decode(self, raw: bytes, encoding: str, where: str) -> str | None:
        """`raw` as text under `data.decode_errors`; None when the document is skipped."""
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as exc:
            if self.decode_errors == "error":
                raise DataError(f"{where}: byte {exc.start} ({raw[exc.start:exc.start + 1]!r}) is not valid "
                                f"{encoding} (data.decode_errors=error; replace or skip reads on)") from None
            self.report.undecodable.append(where)
            if self.decode_errors == "skip":
                return None
            text = raw.decode(encoding, errors="replace")
            # a U+FFFD the file itself holds is text: count only the ones the decoding put in
            self.report.replaced_characters += (text.count("\ufffd")
                                                 - raw.decode(encoding, errors="ignore").count("\ufffd"))
            return text


def _resolve(source: str) -> list[Part]:
    if source == "stdlib":
        return [TextFiles(tuple(stdlib_files()))]
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not name:
            raise ConfigError("data.sources", f"{source!r} names no dataset: use hf:NAME or hf:NAME:CONFIG")
        return [HubDataset(name, config or None)]
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError("data.sources", f"{source!r} does not exist (nor is it 'stdlib' or 'hf:NAME[:CONFIG]')")
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


def _text_field(row: dict, text_key: str, where: str) -> str | None:
    """The row's text (None when it has none); anything but a string is an error naming the row."""
    text = row.get(text_key)
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {text_key!r} (data.text_key) holds {type(text).__name__} "
                        f"{_shorten(repr(text))}, not a string")
    return text


def _text_column(table: datasets.Dataset, text_key: str, label: str) -> datasets.Dataset:
    if text_key not in table.column_names:
        raise ConfigError("data.text_key", f"{label} has no column {text_key!r}; it has {table.column_names}")
    feature = table.features[text_key]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        row = next((i for i, value in enumerate(table[text_key]) if value is not None), 0)
        raise DataError(f"{label}: column {text_key!r} (data.text_key) holds {getattr(feature, 'dtype', feature)}, "
                        f"not strings (row {row}: {_shorten(repr(table[row][text_key]))})")
    table = table.select_columns([text_key])
    if text_key != "text":
        table = table.rename_column(text_key, "text")
    if len(table) and _row_bytes(table).min() == 0:  # null or empty rows are no documents
        table = table.filter(bool, input_columns="text", keep_in_memory=True)
    return table if table.features == TEXT_FEATURES else table.cast(TEXT_FEATURES)


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


def _cut_utf8(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode("utf-8", errors="ignore")


def _row_bytes(table: datasets.Dataset) -> np.ndarray:
    column = table.with_format("arrow")[:]["text"]
    return pc.fill_null(pc.binary_length(column), 0).to_numpy()
