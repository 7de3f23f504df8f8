"""Checkpoints that cannot run code, and what a save records (checkpoint.load_file, save_checkpoint,
moe_lm/moe/deepspeed_checkpoint.py).

The attack: a checkpoint whose pickle calls `open(marker, "w")` when unpickled, with a manifest rewritten to match
(the manifest travels with the files, so an attacker rewrites it too). Resume, export and eval must refuse it,
name the file, and leave no marker.
"""

import hashlib
import json
import shutil
import threading

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

import moe_lm.moe.deepspeed_checkpoint as dsckpt
from moe_lm import checkpoint as ckpt
from moe_lm.cli import main
from tests.checkpoint.test_checkpoint import losses, overrides, trainer_for
from tests.distributed_utils import run_distributed

OPTIMIZER_FILE = dsckpt.optimizer_file(0)


class Plant:
    """Unpickles as `open(path, "w")`: creates `path`. Stands for any code a pickle can run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(checkpoint, name, marker):
    """Add a `Plant` to checkpoint file `name` and rewrite the manifest to match, as an attacker would."""
    file = checkpoint / name
    state = torch.load(file, weights_only=False)
    state["payload"] = Plant(marker)
    torch.save(state, file)
    manifest = ckpt.read_manifest(checkpoint)
    manifest["files"][name] = dsckpt.file_entry(file, sha256=True)
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _train_worker(rank, world, root, extra):
    trainer_for(overrides(root, "run", "train.max_steps=2", "train.eval_interval=100", *extra)).train()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A real 1-process ZeRO-0 checkpoint of step 2."""
    root = tmp_path_factory.mktemp("safety")
    run_distributed(_train_worker, 1, root, (), timeout_s=300)
    return root / "run" / "checkpoints" / ckpt.tag_name(2)


def planted_copy(source, tmp_path, name):
    copy = tmp_path / name.replace(".pt", "") / "checkpoints" / source.name
    shutil.copytree(source, copy)
    marker = tmp_path / f"ran-{name}"
    plant(copy, name, marker)
    return copy, marker


def test_load_file_refuses_a_pickle_that_runs_code_and_trust_is_what_unpickles_it(tmp_path, capsys):
    evil, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save({"weight": torch.ones(2), "payload": Plant(marker)}, evil)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_file(evil)
    message = str(error.value)
    assert message.startswith(f"{evil} holds more than tensors and plain data (Unsupported global: GLOBAL io.open")
    assert "unpickling runs whatever code the file carries" in message and "train.trust_checkpoint=true" in message
    assert not marker.exists()

    loaded = ckpt.load_file(evil, trust=True)  # what train.trust_checkpoint=true means: the code runs
    loaded["payload"].close()
    assert marker.exists() and torch.equal(loaded["weight"], torch.ones(2))
    assert f"train.trust_checkpoint=true: unpickling {evil}" in capsys.readouterr().err


def _planted_resume_worker(rank, world, root, planted, trusted, out):
    refusals = {}
    for name, path in planted.items():
        try:
            trainer_for(overrides(root, f"resume-{name}", f"train.resume={path}"))
            refusals[name] = None
        except ckpt.CheckpointError as exc:
            refusals[name] = str(exc)
    trainer = trainer_for(overrides(root, "trusting"))  # a fresh run, then the trusted load by hand
    state = ckpt.load_checkpoint(trainer.engine, trusted, load_optimizer=True, trust=True)
    torch.save({"refusals": refusals, "trusted_step": state.step}, out)


def test_resume_refuses_a_planted_model_expert_or_optimizer_file_and_runs_none_of_it(source, tmp_path):
    names = [dsckpt.MODEL_STATES, dsckpt.expert_file(1, 2), OPTIMIZER_FILE]
    planted = {name: planted_copy(source, tmp_path, name) for name in names}
    trusted, trusted_marker = planted_copy(source, tmp_path / "trusted", dsckpt.MODEL_STATES)
    run_distributed(_planted_resume_worker, 1, tmp_path, {name: path for name, (path, _) in planted.items()},
                    trusted, tmp_path / "out.pt", timeout_s=300)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, (path, marker) in planted.items():
        message = result["refusals"][name]
        assert message is not None and f"{path / name} holds more than tensors and plain data" in message, name
        assert "unpickling runs whatever code" in message and "train.trust_checkpoint=true" in message
        assert not marker.exists(), name
    assert result["trusted_step"] == 2 and trusted_marker.exists()


