"""Elastic resume: a ZeRO-0 fp32 run saved with N processes and ep_size=a continues with M processes and ep_size=b,
its Adam state resharded by parameter name (checkpoint.check_compatible / load_checkpoint,
moe_lm/moe/deepspeed_checkpoint.load_optimizer_by_name); and checkpoints of format 1 (the first release).

Both layouts optimise the same objective, so the resumed losses continue the uninterrupted run's up to fp32
summation order: one micro-batch per step, 8 sequences in all (2 processes x 4, or 1 x 8), because the
load-balancing loss pools the tokens of the ranks' current micro-batches; dropless experts, because capacity
drops are decided per rank; no router jitter, whose noise is drawn per rank.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import moe_lm.moe.deepspeed_checkpoint as dsckpt
from moe_lm import checkpoint as ckpt
from tests.checkpoint.test_checkpoint import losses, overrides, trainer_for
from tests.distributed_utils import run_distributed

MAX_STEPS = 6
SAVE_AT = 3
GLOBAL_BATCH = 8


def layout(world):
    """Overrides for `world` processes (ep_size = world) at the same global batch."""
    return (f"parallel.ep_size={world}", f"train.micro_batch_size={GLOBAL_BATCH // world}",
            "train.grad_accum_steps=1", "model.moe.drop_tokens=false", "model.moe.router.jitter_eps=0.0",
            f"train.save_interval={SAVE_AT}", f"train.max_steps={MAX_STEPS}")


def _full_worker(rank, world, root):
    trainer_for(overrides(root, f"full{world}", *layout(world))).train()


def optimizer_by_name(trainer):
    """{global parameter name: {exp_avg, exp_avg_sq, step}} of this rank's optimizer."""
    names = dsckpt.global_param_names(trainer.model)
    optimizer = trainer.client_optimizer
    return {names[id(p)]: {k: v.clone() for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]}


def _resume_worker(rank, world, root, source, name):
    trainer = trainer_for(overrides(root, name, f"train.resume={source}", *layout(world)))
    loaded = optimizer_by_name(trainer)
    lrs = [group["lr"] for group in trainer.client_optimizer.param_groups]
    trainer.train()
    torch.save({"state": loaded, "lrs": lrs, "step": trainer.step}, root / f"{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs with 2 processes (ep_size=2) and 1 process, each checkpointing step 3."""
    root = tmp_path_factory.mktemp("elastic")
    run_distributed(_full_worker, 2, root, timeout_s=300)
    run_distributed(_full_worker, 1, root, timeout_s=300)
    return root


def checkpoint_of(root, world):
    return root / f"full{world}" / "checkpoints" / ckpt.tag_name(SAVE_AT)


def saved_optimizer_by_name(path):
    """The optimizer state of a ZeRO-0 checkpoint by global parameter name, read from its expp_rank files."""
    manifest = ckpt.read_manifest(path)
    layout_ = ckpt.Layout(**manifest["layout"])
    per_rank = layout_.num_experts // layout_.ep_size
    out, lrs = {}, None
    for position in range(layout_.ep_size):
        saved = ckpt.load_file(path / dsckpt.optimizer_file(position))["optimizer"]
        lrs = [group["lr"] for group in saved["param_groups"]]
        ids = range(position * per_rank, (position + 1) * per_rank)
        for group, index in zip(saved["param_groups"], manifest["optimizer_params"]):
            for entry, local in zip(group["params"], index["params"]):
                out[dsckpt.global_name(local, ids)] = saved["state"][entry]
    return out, lrs


def assert_continues(root, resumed, reference, world):
    """Steps 4-6 of `resumed` match `reference` (rel 1e-5), and each rank loaded exactly the saved Adam state of
    the parameters it holds."""
    full, after = losses(root / reference), losses(root / resumed)
    assert sorted(after) == list(range(SAVE_AT + 1, MAX_STEPS + 1))
    for step in after:
        assert after[step][0] == pytest.approx(full[step][0], rel=1e-5), step
    saved, saved_lrs = saved_optimizer_by_name(checkpoint_of(root, 2 if world == 1 else 1))
    seen = set()
    for rank in range(world):
        result = torch.load(root / f"{resumed}_rank{rank}.pt", weights_only=False)
        assert result["step"] == MAX_STEPS and result["lrs"] == saved_lrs
        for name, state in result["state"].items():
            assert state.keys() == saved[name].keys()
            assert all(torch.equal(state[key], saved[name][key]) for key in state), name
        seen |= result["state"].keys()
    assert seen == saved.keys()  # together, the ranks hold every saved parameter's state


def test_the_two_uninterrupted_layouts_agree(runs):
    """The premise of the comparisons below: ep_size=2 on 2 processes trains the same model as 1 process."""
    two, one = losses(runs / "full2"), losses(runs / "full1")
    assert sorted(two) == sorted(one) == list(range(1, MAX_STEPS + 1))
    for step in two:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5), step


def test_two_processes_with_ep_size_2_resume_on_one_process_with_their_optimizer_state(runs):
    run_distributed(_resume_worker, 1, runs, checkpoint_of(runs, 2), "to1", timeout_s=300)
    assert_continues(runs, "to1", "full2", world=1)


