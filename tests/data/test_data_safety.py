"""prepare-data loses nothing: files it did not write survive, an edited source is never ignored, a failed or
interrupted rebuild keeps the previous data, and complete, current data is used without writing a byte."""

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from moe_lm.config.schema import ConfigError
from moe_lm.data import prepare, shards
from moe_lm.data.indexed import TMP_MARK
from moe_lm.data.prepare import load_meta, prepare_data
from moe_lm.data.stream import open_split
from tests.data.test_prepare import data_config, decoded_documents, write_corpus

WRITING_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
                  "os.link", "os.symlink", "shutil.rmtree"}
WRITING_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_recorders: list[tuple[str, list[str]]] = []  # (folder, writes seen under it) while a `writes_under` is open


def _record_writes(event, args):
    if not _recorders:
        return
    if event == "open":
        path, mode, flags = args
        writing = bool(flags & WRITING_OPEN_FLAGS) or any(c in (mode or "") for c in "wax+")
    else:
        path, writing = (args[0] if args else None), event in WRITING_EVENTS
    if writing and isinstance(path, (str, os.PathLike)):
        for folder, writes in _recorders:
            if os.path.abspath(path).startswith(folder):
                writes.append(f"{event} {path}")


sys.addaudithook(_record_writes)  # audit hooks cannot be removed: it records only inside `writes_under`


@contextlib.contextmanager
def writes_under(folder: Path):
    """Every attempt to create, change or delete a file under `folder`. Tests run as root, where a read-only
    mode stops no write, so the attempts are caught through Python's audit events instead."""
    writes: list[str] = []
    _recorders.append((str(folder.resolve()), writes))
    try:
        yield writes
    finally:
        _recorders.pop()


@contextlib.contextmanager
def read_only(*folders: Path):
    modes = [folder.stat().st_mode for folder in folders]
    for folder in folders:
        folder.chmod(0o555)
    try:
        yield
    finally:
        for folder, mode in zip(folders, modes):
            folder.chmod(mode)


def all_documents(data_dir):
    return decoded_documents(data_dir, "train") + decoded_documents(data_dir, "val")


def test_a_file_moe_lm_did_not_write_survives_prepare(tmp_path):
    cfg = data_config(tmp_path)
    notes = tmp_path / "data" / "tokenizer" / "NOTES.md"
    notes.parent.mkdir(parents=True)
    notes.write_text("how this tokenizer was made")

    with pytest.raises(ConfigError, match="did not write: tokenizer/NOTES.md. Nothing was changed") as error:
        prepare_data(cfg, progress=False)

    assert error.value.key == "data.dir" and notes.read_text() == "how this tokenizer was made"


def test_a_rebuild_refuses_to_replace_a_folder_holding_a_foreign_file(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    first_meta = load_meta(data_dir)
    (data_dir / "NOTES.md").write_text("mine")

    assert prepare_data(cfg, progress=False) == data_dir  # reuse writes nothing, so a foreign file is no matter
    with pytest.raises(ConfigError, match="did not write: NOTES.md"):
        prepare_data(dataclasses.replace(cfg, vocab_size=280), progress=False)

    assert (data_dir / "NOTES.md").read_text() == "mine" and load_meta(data_dir) == first_meta


def test_added_and_removed_source_files_trigger_a_rebuild(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    first_meta = load_meta(data_dir)
    write_corpus(tmp_path / "corpus", 3, start=40)
    removed = tmp_path / "corpus" / "doc000.txt"
    removed_text = removed.read_text()
    removed.unlink()

    meta = load_meta(prepare_data(cfg, progress=False))
    documents = all_documents(data_dir)

    assert len(documents) == 42 and removed_text not in documents
    assert (tmp_path / "corpus" / "doc042.txt").read_text() in documents
    assert meta["fingerprint"]["sources"] != first_meta["fingerprint"]["sources"]
    assert meta["fingerprint"]["config"] == first_meta["fingerprint"]["config"]


def test_an_edit_that_keeps_size_and_mtime_triggers_a_rebuild(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    edited = tmp_path / "corpus" / "doc007.txt"
    before = edited.stat()
    new_text = edited.read_text().swapcase()
    edited.write_text(new_text)
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))

    prepare_data(cfg, progress=False)

    assert edited.stat().st_size == before.st_size and new_text in all_documents(data_dir)


def test_a_failed_rebuild_leaves_the_previous_data_in_place(tmp_path, monkeypatch):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    first_meta, first_documents = load_meta(data_dir), all_documents(data_dir)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.TokenWriter, "add", disk_full)
    with pytest.raises(ValueError, match=f"cannot build the prepared data in {data_dir}: .*No space left"):
        prepare_data(dataclasses.replace(cfg, vocab_size=280), progress=False)

    assert load_meta(data_dir) == first_meta and all_documents(data_dir) == first_documents
    # the partial build stays for a resume, without the files the failure left half-written
    partial = tmp_path / ".data.partial"
    assert not any(TMP_MARK in p.name for p in partial.rglob("*")) and not (partial / "train-00000.bin").exists()