def test_export_and_eval_refuse_a_planted_checkpoint(source, tmp_path):
    planted, marker = planted_copy(source, tmp_path, dsckpt.MODEL_STATES)
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit, match=f"{planted / dsckpt.MODEL_STATES} holds more than tensors"):
        main(["export", str(planted), "--out", str(out)])
    with pytest.raises(ckpt.CheckpointError, match="unpickling runs whatever code"):
        ckpt.load_model(planted)  # moe-lm eval
    assert not marker.exists() and not out.exists()
    state, _ = ckpt.consolidated_state_dict(source)  # the real checkpoint exports
    assert len(state) > 0


def test_zero_0_model_states_leave_out_deepspeeds_unread_copy_of_the_optimizer_state(source):
    model_states = ckpt.load_file(source / dsckpt.MODEL_STATES)
    assert "optimizer" in model_states and model_states["optimizer"] is None  # DeepSpeed would write it here too
    assert len(ckpt.load_file(source / OPTIMIZER_FILE)["optimizer"]["state"]) > 0  # the one it loads


def test_a_manifest_that_vouches_for_a_planted_file_does_not_make_it_loadable(source, tmp_path):
    planted, marker = planted_copy(source, tmp_path, dsckpt.expert_file(0, 0))
    assert ckpt.validate_checkpoint(planted) == []  # sizes and hashes match: the manifest is no defence
    with pytest.raises(ckpt.CheckpointError, match="layer_0_expert_0"):
        ckpt.consolidated_state_dict(planted)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# real ZeRO-1/2 files need DeepSpeed's data classes: they load weights-only, and resume exactly

def _zero2_worker(rank, world, root):
    args = ("parallel.ep_size=2", "parallel.zero_stage=2", "train.eval_interval=100", "train.max_steps=3")
    trainer_for(overrides(root, "z2", *args, "train.save_interval=2")).train()
    step2 = root / "z2" / "checkpoints" / ckpt.tag_name(2)
    trainer_for(overrides(root, "z2_resumed", *args, f"train.resume={step2}")).train()


def _planted_zero2_worker(rank, world, root, planted):
    try:
        trainer_for(overrides(root, "z2_planted", "parallel.ep_size=2", "parallel.zero_stage=2",
                              f"train.resume={planted}"))
        refusal = None
    except ckpt.CheckpointError as exc:
        refusal = str(exc)
    torch.save(refusal, root / f"refusal{rank}.pt")


