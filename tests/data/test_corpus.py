import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data import corpus
from moe_lm.data.corpus import load_corpus, stdlib_files


def test_folder_gives_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("print('z')\n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.py").write_text("x = 'é'\n")
    (tmp_path / "empty.py").write_text("")
    (tmp_path / "notes.md").write_text("not a source type")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skip.py").write_text("hidden")

    texts = load_corpus(DataConfig(sources=[str(tmp_path)]))["text"]

    assert list(texts) == ["first", "print('z')\n", "x = 'é'\n"]


def test_python_files_are_decoded_by_their_coding_cookie(tmp_path):
    source = "# -*- coding: latin-1 -*-\nname = 'café'\n"
    (tmp_path / "legacy.py").write_bytes(source.encode("latin-1"))

    assert load_corpus(DataConfig(sources=[str(tmp_path / "legacy.py")]))["text"][0] == source


def test_jsonl_and_parquet_rows_are_documents_read_from_the_text_key(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(["one", "", None, "two"])))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["three"], "id": [3]}), parquet)

    dataset = load_corpus(DataConfig(sources=[str(jsonl), str(parquet)], text_key="body"))

    assert dataset.column_names == ["text"]
    assert list(dataset["text"]) == ["one", "two", "three"]


def test_missing_text_key_names_the_key(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"content": "x"}) + "\n")

    with pytest.raises(ConfigError, match="data.text_key") as error:
        load_corpus(DataConfig(sources=[str(jsonl)]))
    assert "'text'" in str(error.value) and "content" in str(error.value)


@pytest.mark.parametrize("name", ["table.csv", "missing.txt"])
def test_unknown_source_names_the_key(tmp_path, name):
    (tmp_path / "table.csv").write_text("a,b\n")
    source = str(tmp_path / name)

    with pytest.raises(ValueError, match="data.sources") as error:
        load_corpus(DataConfig(sources=["stdlib", source]))
    assert source in str(error.value)


def test_max_bytes_caps_the_corpus_at_a_character_boundary(tmp_path):
    for name, text in [("a.txt", "x" * 10), ("b.txt", "é" * 10), ("c.txt", "never read")]:
        (tmp_path / name).write_text(text)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc", "défg", "hij"]))

    files = load_corpus(DataConfig(sources=[str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt")], max_bytes=15))
    rows = load_corpus(DataConfig(sources=[str(jsonl)], max_bytes=6))

    assert list(files["text"]) == ["x" * 10, "é" * 2]  # 5 bytes left: two 2-byte characters fit, not three
    assert list(rows["text"]) == ["abc", "dé"]


def test_stdlib_source_is_the_sorted_standard_library_outside_site_packages():
    files = stdlib_files()
    first_text = next(path for path in files if path.stat().st_size).read_bytes()[:2000].decode(errors="ignore")

    assert files == sorted(files) and len(files) > 1000
    assert {"os.py", "test_grammar.py"} <= {path.name for path in files}  # the test suite is part of the corpus
    assert not any("site-packages" in path.parts for path in files)
    assert list(load_corpus(DataConfig(max_bytes=2000))["text"]) == [first_text]


def test_hub_source_loads_the_train_split_of_name_and_config(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return corpus.datasets.Dataset.from_dict({"text": [f"{name}/{config}"]})

    monkeypatch.setattr(corpus.datasets, "load_dataset", fake_load_dataset)

    texts = load_corpus(DataConfig(sources=["hf:org/wiki:en", "hf:plain"]))["text"]

    assert calls == [("org/wiki", "en", "train"), ("plain", None, "train")]
    assert list(texts) == ["org/wiki/en", "plain/None"]
