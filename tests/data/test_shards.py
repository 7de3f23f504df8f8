"""Sharded preparation: n jobs give the data of one, a crash resumes at shard granularity, duplicates are dropped
across shards, validation is capped by hash, and the stored token counts are those of the training split."""

import dataclasses
import multiprocessing

import numpy as np
import pytest

from moe_lm.data import prepare
from moe_lm.data.errors import DataError
from moe_lm.data.prepare import index_data, load_meta, prepare_data, prepare_shards
from moe_lm.data.shards import digest, plan_shards, tokenizer_sample, val_threshold
from moe_lm.data.stream import load_unigram_counts, open_split
from tests.data.test_prepare import data_config, decoded_documents

SMALL_SHARDS = 1500  # bytes: the 40-document test corpus makes about 5 shards


def all_tokens(data_dir, split):
    stream = open_split(data_dir, split)
    return stream.tokens(0, stream.num_tokens).copy()


def assert_same_data(one, other):
    for split in ("train", "val"):
        assert np.array_equal(all_tokens(one, split), all_tokens(other, split))
    assert np.array_equal(load_unigram_counts(one), load_unigram_counts(other))
    drop = ("files", "prepare_seconds", "seconds")
    assert {k: v for k, v in load_meta(one).items() if k not in drop} == {
        k: v for k, v in load_meta(other).items() if k not in drop}


def assert_counts_are_the_training_tokens(data_dir):
    counts = load_unigram_counts(data_dir)
    assert np.array_equal(np.bincount(all_tokens(data_dir, "train").astype(np.int64), minlength=len(counts)), counts)


def run_job(cfg, job, jobs):
    prepare_shards(cfg, job, jobs, progress=False)


def test_two_shard_jobs_then_indexing_give_the_one_process_data(tmp_path):
    one = prepare_data(data_config(tmp_path, dir=str(tmp_path / "one"), shard_bytes=SMALL_SHARDS), progress=False)
    cfg = data_config(tmp_path, dir=str(tmp_path / "two"), shard_bytes=SMALL_SHARDS)
    assert len(plan_shards(cfg)) >= 4

    jobs = [multiprocessing.get_context("fork").Process(target=run_job, args=(cfg, job, 2)) for job in range(2)]
    for process in jobs:
        process.start()
    for process in jobs:
        process.join()
    assert [process.exitcode for process in jobs] == [0, 0]
    two = index_data(cfg, progress=False)  # the last job to finish indexed already: nothing left to do

    assert_same_data(one, two)
    assert_counts_are_the_training_tokens(two)
    assert load_meta(two)["shards"] == len(plan_shards(cfg))


def test_indexing_waits_for_every_shard_and_the_last_job_indexes(tmp_path):
    cfg = data_config(tmp_path, shard_bytes=SMALL_SHARDS)

    assert prepare_shards(cfg, 0, 2, progress=False) is None  # shards of job 1 are missing: no index yet
    with pytest.raises(DataError, match=r"shards of .* are not prepared yet \(00001, 00003"):
        index_data(cfg, progress=False)
    assert not (tmp_path / "data").exists()

    assert prepare_shards(cfg, 1, 2, seq_len=8, progress=False) == tmp_path / "data"
    assert_same_data(tmp_path / "data",
                     prepare_data(dataclasses.replace(cfg, dir=str(tmp_path / "one")), progress=False))


def test_worker_processes_tokenize_like_one_process(tmp_path):
    one = prepare_data(data_config(tmp_path, dir=str(tmp_path / "one"), num_proc=1), progress=False)
    two = prepare_data(data_config(tmp_path, dir=str(tmp_path / "two"), num_proc=2), progress=False)

    assert_same_data(one, two)


def test_an_interrupted_preparation_resumes_at_the_first_missing_shard(tmp_path, monkeypatch):
    cfg = data_config(tmp_path, shard_bytes=SMALL_SHARDS)
    built = []
    build_shard = prepare.build_shard

    def crash_at_shard_2(cfg, number, *args):
        if number == 2 and not built.count(2):
            built.append(number)
            raise OSError(5, "Input/output error")
        built.append(number)
        return build_shard(cfg, number, *args)

    monkeypatch.setattr(prepare, "build_shard", crash_at_shard_2)
    with pytest.raises(DataError, match="Input/output error"):
        prepare_data(cfg, progress=False)
    assert built == [0, 1, 2] and not (tmp_path / "data").exists()

    prepare_data(cfg, progress=False)

    assert built == [0, 1, 2] + list(range(2, len(plan_shards(cfg))))  # shards 0 and 1 were not prepared again
    assert_same_data(tmp_path / "data", prepare_data(dataclasses.replace(cfg, dir=str(tmp_path / "fresh")),
                                                     progress=False))