def test_a_zero_2_checkpoint_loads_weights_only_resumes_exactly_and_every_rank_refuses_a_planted_shard(tmp_path):
    run_distributed(_zero2_worker, 2, tmp_path, timeout_s=300)
    step2 = tmp_path / "z2" / "checkpoints" / ckpt.tag_name(2)
    unsafe = set()
    for file in sorted(step2.glob("*.pt")):
        unsafe.update(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        ckpt.load_file(file)  # raises if anything beyond SAFE_GLOBALS were needed
    assert unsafe == {f"{c.__module__}.{c.__qualname__}" for c in dsckpt.SAFE_GLOBALS}
    assert losses(tmp_path / "z2_resumed") == {3: losses(tmp_path / "z2")[3]}

    # expert 3 lives on rank 1 only: rank 0 must not go on into DeepSpeed's load (and its collectives) alone
    planted, marker = planted_copy(step2, tmp_path / "planted", dsckpt.expert_file(1, 3))
    run_distributed(_planted_zero2_worker, 2, tmp_path, planted, timeout_s=300)
    refusals = [torch.load(tmp_path / f"refusal{rank}.pt") for rank in range(2)]
    assert refusals[0] == refusals[1] and refusals[0].startswith(
        f"{planted / dsckpt.expert_file(1, 3)} holds more than tensors and plain data (needs io.open)")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# what a save records: each rank the files it wrote, sha256 or sizes only

class EngineWritingThroughDeepSpeed:
    """Writes the files of a one-process ZeRO-0 layout through a DeepSpeed `TorchCheckpointEngine`, as the real
    engine does, plus one file written around it (as DeepSpeed copies its zero_to_fp32.py)."""

    def __init__(self, layout):
        self.layout = layout
        self.checkpoint_engine = TorchCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = f"{save_dir}/{tag}"
        self.checkpoint_engine.makedirs(folder, exist_ok=True)
        for name in self.layout.required_files():
            self.checkpoint_engine.save({"step": client_state[ckpt.STEP], "x": torch.randn(1000)}, f"{folder}/{name}")
        with open(f"{folder}/notes.txt", "w") as f:
            f.write("written outside the checkpoint engine")


def save(tmp_path, verify, step=1):
    layout = ckpt.Layout(world_size=1, ep_size=1, zero_stage=0, bf16=False, num_experts=2, num_moe_layers=1)
    state = ckpt.TrainingState(step, 4, 0, {"seed": 1, "num_samples": 10},
                               {"model": {}, "train": {"checkpoint_verify": verify}}, layout)
    return ckpt.save_checkpoint(EngineWritingThroughDeepSpeed(layout), tmp_path, state, keep_last=3)


def test_a_save_records_each_file_in_the_thread_that_follows_the_writes(tmp_path, monkeypatch):
    threads = {}
    entry = dsckpt.file_entry

    def recording(path, sha256):
        threads[str(path).rsplit("/", 1)[-1]] = threading.current_thread().name
        return entry(path, sha256)
    monkeypatch.setattr(dsckpt, "file_entry", recording)
    path = save(tmp_path, "sha256")
    manifest = ckpt.read_manifest(path)
    assert manifest["verify"] == "sha256" and manifest["format"] == ckpt.FORMAT_VERSION
    layout = ckpt.Layout(**manifest["layout"])
    assert sorted(manifest["files"]) == sorted([*layout.required_files(), "notes.txt"])
    for name, recorded in manifest["files"].items():
        data = (path / name).read_bytes()
        assert recorded == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    # the engine's files were hashed by the background thread as they were written, not read back afterwards;
    # only the file written around the engine was measured after the save
    assert {name for name, thread in threads.items() if thread.startswith("checkpoint-hash")} == \
        set(manifest["files"]) - {"notes.txt"}
    assert threads["notes.txt"] == threading.main_thread().name


def test_checkpoint_verify_size_records_and_checks_sizes_only(tmp_path):
    path = save(tmp_path, "size")
    manifest = ckpt.read_manifest(path)
    assert manifest["verify"] == "size" and all(set(e) == {"bytes"} for e in manifest["files"].values())
    shard = path / dsckpt.expert_file(0, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.validate_checkpoint(path) == []  # no hash was recorded: a flipped byte goes unseen
    shard.write_bytes(bytes(data[:-1]))
    assert ckpt.validate_checkpoint(path) == [f"{shard} has {len(data) - 1} bytes, the manifest says {len(data)} "
                                              f"(truncated or rewritten)"]


def test_a_sha256_manifest_checked_with_size_skips_the_hashes(tmp_path):
    path = save(tmp_path, "sha256")
    shard = path / dsckpt.expert_file(0, 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert ckpt.validate_checkpoint(path, verify="size") == []
    assert ckpt.validate_checkpoint(path, verify="sha256") == [f"{shard} does not match its sha256 in the manifest "
                                                               f"(corrupt)"]
    assert ckpt.find_checkpoint(str(tmp_path), tmp_path, verify="size") == path  # train.checkpoint_verify=size
    with pytest.raises(ckpt.CheckpointError, match="does not match its sha256"):
        ckpt.find_checkpoint(str(tmp_path), tmp_path)
