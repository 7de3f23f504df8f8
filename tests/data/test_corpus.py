import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data import corpus
from moe_lm.data.corpus import ReadReport, load_corpus, plan_pieces, read_pieces, stdlib_files
from moe_lm.data.errors import DataError

LATIN1_TEXT = "café crème brûlée"  # three bytes that are not UTF-8 once encoded as latin-1


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


@pytest.mark.parametrize("decode_errors, expected", [
    ("replace", ["caf\ufffd cr\ufffdme br\ufffdl\ufffde \ufffd", "plain"]),
    ("skip", ["plain"]),
])
def test_undecodable_bytes_are_replaced_or_skipped_and_counted(tmp_path, decode_errors, expected):
    (tmp_path / "a_latin1.txt").write_bytes(f"{LATIN1_TEXT} ".encode("latin-1") + "\ufffd".encode())
    (tmp_path / "b_plain.txt").write_text("plain")
    report = ReadReport()

    with pytest.warns(UserWarning, match=f"a_latin1.txt.*decode_errors={decode_errors}"):
        texts = load_corpus(DataConfig(sources=[str(tmp_path)], decode_errors=decode_errors), report=report)["text"]

    assert list(texts) == expected
    assert report.undecodable == [str(tmp_path / "a_latin1.txt")]
    assert report.replaced_characters == (4 if decode_errors == "replace" else 0)  # the file's own U+FFFD is text


def test_undecodable_bytes_in_error_mode_name_the_file_and_byte(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(LATIN1_TEXT.encode("latin-1"))

    with pytest.raises(DataError, match=r"latin1.txt: byte 3 \(b'\\xe9'\) is not valid utf-8"):
        load_corpus(DataConfig(sources=[str(tmp_path)], decode_errors="error"))


def test_a_binary_file_named_txt_is_skipped_and_counted(tmp_path):
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "notes.txt").write_text("notes")
    report = ReadReport()

    with pytest.warns(UserWarning, match="binary.*image.txt"):
        texts = load_corpus(DataConfig(sources=[str(tmp_path)]), report=report)["text"]

    assert list(texts) == ["notes"] and report.binary_files == [str(tmp_path / "image.txt")]


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "cut off', "rows.jsonl:2: not valid JSON at column 10: Unterminated string"),
    ('["a", "list"]', "rows.jsonl:2: expected one JSON object per line, got list"),
    ('{"text": 5}', "rows.jsonl:2: field 'text' \\(data.text_key\\) holds int 5, not a string"),
])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, bad_line, message):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(f'{{"text": "fine"}}\n{bad_line}\n{{"text": "never reached"}}\n')

    with pytest.raises(DataError, match=message):
        load_corpus(DataConfig(sources=[str(jsonl)]))


def test_a_lone_surrogate_escape_in_jsonl_is_an_undecodable_document(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"text": "half \\ud800 a pair"}\n{"text": "fine"}\n')

    with pytest.raises(DataError, match="rows.jsonl:1: byte 5"):
        load_corpus(DataConfig(sources=[str(jsonl)], decode_errors="error"))
    with pytest.warns(UserWarning, match="rows.jsonl:1"):
        assert list(load_corpus(DataConfig(sources=[str(jsonl)], decode_errors="skip"))["text"]) == ["fine"]


def test_a_parquet_text_column_of_numbers_names_the_file_and_row(tmp_path):
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [None, 7, 8]}), parquet)

    with pytest.raises(DataError, match=r"rows.parquet: column 'text' \(data.text_key\) holds int64, not strings "
                                        r"\(row 1: 7\)"):
        load_corpus(DataConfig(sources=[str(parquet)]))


def test_an_uncached_hub_dataset_fails_at_once_when_offline(monkeypatch):
    monkeypatch.setattr(corpus.datasets.config, "HF_HUB_OFFLINE", True)  # as HF_DATASETS_OFFLINE=1 sets it

    with pytest.raises(DataError, match="hf:nobody/nothing:en is not in the local cache .*OFFLINE is set"):
        load_corpus(DataConfig(sources=["hf:nobody/nothing:en"]))


def test_an_unreachable_hub_fails_before_any_download_is_tried(monkeypatch):
    def unreachable(self, name, timeout):
        raise OSError("[Errno 101] Network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("load_dataset retries for half a minute when the hub is unreachable")

    monkeypatch.setattr(corpus.datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpus.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(corpus.datasets, "load_dataset", no_download)

    with pytest.raises(DataError, match="hf:org/wiki: the hub at .* is unreachable .*Network is unreachable"):
        load_corpus(DataConfig(sources=["hf:org/wiki"]))


def test_a_large_jsonl_file_is_cut_at_line_starts_without_losing_or_repeating_a_row(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    rows = [{"text": f"row {i} " + "x" * (i % 17)} for i in range(200)]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(sources=[str(jsonl)])

    whole = [text for _, text in read_pieces(cfg, plan_pieces(cfg), ReadReport())]
    for piece_bytes in (1, 29, 30, 31, 1000):
        pieces = plan_pieces(cfg, piece_bytes)
        assert len(pieces) == -(-jsonl.stat().st_size // piece_bytes)
        assert [text for _, text in read_pieces(cfg, pieces, ReadReport())] == whole == [r["text"] for r in rows]


def test_a_bad_line_in_a_later_piece_is_named_by_its_line_number(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)) + "{broken\n")
    cfg = DataConfig(sources=[str(jsonl)])

    with pytest.raises(DataError, match="rows.jsonl:51: not valid JSON"):
        list(read_pieces(cfg, plan_pieces(cfg, 64)[-1:], ReadReport()))


def test_parquet_row_groups_and_hub_rows_are_cut_into_pieces(tmp_path, monkeypatch):
    parquet = tmp_path / "rows.parquet"
    texts = [f"document {i} " * (1 + i % 5) for i in range(40)]
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=3)
    monkeypatch.setattr(corpus.datasets, "load_dataset",
                        lambda name, config, split: corpus.datasets.Dataset.from_dict({"text": texts}))
    cfg = DataConfig(sources=[str(parquet), "hf:org/rows"])

    pieces = plan_pieces(cfg, 100)

    assert {p.kind for p in pieces} == {"parquet", "hub"} and len(pieces) > 8
    assert [text for _, text in read_pieces(cfg, pieces, ReadReport())] == texts + texts