def test_a_new_config_discards_the_shards_of_an_interrupted_build(tmp_path, monkeypatch):
    cfg = data_config(tmp_path, shard_bytes=SMALL_SHARDS)
    monkeypatch.setattr(prepare, "_index", lambda *args: pytest.fail("stop before indexing"))
    with pytest.raises(pytest.fail.Exception):
        prepare_data(cfg, progress=False)
    monkeypatch.undo()
    assert (tmp_path / ".data.partial" / "train-00000.bin").is_file()

    other = dataclasses.replace(cfg, vocab_size=280)  # another tokenizer: the shards above cannot be reused
    assert_same_data(prepare_data(other, progress=False),
                     prepare_data(dataclasses.replace(other, dir=str(tmp_path / "fresh")), progress=False))


def test_copies_in_later_shards_are_dropped_and_the_first_stays(tmp_path):
    cfg = data_config(tmp_path, shard_bytes=SMALL_SHARDS)
    corpus = tmp_path / "corpus"
    copied = [corpus / "doc001.txt", corpus / "doc005.txt"]  # one of each split, whatever the hash says
    copied += [next(p for p in sorted(corpus.iterdir()) if is_val_document(p.read_text(), cfg))]
    for number, path in enumerate(copied):
        (corpus / f"zz_copy{number}.txt").write_text(path.read_text())  # sorted last: in the last shard

    data_dir = prepare_data(cfg, progress=False)
    meta = load_meta(data_dir)
    documents = decoded_documents(data_dir, "train") + decoded_documents(data_dir, "val")

    assert len(plan_shards(cfg)) >= 4 and meta["duplicate_documents_removed"] == 3
    assert sorted(documents) == sorted(path.read_text() for path in corpus.iterdir() if "copy" not in path.name)
    assert meta["bytes"] == sum(len(d.encode()) for d in documents)
    assert_counts_are_the_training_tokens(data_dir)


def test_max_val_tokens_keeps_the_lowest_hash_validation_documents(tmp_path):
    full = prepare_data(data_config(tmp_path, dir=str(tmp_path / "full"), val_fraction=0.5), progress=False)
    val_documents = decoded_documents(full, "val")
    cap = open_split(full, "val").num_tokens // 3
    capped_cfg = data_config(tmp_path, dir=str(tmp_path / "capped"), val_fraction=0.5, max_val_tokens=cap,
                             shard_bytes=SMALL_SHARDS)

    capped = prepare_data(capped_cfg, progress=False)
    kept, trained = decoded_documents(capped, "val"), decoded_documents(capped, "train")

    by_hash = sorted(val_documents, key=lambda text: digest(text.encode())[:8][::-1])
    assert 0 < open_split(capped, "val").num_tokens <= cap
    assert kept == by_hash[:len(kept)]  # the lowest hashes, in hash order across shards
    assert sorted(kept + trained) == sorted(val_documents + decoded_documents(full, "train"))
    assert load_meta(capped)["val_documents_trained"] == len(val_documents) - len(kept)
    assert_counts_are_the_training_tokens(capped)


def test_a_cap_below_one_document_keeps_one(tmp_path):
    data_dir = prepare_data(data_config(tmp_path, max_val_tokens=1), progress=False)

    assert load_meta(data_dir)["val"]["documents"] == 1


def test_the_tokenizer_sample_is_bounded_training_text_from_every_shard(tmp_path):
    cfg = data_config(tmp_path, shard_bytes=SMALL_SHARDS, tokenizer_sample_bytes=1000)
    shards = plan_shards(cfg)
    train_texts = [[text for text in (open(p.path).read() for p in shard) if not is_val_document(text, cfg)]
                   for shard in shards]

    sample = list(tokenizer_sample(cfg, shards))

    assert sum(len(text.encode()) for text in sample) <= 1000
    assert all(any(document.startswith(text) for texts in train_texts for document in texts) for text in sample)
    assert all(any(texts[0].startswith(text) for text in sample) for texts in train_texts)  # each shard's first


def is_val_document(text, cfg):
    return int.from_bytes(digest(text.encode())[:8], "little") < val_threshold(cfg.val_fraction)


def test_max_bytes_reads_the_corpus_as_one_shard_and_stops_exactly_there(tmp_path):
    cfg = data_config(tmp_path, shard_bytes=SMALL_SHARDS, max_bytes=2000)

    meta = load_meta(prepare_data(cfg, progress=False))

    assert len(plan_shards(cfg)) == 1 and meta["shards"] == 1 and meta["bytes"] == 2000
