"""Blends sample each source in proportion to its weight, resume from the consumed count alone, and validate per
source; the training data of one folder reads like the one-file layout did, and its unigram baseline comes from
the stored counts."""

import dataclasses

import numpy as np
import pytest

from moe_lm.config.schema import BlendSource, ConfigError, DataConfig
from moe_lm.data.blend import BLOCK, BlendedSampler
from moe_lm.data.errors import DataError
from moe_lm.data.prepare import prepare_data, unigram_perplexity
from moe_lm.data.sampler import make_batch
from moe_lm.data.training import open_training_data, prepare_training_data
from tests.data.test_prepare import data_config

SEQ_LEN = 8


def write_numbers_corpus(folder, count=30):
    folder.mkdir()
    for i in range(count):
        (folder / f"n{i:03d}.txt").write_text(" ".join(str(i * 37 + j) for j in range(25 + i % 9)) + "\n")


@pytest.fixture
def two_folders(tmp_path):
    words = prepare_data(data_config(tmp_path, dir=str(tmp_path / "words")), progress=False)
    write_numbers_corpus(tmp_path / "numbers_corpus")
    numbers = prepare_data(DataConfig(sources=[str(tmp_path / "numbers_corpus")], dir=str(tmp_path / "numbers"),
                                      tokenizer=str(words / "tokenizer"), val_fraction=0.2), progress=False)
    return words, numbers


def blend_config(*parts):
    return DataConfig(blend=[BlendSource(dir=str(folder), weight=weight) for folder, weight in parts])


@pytest.mark.parametrize("weights", [[0.8, 0.2], [0.5, 0.3, 0.2], [7, 3]])
def test_every_prefix_of_the_blend_is_within_one_sample_of_the_weights(weights):
    sampler = BlendedSampler([100] * len(weights), weights, seed=0)
    sources, _ = sampler.locate(np.arange(10_000))

    drawn = np.cumsum(np.eye(len(weights))[sources], axis=0)  # [position, source]: samples so far
    expected = np.arange(1, 10_001)[:, None] * (np.array(weights) / sum(weights))
    assert np.abs(drawn - expected).max() <= 1
    assert np.allclose(drawn[-1] / 10_000, np.array(weights) / sum(weights), atol=0.01)


def test_each_source_draws_its_samples_in_order_across_schedule_blocks():
    sampler = BlendedSampler([1000, 1000], [0.8, 0.2], seed=0)
    sources, numbers = sampler.locate(np.arange(BLOCK - 500, BLOCK + 500))

    for k in (0, 1):
        mine = numbers[sources == k]
        assert np.array_equal(mine, np.arange(mine[0], mine[0] + len(mine)))


def test_the_blended_sampler_resumes_at_the_same_sample():
    sampler = BlendedSampler([7, 50], [0.3, 0.7], seed=5)
    stream = [i for step in range(40) for i in sampler.global_batch(step * 16, 16)]

    for consumed in (0, 5, 16, 333, 600):
        assert BlendedSampler([7, 50], [0.3, 0.7], seed=5).global_batch(consumed, 640 - consumed) == stream[consumed:]
    first_of_small = [i for i in stream if i < 7][:7]
    assert sorted(first_of_small) == list(range(7))  # an epoch of the small source: each of its samples once
    assert BlendedSampler([7, 50], [0.3, 0.7], seed=6).global_batch(0, 640) != stream


def test_a_blend_of_two_prepared_folders_samples_their_weights_and_resumes(two_folders):
    words, numbers = two_folders
    cfg = blend_config((words, 0.8), (numbers, 0.2))

    assert prepare_training_data(cfg, SEQ_LEN, progress=False) == [words, numbers]
    data = open_training_data(cfg, SEQ_LEN, seed=3)
    ids = data.sampler.global_batch(0, 10_000)

    from_words = sum(i < len(data.train.datasets[0]) for i in ids) / len(ids)
    assert abs(from_words - 0.8) < 0.01
    assert open_training_data(cfg, SEQ_LEN, seed=3).sampler.global_batch(4321, 100) == ids[4321:4421]
    inputs, targets = make_batch(data.train, ids[:4])
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert [source.name for source in data.val] == ["words", "numbers"]


def test_blend_validation_gives_each_source_its_own_batches_and_the_baseline_its_tokens(two_folders):
    words, numbers = two_folders
    data = open_training_data(blend_config((words, 3), (numbers, 1)), SEQ_LEN, seed=0)

    batches = data.validation_batches(eval_batches=8, batch_size=4)

    assert [source for source, _ in batches] == [0] * 6 + [1] * 2
    assert all(len(ids) == 4 and max(ids) < len(data.val[k].dataset) for k, ids in batches)
    assert len(data.validation_targets(batches)) == 8 * 4 * SEQ_LEN
    assert data.validation_batches(eval_batches=1, batch_size=4)[-1][0] == 1  # every source gets a batch
    counts = [np.load(folder / "train.counts.npy") for folder in (words, numbers)]
    expected = (0.75 * counts[0] / counts[0].sum() + 0.25 * counts[1] / counts[1].sum()) * sum(c.sum() for c in counts)
    assert np.allclose(data.unigram_counts, expected) and data.unigram_perplexity(batches) > 1


def test_a_blend_refuses_folders_of_another_tokenizer_or_not_prepared(tmp_path, two_folders):
    words, _ = two_folders
    other = prepare_data(DataConfig(sources=[str(tmp_path / "numbers_corpus")], dir=str(tmp_path / "own"),
                                    vocab_size=280, val_fraction=0.2), progress=False)

    with pytest.raises(ConfigError, match=r"data.blend\[1\].dir: .*another tokenizer"):
        prepare_training_data(blend_config((words, 1), (other, 1)), SEQ_LEN, progress=False)
    with pytest.raises(DataError, match=r"data.blend\[1\].dir\) is not a complete prepared data folder"):
        prepare_training_data(blend_config((words, 1), (tmp_path / "nothing", 1)), SEQ_LEN, progress=False)
    with pytest.raises(ConfigError, match=r"data.blend\[1\].name"):
        open_training_data(blend_config((words, 1), (words, 1)), SEQ_LEN, seed=0)


def test_one_folder_validates_on_a_fixed_prefix_and_takes_the_baseline_from_counts(tmp_path):
    cfg = dataclasses.replace(data_config(tmp_path), val_fraction=0.3)
    prepare_training_data(cfg, SEQ_LEN, progress=False)
    data = open_training_data(cfg, SEQ_LEN, seed=0)
    val = data.val[0].dataset

    batches = data.validation_batches(eval_batches=3, batch_size=4)

    assert batches == [(0, [i % len(val) for i in range(b * 4, b * 4 + 4)]) for b in range(3)]
    stream = data.train.token_file
    targets = data.validation_targets(batches)
    assert data.unigram_perplexity(batches) == pytest.approx(
        unigram_perplexity(stream.tokens(0, stream.num_tokens), targets, data.vocab_size))