def test_a_swap_interrupted_between_its_renames_is_undone(tmp_path, monkeypatch):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    first_meta = load_meta(data_dir)
    os.replace(data_dir, tmp_path / ".data.previous")  # the state a crash after the first rename leaves

    monkeypatch.setattr(prepare, "_open_partial", lambda *args: pytest.fail("the restored data is current: no rebuild"))
    assert load_meta(prepare_data(cfg, progress=False)) == first_meta
    assert not (tmp_path / ".data.previous").exists()


def test_complete_current_data_is_used_without_writing(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    with read_only(data_dir, data_dir / "tokenizer", tmp_path), writes_under(tmp_path) as writes:
        assert prepare_data(cfg, seq_len=8, progress=False) == data_dir

    assert writes == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == files
    assert open_split(data_dir, "train").num_tokens == load_meta(data_dir)["train"]["tokens"]


def test_a_truncated_token_file_is_rebuilt(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    tokens = open_split(data_dir, "train").tokens(0, 100).copy()
    with open(data_dir / "train-00000.bin", "r+b") as token_file:
        token_file.truncate(10)

    prepare_data(cfg, progress=False)

    assert (open_split(data_dir, "train").tokens(0, 100) == tokens).all()


def test_a_gone_source_falls_back_to_the_data_prepared_from_it(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = prepare_data(cfg, progress=False)
    first_meta = load_meta(data_dir)
    shutil.rmtree(tmp_path / "corpus")

    with pytest.warns(UserWarning, match=f"corpus' does not exist.*: using the data prepared from it in {data_dir}"):
        prepare_data(cfg, progress=False)
    assert load_meta(data_dir) == first_meta
    with pytest.raises(ConfigError, match="data.sources"):  # another config cannot be built from a gone source
        prepare_data(dataclasses.replace(cfg, vocab_size=280), progress=False)


def test_a_folder_from_format_1_is_replaced_but_not_a_file_added_to_it(tmp_path):
    cfg = data_config(tmp_path)
    data_dir = tmp_path / "data"
    (data_dir / "tokenizer").mkdir(parents=True)
    for name in (".prepare.lock", "train.bin", "train.idx", "val.bin", "val.idx", "tokenizer/tokenizer.json"):
        (data_dir / name).write_bytes(b"")
    (data_dir / "meta.json").write_text(json.dumps({"format_version": 1, "fingerprint": "0" * 32}))
    (data_dir / "tokenizer" / "README").write_text("mine")

    with pytest.raises(ConfigError, match="did not write: tokenizer/README. Nothing"):
        prepare_data(cfg, progress=False)
    (data_dir / "tokenizer" / "README").unlink()

    assert load_meta(prepare_data(cfg, progress=False))["format_version"] == prepare.FORMAT_VERSION
    assert not (data_dir / ".prepare.lock").exists()
