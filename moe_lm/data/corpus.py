"""Turn `data.sources` into one `datasets.Dataset` with a single `text` column, in a deterministic order.

Sources are checked before anything is read, so a typo fails at once with the key `data.sources`:
- "stdlib": the running interpreter's standard-library *.py files, test suite included (a corpus that
  every machine has, so the quickstart needs no download);
- a .py/.txt file: one document per file (code files are documents; empty files are skipped);
- a .jsonl/.parquet file: one document per non-empty row, text from `data.text_key`;
- a folder: its .py/.txt files, then its .jsonl files, then its .parquet files, each group walked recursively
  in sorted path order (hidden folders, __pycache__ and site-packages skipped; other file types ignored);
- "hf:NAME[:CONFIG]": the train split of a hub dataset (needs network; streamed when `max_bytes` is set).
`max_bytes` caps the UTF-8 size of the corpus: reading stops once it is reached, and the document that
crosses it is cut at a character boundary, so the corpus never exceeds it.
"""

from __future__ import annotations

import os
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from moe_lm.config.schema import ConfigError, DataConfig

TEXT_SUFFIXES = (".py", ".txt")
TABLE_FORMATS = {".jsonl": "json", ".parquet": "parquet"}
SKIPPED_FOLDERS = {"__pycache__", "site-packages", "dist-packages"}
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})


@dataclass(frozen=True)
class TextFiles:
    """Plain-text files, one document each."""

    paths: tuple[Path, ...]


@dataclass(frozen=True)
class TableFiles:
    """.jsonl or .parquet files, one document per row."""

    format: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None


Part = TextFiles | TableFiles | HubDataset


def stdlib_files() -> list[Path]:
    """The *.py files of the running interpreter's standard library, test suite included, sorted."""
    return _walk(Path(sysconfig.get_paths()["stdlib"]), (".py",))


def resolve_sources(sources: Iterable[str]) -> list[Part]:
    """Check every source and list what it will read, without reading any text yet."""
    parts: list[Part] = []
    for source in sources:
        parts.extend(_resolve(source))
    return parts


def load_corpus(cfg: DataConfig, progress: bool = False) -> datasets.Dataset:
    """All documents of `cfg.sources` in order, as a Dataset with one `text` column."""
    budget = ByteBudget(cfg.max_bytes)
    pieces: list[datasets.Dataset] = []
    for part in resolve_sources(cfg.sources):
        if budget.spent:
            break
        if isinstance(part, TextFiles):
            pieces.append(_read_text_files(part.paths, budget, progress))
        elif isinstance(part, TableFiles):
            table = datasets.load_dataset(part.format, data_files=[str(p) for p in part.paths], split="train")
            pieces.append(budget.cap_table(_text_column(table, cfg.text_key, str(part.paths[0]))))
        else:
            pieces.append(_read_hub(part, cfg.text_key, budget))
    if not pieces:
        return datasets.Dataset.from_dict({"text": []}, features=TEXT_FEATURES)
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
        return datasets.concatenate_datasets([head, datasets.Dataset.from_dict({"text": [cut]},
                                                                               features=TEXT_FEATURES)])


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
        if path.suffix in TABLE_FORMATS:
            return [TableFiles(TABLE_FORMATS[path.suffix], (path,))]
        raise ConfigError("data.sources", f"{source!r} has an unknown file type {path.suffix!r}: "
                                          f"expected one of {', '.join(TEXT_SUFFIXES + tuple(TABLE_FORMATS))}")
    parts: list[Part] = []
    text_files = _walk(path, TEXT_SUFFIXES)
    if text_files:
        parts.append(TextFiles(tuple(text_files)))
    for suffix, fmt in TABLE_FORMATS.items():
        table_files = _walk(path, (suffix,))
        if table_files:
            parts.append(TableFiles(fmt, tuple(table_files)))
    if not parts:
        raise ConfigError("data.sources", f"folder {source!r} holds no "
                                          f"{', '.join(TEXT_SUFFIXES + tuple(TABLE_FORMATS))} file")
    return parts


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` ending in `suffixes`, sorted by path, skipping hidden and package folders."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS]
        found.extend(Path(folder, f) for f in files if f.endswith(suffixes))
    return sorted(found)


def _read_text(path: Path) -> str:
    """A file's text; .py files honour their PEP 263 coding cookie. Undecodable bytes become U+FFFD."""
    raw = path.read_bytes()
    encoding = "utf-8"
    if path.suffix == ".py":
        try:
            encoding, _ = tokenize.detect_encoding(iter(raw.splitlines(keepends=True)).__next__)
        except SyntaxError:  # an invalid coding cookie: fall back to UTF-8
            pass
    return raw.decode(encoding, errors="replace")


def _read_text_files(paths: tuple[Path, ...], budget: ByteBudget, progress: bool) -> datasets.Dataset:
    """Non-empty files as documents, while the budget lasts."""
    texts = (_read_text(p) for p in tqdm(paths, desc="reading files", unit="file", disable=not progress))
    return datasets.Dataset.from_dict({"text": [t for t in budget.cap(texts) if t]}, features=TEXT_FEATURES)


def _read_hub(part: HubDataset, text_key: str, budget: ByteBudget) -> datasets.Dataset:
    label = f"hf:{part.name}" + (f":{part.config}" if part.config else "")
    if budget.left is None:
        return _text_column(datasets.load_dataset(part.name, part.config, split="train"), text_key, label)
    stream = datasets.load_dataset(part.name, part.config, split="train", streaming=True)
    if text_key not in (stream.column_names or [text_key]):
        raise ConfigError("data.text_key", f"{label} has no column {text_key!r}; it has {stream.column_names}")
    texts = list(budget.cap(row[text_key] for row in stream))
    return datasets.Dataset.from_dict({"text": texts}, features=TEXT_FEATURES)


def _text_column(table: datasets.Dataset, text_key: str, label: str) -> datasets.Dataset:
    if text_key not in table.column_names:
        raise ConfigError("data.text_key", f"{label} has no column {text_key!r}; it has {table.column_names}")
    table = table.select_columns([text_key])
    if text_key != "text":
        table = table.rename_column(text_key, "text")
    if len(table) and _row_bytes(table).min() == 0:  # null or empty rows are no documents
        table = table.filter(bool, input_columns="text", keep_in_memory=True)
    return table if table.features == TEXT_FEATURES else table.cast(TEXT_FEATURES)


def _cut_utf8(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode("utf-8", errors="ignore")


def _row_bytes(table: datasets.Dataset) -> np.ndarray:
    column = table.with_format("arrow")[:]["text"]
    return pc.fill_null(pc.binary_length(column), 0).to_numpy()

