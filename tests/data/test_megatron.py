"""Megatron-LM indexed datasets (MMapIndexedDataset) are read as they are: the files here are written by
`write_megatron` from the format's documented layout, not by moe-lm."""

import struct

import datasets
import numpy as np
import pytest

from moe_lm.config.schema import ConfigError, DataConfig
from moe_lm.data.errors import DataError
from moe_lm.data.indexed import PackedDataset, TokenFileError
from moe_lm.data.megatron import MegatronTokenFile
from moe_lm.data.prepare import load_meta, prepare_data
from moe_lm.data.stream import load_unigram_counts, open_split
from moe_lm.data.tokenizer import train_tokenizer

DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 4) for i in range(60)]


def write_megatron(prefix, documents, dtype=np.uint16, sentences=1):
    """PREFIX.bin and PREFIX.idx in Megatron's layout: header (magic, version 1, dtype code, sequence count,
    document index count), int32 sequence lengths, int64 byte pointers, int64 document indices. Each document is
    cut into `sentences` sequences (as --split-sentences would), empty ones into none."""
    sequences, document_index = [], [0]
    for document in documents:
        document = np.asarray(document, dtype=dtype)
        sequences += [part for part in np.array_split(document, sentences) if len(part)] if len(document) else []
        document_index.append(len(sequences))
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as out:
        out.write(b"".join(np.asarray(s, dtype=dtype).tobytes() for s in sequences))
    with open(f"{prefix}.idx", "wb") as out:
        out.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[dtype]))
        out.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_index)))
        out.write(lengths.tobytes() + pointers.tobytes() + np.array(document_index, dtype=np.int64).tobytes())


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A tokenizer folder and the corpus tokenized with it, each document ending with EOS (--append-eod)."""
    folder = tmp_path_factory.mktemp("megatron")
    tokenizer = train_tokenizer(datasets.Dataset.from_dict({"text": TEXTS}), 300, folder / "tokenizer")
    documents = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]
    return folder / "tokenizer", documents


@pytest.mark.parametrize("dtype, sentences", [(np.uint16, 1), (np.int32, 3)])
def test_megatron_files_read_back_every_document_exactly(tmp_path, dtype, sentences):
    documents = [[5, 6, 7], [], [9, 8, 7, 6, 5, 4, 3], [70] * 10, [1]]
    write_megatron(tmp_path / "corpus_text_document", documents, dtype, sentences)

    source = MegatronTokenFile(tmp_path / "corpus_text_document")

    assert source.dtype == dtype and source.num_documents == len(documents)
    assert [source.document(i).tolist() for i in range(len(documents))] == documents
    assert source.tokens(0, source.num_tokens).tolist() == sum(documents, [])


@pytest.mark.parametrize("damage, message", [
    ("magic", "not a Megatron MMapIndexedDataset index"), ("float", "holds float32 values, not token ids"),
    ("truncated", "bytes, but a header for 3 sequences"), ("short_bin", "the pair does not match"),
])
def test_a_damaged_megatron_dataset_names_the_file(tmp_path, damage, message):
    prefix = tmp_path / "corpus"
    write_megatron(prefix, [[1, 2], [3], [4, 5, 6]])
    idx, bin_ = tmp_path / "corpus.idx", tmp_path / "corpus.bin"
    if damage == "magic":
        idx.write_bytes(b"MMIDIDY" + idx.read_bytes()[7:])
    elif damage == "float":
        idx.write_bytes(idx.read_bytes()[:17] + bytes([7]) + idx.read_bytes()[18:])
    elif damage == "truncated":
        idx.write_bytes(idx.read_bytes()[:-8])
    else:
        bin_.write_bytes(bin_.read_bytes()[:-2])

    with pytest.raises(TokenFileError, match=message) as error:
        MegatronTokenFile(prefix)
    assert str(bin_ if damage == "short_bin" else idx) in str(error.value)


def test_a_megatron_source_is_split_by_hash_without_copying_a_token(tmp_path, tokenized):
    tokenizer_dir, documents = tokenized
    write_megatron(tmp_path / "code_text_document", documents)
    cfg = DataConfig(sources=[f"megatron:{tmp_path / 'code_text_document'}"], tokenizer=str(tokenizer_dir),
                     dir=str(tmp_path / "data"), val_fraction=0.2)

    data_dir = prepare_data(cfg, seq_len=16, progress=False)
    train, val = open_split(data_dir, "train"), open_split(data_dir, "val")
    split = {name: [tuple(s.document(i).tolist()) for i in range(s.num_documents)] for name, s in
             (("train", train), ("val", val))}

    assert sorted(split["train"] + split["val"]) == sorted(map(tuple, documents))
    assert 0 < len(split["val"]) < len(documents) // 2
    assert not list(data_dir.glob("*.bin")) and load_meta(data_dir)["token_files"][0]["format"] == "megatron"
    counts = load_unigram_counts(data_dir)
    assert np.array_equal(np.bincount(train.tokens(0, train.num_tokens).astype(np.int64), minlength=len(counts)),
                          counts)
    inputs, targets = PackedDataset(train, seq_len=16)[3]
    assert inputs[1:].tolist() == targets[:-1].tolist()
    assert prepare_data(cfg, progress=False) == data_dir and load_meta(data_dir)["val"]["documents"] == len(
        split["val"])  # reused as it is


def test_a_megatron_validation_split_is_capped_by_hash(tmp_path, tokenized):
    tokenizer_dir, documents = tokenized
    write_megatron(tmp_path / "code", documents)
    cfg = DataConfig(sources=[f"megatron:{tmp_path / 'code'}"], tokenizer=str(tokenizer_dir),
                     dir=str(tmp_path / "data"), val_fraction=0.5, max_val_tokens=100)

    meta = load_meta(prepare_data(cfg, progress=False))

    assert 0 < meta["val"]["tokens"] <= 100 or meta["val"]["documents"] == 1
    assert meta["val_documents_trained"] > 0 and meta["train"]["documents"] + meta["val"]["documents"] == 60


def test_megatron_sources_need_their_tokenizer_and_stand_alone(tmp_path, tokenized):
    tokenizer_dir, documents = tokenized
    write_megatron(tmp_path / "code", documents)
    source = f"megatron:{tmp_path / 'code'}"

    with pytest.raises(ConfigError, match="data.tokenizer"):
        prepare_data(DataConfig(sources=[source], dir=str(tmp_path / "a")), progress=False)
    with pytest.raises(ConfigError, match="must be the only source"):
        prepare_data(DataConfig(sources=[source, "stdlib"], tokenizer=str(tokenizer_dir), dir=str(tmp_path / "b")),
                     progress=False)
    with pytest.raises(ConfigError, match="no file"):
        prepare_data(DataConfig(sources=[f"megatron:{tmp_path / 'nothing'}"], tokenizer=str(tokenizer_dir),
                                dir=str(tmp_path / "c")), progress=False)


def test_token_ids_beyond_the_tokenizer_are_refused(tmp_path, tokenized):
    tokenizer_dir, documents = tokenized
    write_megatron(tmp_path / "other", documents + [[5000, 1]])

    with pytest.raises(DataError, match="token id 5000, outside the vocabulary"):
        prepare_data(DataConfig(sources=[f"megatron:{tmp_path / 'other'}"], tokenizer=str(tokenizer_dir),
                                dir=str(tmp_path / "data")), progress=False)
