import math

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.indexed import PackedDataset
from moe_lm.data.prepare import (load_meta, prepare_data, split_corpus, unigram_perplexity,
                                 unigram_perplexity_from_counts)
from moe_lm.data.stream import open_split

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_corpus(folder, count, start=0):
    folder.mkdir(exist_ok=True)
    for i in range(start, start + count):
        body = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(20 + i % 13))
        (folder / f"doc{i:03d}.txt").write_text(f"# document {i}\n{body}\n")


def data_config(tmp_path, **overrides):
    write_corpus(tmp_path / "corpus", 40)
    fields = dict(sources=[str(tmp_path / "corpus")], dir=str(tmp_path / "data"), vocab_size=300, val_fraction=0.1)
    return DataConfig(**(fields | overrides))


def decoded_documents(data_dir, split):
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    stream = open_split(data_dir, split)
    return [tokenizer.decode(stream.document(i).tolist()) for i in range(stream.num_documents)]


def test_prepare_writes_splits_that_decode_to_the_corpus(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, seq_len=8, progress=False)
    meta = load_meta(data_dir)
    train, val = decoded_documents(data_dir, "train"), decoded_documents(data_dir, "val")
    corpus = [p.read_text() for p in sorted((tmp_path / "corpus").iterdir())]

    assert sorted(train + val) == sorted(corpus) and train and val
    assert meta["train"] == {"documents": len(train), "tokens": open_split(data_dir, "train").num_tokens}
    assert meta["vocab_size"] == len(AutoTokenizer.from_pretrained(data_dir / "tokenizer")) <= 300
    assert meta["bytes"] == sum(len(text.encode()) for text in corpus)
    assert meta["sources"] == cfg.sources and open_split(data_dir, "val").eos_id == meta["eos_id"]
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "meta.json", "shards", "tokenizer", "train-00000.bin", "train-00000.idx", "train.counts.npy", "train.runs.npy",
        "val-00000.bin", "val-00000.idx", "val.runs.npy"]
    assert meta["files"] == {p.relative_to(data_dir).as_posix(): p.stat().st_size for p in data_dir.rglob("*")
                             if p.is_file() and p.name != "meta.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "corpus", "data"]  # no build folder left


def test_prepare_is_idempotent(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    first_meta = load_meta(data_dir)
    zeros = bytes((data_dir / "train-00000.bin").stat().st_size)
    (data_dir / "train-00000.bin").write_bytes(zeros)  # a rebuild would overwrite this; a cached call must not read it

    assert prepare_data(cfg, progress=False) == data_dir
    assert load_meta(data_dir) == first_meta and (data_dir / "train-00000.bin").read_bytes() == zeros

    rebuilt = load_meta(prepare_data(DataConfig(**(vars(cfg) | {"vocab_size": 280})), progress=False))
    assert rebuilt["fingerprint"] != first_meta["fingerprint"] and rebuilt["vocab_size"] <= 280
    assert open_split(data_dir, "train").num_tokens == rebuilt["train"]["tokens"]


def test_val_split_is_stable(tmp_path):
    documents = [f"document number {i}" for i in range(200)]
    train, val = split_corpus(datasets.Dataset.from_dict({"text": documents}), 0.2)
    grown_train, grown_val = split_corpus(
        datasets.Dataset.from_dict({"text": [f"extra {i}" for i in range(50)] + documents[::-1]}), 0.2)

    assert 20 <= len(val) <= 60 and len(train) + len(val) == 200
    assert set(val["text"]) == set(grown_val["text"]) & set(documents)
    assert set(train["text"]) == set(grown_train["text"]) & set(documents)


def test_val_split_always_holds_a_document():
    train, val = split_corpus(datasets.Dataset.from_dict({"text": ["one", "two", "three"]}), 1e-9)

    assert len(val) == 1 and len(train) == 2


def test_prepare_uses_an_existing_tokenizer(tmp_path):
    data_dir = prepare_data(data_config(tmp_path), progress=False)
    reuse = data_config(tmp_path, dir=str(tmp_path / "reused"), tokenizer=str(data_dir / "tokenizer"))

    reused_dir = prepare_data(reuse, progress=False)

    assert load_meta(reused_dir)["vocab_size"] == load_meta(data_dir)["vocab_size"]
    reused_val, val = open_split(reused_dir, "val"), open_split(data_dir, "val")
    assert np.array_equal(reused_val.tokens(0, reused_val.num_tokens), val.tokens(0, val.num_tokens))


def test_prepare_rejects_a_val_split_shorter_than_one_sequence(tmp_path):
    cfg = data_config(tmp_path)
    val_tokens = load_meta(prepare_data(cfg, progress=False))["val"]["tokens"]

    with pytest.raises(ConfigError, match="data.val_fraction"):
        prepare_data(cfg, seq_len=val_tokens, progress=False)
    assert len(PackedDataset(open_split(tmp_path / "data", "val"), seq_len=val_tokens - 1)) == 1


def test_missing_tokenizer_folder_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        prepare_data(data_config(tmp_path, tokenizer=str(tmp_path / "nowhere")), progress=False)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_unigram_perplexity_matches_the_smoothed_counts():
    train = np.array([0, 0, 0, 1], dtype=np.uint16)
    val = np.array([0, 1, 2], dtype=np.uint16)
    probabilities = np.array([4, 2, 1]) / (4 + 3)  # add-one counts over a vocabulary of 3

    expected = math.exp(-np.log(probabilities).mean())
    assert unigram_perplexity(train, val, vocab_size=3) == pytest.approx(expected)
    assert unigram_perplexity(train, np.array([0, 0]), 3) < unigram_perplexity(train, np.array([2, 2]), 3)
    assert unigram_perplexity_from_counts(np.array([3, 1, 0]), val) == unigram_perplexity(train, val, vocab_size=3)



def test_vocab_below_the_bytes_and_eos_fails_before_any_source_is_read(tmp_path):
    cfg = data_config(tmp_path, vocab_size=200, sources=[str(tmp_path / "nowhere")])

    with pytest.raises(ConfigError, match="must be >= 257") as error:
        prepare_data(cfg, progress=False)
    assert error.value.key == "data.vocab_size" and not (tmp_path / "data").exists()


def test_meta_counts_the_documents_that_reading_replaced_skipped_or_deduplicated(tmp_path):
    cfg = data_config(tmp_path)
    corpus = tmp_path / "corpus"
    (corpus / "latin1.txt").write_bytes(("café crème " * 5).encode("latin-1"))
    (corpus / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    copy = (corpus / "doc003.txt").read_text()
    for name in ("copy_a.txt", "copy_b.txt"):
        (corpus / name).write_text(copy)

    with pytest.warns(UserWarning) as warned:
        data_dir = prepare_data(cfg, progress=False)
    meta = load_meta(data_dir)
    documents = decoded_documents(data_dir, "train") + decoded_documents(data_dir, "val")

    assert (meta["undecodable_documents"], meta["replaced_characters"]) == (1, 10)  # é and è, five times
    assert meta["binary_files_skipped"] == 1 and meta["duplicate_documents_removed"] == 2
    assert documents.count(copy) == 1 and ("caf\ufffd cr\ufffdme " * 5) in documents
    assert len(documents) == 40 + 1 and not any("IHDR" in document for document in documents)
    messages = " ".join(str(w.message) for w in warned)
    assert "latin1.txt" in messages and "blob.txt" in messages
