

import numpy as np
import pytest
import torch

from moe_lm.data.indexed import PackedDataset, TokenFile, TokenFileError, write_tokens

DOCUMENTS = [[5, 6, 7], [], np.array([9, 8], dtype=np.int32), [1] * 5]
EOS = 0


def test_token_files_round_trip_documents(tmp_path):
    written = write_tokens(tmp_path / "split", DOCUMENTS, vocab_size=10, eos_id=EOS)
    token_file = TokenFile(tmp_path / "split")

    assert token_file.num_documents == written.num_documents == len(DOCUMENTS)
    assert token_file.num_tokens == sum(len(d) + 1 for d in DOCUMENTS)
    assert [token_file.document(i).tolist() for i in range(len(DOCUMENTS))] == [list(d) for d in DOCUMENTS]
    assert token_file.tokens(0, 6).tolist() == [5, 6, 7, EOS, EOS, 9]  # documents back to back, each then EOS
    assert (token_file.vocab_size, token_file.eos_id, token_file.dtype) == (10, EOS, np.uint16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.bin", "split.idx"]  # no temporary left over


def test_large_vocabularies_use_uint32(tmp_path):
    token_file = write_tokens(tmp_path / "big", [[70_000, 65_536]], vocab_size=80_000, eos_id=1)

    assert token_file.dtype == np.uint32
    assert token_file.document(0).tolist() == [70_000, 65_536]
    assert (tmp_path / "big.bin").stat().st_size == 3 * 4


def test_out_of_vocabulary_ids_are_refused_and_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_tokens(tmp_path / "bad", [[1, 2], [3, 70_000]], vocab_size=65_536, eos_id=0)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["magic", "truncated_idx", "short_bin"])
def test_corrupt_token_files_name_the_file(tmp_path, damage):
    write_tokens(tmp_path / "split", DOCUMENTS, vocab_size=10, eos_id=EOS)
    idx, bin_ = tmp_path / "split.idx", tmp_path / "split.bin"
    if damage == "magic":
        idx.write_bytes(b"GARBAGE!" + idx.read_bytes()[8:])
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-4])
    else:
        bin_.write_bytes(bin_.read_bytes()[:-2])

    with pytest.raises(TokenFileError) as error:
        TokenFile(tmp_path / "split")
    assert str(bin_ if damage == "short_bin" else idx) in str(error.value)


def test_missing_token_file_says_to_prepare(tmp_path):
    with pytest.raises(TokenFileError, match="prepare-data"):
        TokenFile(tmp_path / "absent")


def test_packed_samples_are_next_token_windows(tmp_path):
    token_file = write_tokens(tmp_path / "split", [list(range(1, 10)), list(range(10, 14))], vocab_size=20, eos_id=0)
    stream = token_file.tokens(0, token_file.num_tokens).tolist()  # 1..9, 0, 10..13, 0: 15 tokens
    dataset = PackedDataset(token_file, seq_len=4)

    assert len(dataset) == (15 - 1) // 4 == 3
    for i in range(len(dataset)):
        inputs, targets = dataset[i]
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (4,)
        assert inputs.tolist() == stream[i * 4:i * 4 + 4]
        assert targets.tolist() == stream[i * 4 + 1:i * 4 + 5]
    with pytest.raises(IndexError):
        dataset[3]


def test_packed_dataset_refuses_a_file_shorter_than_one_sequence(tmp_path):
    token_file = write_tokens(tmp_path / "tiny", [[1, 2]], vocab_size=5, eos_id=0)

    with pytest.raises(ValueError, match="3 tokens"):
        PackedDataset(token_file, seq_len=3)
