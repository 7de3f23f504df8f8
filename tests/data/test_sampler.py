

import pytest
import torch

from moe_lm.data.indexed import PackedDataset, write_tokens
from moe_lm.data.sampler import ResumableSampler, make_batch, rank_slice


def test_sampler_resumes_at_the_same_sample():
    uninterrupted = ResumableSampler(num_samples=10, seed=7)
    stream = [i for step in range(9) for i in uninterrupted.global_batch(step * 4, 4)]  # 36 samples, 3.6 epochs

    for consumed in (0, 3, 10, 17, 28):
        restarted = ResumableSampler(num_samples=10, seed=7)  # a fresh process: its only state is `consumed`
        assert restarted.global_batch(consumed, 36 - consumed) == stream[consumed:]


def test_each_epoch_is_a_new_permutation_of_all_samples():
    sampler = ResumableSampler(num_samples=50, seed=1)
    epochs = [sampler.global_batch(epoch * 50, 50) for epoch in range(3)]

    assert all(sorted(ids) == list(range(50)) for ids in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(50))
    assert ResumableSampler(num_samples=50, seed=2).global_batch(0, 50) != epochs[0]
    assert epochs[1] == ResumableSampler(50, seed=1).epoch_order(1).tolist()


def test_unshuffled_sampler_walks_the_samples_in_order():
    assert ResumableSampler(num_samples=3, seed=5, shuffle=False).global_batch(2, 5) == [2, 0, 1, 2, 0]


def test_rank_slices_partition_the_global_batch():
    ids = ResumableSampler(num_samples=100, seed=3).global_batch(40, 12)
    slices = [rank_slice(ids, rank, 4) for rank in range(4)]

    assert [len(s) for s in slices] == [3, 3, 3, 3]
    assert sum(slices, []) == ids
    with pytest.raises(ValueError, match="does not split over 5"):
        rank_slice(ids, 0, 5)


def test_make_batch_stacks_the_samples_of_the_given_ids(tmp_path):
    token_file = write_tokens(tmp_path / "split", [list(range(1, 30))], vocab_size=40, eos_id=0)
    dataset = PackedDataset(token_file, seq_len=8)

    inputs, targets = make_batch(dataset, [2, 0, 2])

    assert inputs.shape == targets.shape == (3, 8) and inputs.dtype == torch.int64
    assert torch.equal(inputs[0], dataset[2][0]) and torch.equal(targets[1], dataset[0][1])
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
