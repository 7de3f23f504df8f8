"""A split is runs of documents of several token files read as one stream, exactly as if they were one file."""

import json

import numpy as np
import pytest

from moe_lm.data import stream as stream_module
from moe_lm.data.indexed import PackedDataset, TokenFile, TokenFileError, write_tokens
from moe_lm.data.prepare import prepare_data
from moe_lm.data.stream import StreamFile, TokenStream, open_split
from tests.data.test_prepare import data_config

FILES = [[[1, 2, 3], [4], [5, 6]], [[7, 8, 9, 10]], [[11], [12, 13], [14, 15, 16], [17]]]
EOS = 0


@pytest.fixture
def three_files(tmp_path):
    token_files = [write_tokens(tmp_path / f"f{n}", documents, vocab_size=20, eos_id=EOS)
                   for n, documents in enumerate(FILES)]
    files = [StreamFile(tmp_path / f"f{n}", "moe-lm", np.dtype(np.uint16)) for n in range(len(FILES))]
    return token_files, files


def runs_of(token_files, picks):
    """(file, first document, end document) -> run rows with their token offsets."""
    return np.array([[f, a, b, token_files[f].offsets[a], token_files[f].offsets[b]] for f, a, b in picks])


def test_a_stream_reads_its_runs_back_to_back(three_files, monkeypatch):
    token_files, files = three_files
    picks = [(2, 1, 3), (0, 0, 1), (1, 0, 1), (0, 2, 3), (2, 3, 4)]  # out of file order, documents left out
    monkeypatch.setattr(stream_module, "OPEN_FILES", 2)  # fewer open files than the stream has: reopened as needed
    stream = TokenStream(files, runs_of(token_files, picks), vocab_size=20, eos_id=EOS, label="test")

    documents = [FILES[f][d] for f, a, b in picks for d in range(a, b)]
    reference = [t for document in documents for t in document + [EOS]]
    assert stream.num_tokens == len(reference) and stream.num_documents == len(documents)
    for start in range(len(reference) + 1):
        for stop in range(start, len(reference) + 1):
            assert stream.tokens(start, stop).tolist() == reference[start:stop]
    assert [stream.document(i).tolist() for i in range(len(documents))] == documents
    dataset = PackedDataset(stream, seq_len=3)
    assert [dataset.window(i).tolist() for i in range(len(dataset))] == [
        reference[i * 3:i * 3 + 4] for i in range(len(dataset))]
    with pytest.raises(IndexError):
        stream.tokens(0, len(reference) + 1)


def test_a_truncated_shard_is_named_when_a_split_is_opened(tmp_path):
    data_dir = prepare_data(data_config(tmp_path), progress=False)
    with open(data_dir / "val-00000.bin", "r+b") as shard:
        shard.truncate(4)

    with pytest.raises(TokenFileError, match="val-00000.bin: 4 bytes, but .*meta.json recorded"):
        open_split(data_dir, "val")


def test_the_one_file_reader_points_to_the_splits_and_an_old_folder_is_named(tmp_path):
    data_dir = prepare_data(data_config(tmp_path), progress=False)

    with pytest.raises(TokenFileError, match=r"holds sharded splits; read them with moe_lm.data.open_split"):
        TokenFile(data_dir / "train")
    (data_dir / "meta.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(TokenFileError, match="prepared by an older moe-lm"):
        open_split(data_dir, "train")