def test_one_process_resumes_on_two_processes_with_ep_size_2_with_its_optimizer_state(runs):
    run_distributed(_resume_worker, 2, runs, checkpoint_of(runs, 1), "to2", timeout_s=300)
    assert_continues(runs, "to2", "full1", world=2)


def manifest_and_layouts(runs, **saved_changes):
    path = checkpoint_of(runs, 1)
    manifest = ckpt.read_manifest(path)
    manifest["layout"].update(saved_changes)
    now = ckpt.Layout(**{**ckpt.read_manifest(path)["layout"], "world_size": 2, "ep_size": 2})
    config = json.loads(json.dumps(manifest["config"]))
    config["parallel"]["ep_size"], config["train"]["micro_batch_size"] = 2, GLOBAL_BATCH // 2
    return path, manifest, config, now


@pytest.mark.parametrize("saved_changes, now_changes, reason", [
    ({"zero_stage": 1}, {"zero_stage": 1}, "resharding covers ZeRO-0 only (saved: ZeRO-1, now: ZeRO-1)"),
    ({}, {"zero_stage": 2}, "resharding covers ZeRO-0 only (saved: ZeRO-0, now: ZeRO-2)"),
    ({"bf16": True}, {"bf16": True}, "resharding covers fp32 only (saved: bf16, now: bf16)"),
])
def test_an_optimizer_state_that_cannot_be_resharded_is_refused_with_the_reason(runs, saved_changes, now_changes,
                                                                               reason):
    path, manifest, config, now = manifest_and_layouts(runs, **saved_changes)
    now = dataclasses.replace(now, **now_changes)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_compatible(path, manifest, config, now, weights_only=False)
    message = str(error.value)
    assert reason in message and "world size 1 -> 2" in message and "train.resume_weights_only=true" in message
    assert ckpt.check_compatible(path, manifest, config, now, weights_only=True) is False


def test_a_resharded_resume_at_the_same_global_batch_is_not_reported_as_a_changed_setting(runs, capsys):
    path, manifest, config, now = manifest_and_layouts(runs)
    assert ckpt.check_compatible(path, manifest, config, now, weights_only=False) is True
    err = capsys.readouterr().err
    assert "resharding the optimizer state by parameter name" in err and "not an exact continuation" not in err
    config["train"]["micro_batch_size"] = GLOBAL_BATCH  # the saved micro-batch on twice the ranks: reported
    ckpt.check_compatible(path, manifest, config, now, weights_only=False)
    assert "not an exact continuation: global batch 8 -> 16 sequences" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# format 1 (the first release): numpy RNG state in the model-states file, no optimizer index

def downgrade_to_format_1(path):
    """Rewrite a format-2 checkpoint as the first release wrote it: numpy's RNG state as numpy's own tuple (an
    ndarray inside), format 1 in the client state and the manifest, no `verify` / `optimizer_params`."""
    model_states = path / dsckpt.MODEL_STATES
    state = torch.load(model_states, weights_only=False)
    for rng in state[ckpt.RNG_STATES]:
        n = rng["numpy"]
        rng["numpy"] = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                        n["cached_gaussian"])
    state[ckpt.FORMAT] = 1
    torch.save(state, model_states)
    manifest = ckpt.read_manifest(path)
    manifest["format"] = 1
    del manifest["verify"], manifest["optimizer_params"]
    manifest["files"][dsckpt.MODEL_STATES] = dsckpt.file_entry(model_states, sha256=True)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _format1_worker(rank, world, root, source):
    trainer = trainer_for(overrides(root, "from_format1", f"train.resume={source}", *layout(world)))
    trainer.train()


def test_a_format_1_checkpoint_resumes_exactly_on_its_layout_and_is_refused_for_resharding(runs, tmp_path):
    old = tmp_path / "checkpoints" / ckpt.tag_name(SAVE_AT)
    shutil.copytree(checkpoint_of(runs, 1), old)
    downgrade_to_format_1(old)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(old / dsckpt.MODEL_STATES)

    run_distributed(_format1_worker, 1, tmp_path, old, timeout_s=300)
    full, resumed = losses(runs / "full1"), losses(tmp_path / "from_format1")
    assert resumed == {step: full[step] for step in range(SAVE_AT + 1, MAX_STEPS + 1)}  # exact: same layout

    manifest = ckpt.read_manifest(old)
    now = ckpt.Layout(**{**manifest["layout"], "world_size": 2, "ep_size": 2})
    with pytest.raises(ckpt.CheckpointError, match="it is a format-1 checkpoint, written before moe-lm could "
                                                   "reshard optimizer state by parameter name"):
        ckpt.check_compatible(old, manifest, manifest["config"], now, weights_only=False)
    manifest["format"] = 3
    with pytest.raises(ckpt.CheckpointError, match="is checkpoint format 3; this moe-lm reads formats 1, 2"):
        ckpt.check_compatible(old, manifest, manifest["config"], now, weights_only=False)
