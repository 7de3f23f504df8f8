"""Checkpoints, exact resume and fault tolerance: moe_lm/checkpoint/store.py, train/faults.py and the trainer's use of
them.

Training runs in spawned processes (`run_distributed`), never in the pytest process, because the trainer
initialises torch.distributed. A worker can run several trainers one after another in its process group; workers
report through JSON/torch files in tmp_path. Checkpoint validation and lookup also work without a process group,
so the corruption tests run in-process on copies of checkpoints made by a fixture.
"""

import json
import os
import shutil
import signal

import pytest
import torch

import moe_lm.moe.deepspeed_checkpoint as dsckpt
from moe_lm import checkpoint as ckpt
from moe_lm.config import load_config
from tests.distributed_utils import run_distributed

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
MAX_STEPS = 6
STOP_AT = 3  # the interrupted run gets SIGTERM during this step and checkpoints at its end


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        body = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40 + i % 13))
        (folder / f"doc{i:03d}.txt").write_text(f"# document {i}\n{body}\n")


def overrides(root, run, *extra):
    """A tiny model on a tiny corpus under `root`; every run of a test shares the prepared data."""
    write_corpus(root / "corpus")
    return [f"data.sources=[{root / 'corpus'}]", f"data.dir={root / 'data'}", "data.vocab_size=300",
            "data.val_fraction=0.1", "model.vocab_size=300", "model.seq_len=32", "model.d_model=32",
            "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.moe.num_experts=4", "model.moe.top_k=2",
            # router state (expert bias) and router randomness (jitter) that an exact resume must restore
            "model.moe.router.bias_update_rate=0.01", "model.moe.router.jitter_eps=0.1",
            f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=2", "train.grad_accum_steps=2",
            "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=3", "train.eval_batches=1",
            "train.save_interval=2", "metrics.diagnostics_interval=1000", "wandb.mode=disabled",
            f"run.dir={root / run}", *extra]


def trainer_for(args):
    from moe_lm.train import Trainer

    return Trainer(load_config(None, args), progress=False)


def record_batches(trainer):
    """Record the sample ids of every global batch the trainer draws (the data order)."""
    trainer.batches = []
    draw = trainer.sampler.global_batch

    def recording(consumed, size):
        ids = draw(consumed, size)
        trainer.batches.append(ids)
        return ids
    trainer.sampler.global_batch = recording


def signal_at(trainer, step, sig):
    """Send `sig` to this process during step `step` (mid-run, from inside the loop)."""
    train_step = trainer._train_step

    def step_then_signal(log=True):
        if trainer.step + 1 == step:
            os.kill(os.getpid(), sig)
        return train_step(log=log)
    trainer._train_step = step_then_signal


def losses(run_dir):
    """{step: (train loss, val loss or None)} from metrics.jsonl, the last row of each step winning."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = (row["train/loss"], row.get("val/loss"))
    return rows


def local_experts(trainer):
    """{(moe layer, global expert id): {name: tensor}} of this rank's experts."""
    out = {}
    for layer, moe in enumerate(trainer.model.moe_layers()):
        for expert, global_id in zip(moe.local_experts, moe.global_expert_ids):
            out[(layer, global_id)] = {name: p.detach().clone() for name, p in expert.named_parameters()}
    return out


def _exact_resume_worker(rank, world, root, extra):
    """Run A: MAX_STEPS uninterrupted. Run B: SIGTERM (to rank 0 only) during step STOP_AT, then resumed."""
    full = trainer_for(overrides(root, "full", *extra))
    record_batches(full)
    full.train()

    interrupted = trainer_for(overrides(root, "resumed", *extra))
    record_batches(interrupted)
    if rank == 0:
        signal_at(interrupted, STOP_AT, signal.SIGTERM)
    stopped = interrupted.train()

    resumed = trainer_for(overrides(root, "resumed", "train.resume=auto", *extra))
    resumed_from = str(resumed.last_checkpoint)
    loaded = local_experts(resumed)
    bias = [moe.router.balance_bias_E.clone() for moe in resumed.model.moe_layers()]
    record_batches(resumed)
    summary = resumed.train()
    torch.save({"stopped": stopped, "resumed_from": resumed_from, "summary": summary,
                "batches_full": full.batches, "batches_resumed": interrupted.batches + resumed.batches,
                "loaded_experts": loaded, "loaded_bias": bias}, root / f"result{rank}.pt")


@pytest.fixture(scope="module")
def ep1_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep1")
    run_distributed(_exact_resume_worker, 1, root, (), timeout_s=300)
    return root


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep2")
    run_distributed(_exact_resume_worker, 2, root, ("parallel.ep_size=2",), timeout_s=300)
    return root


def assert_exact_resume(root, world):
    full, resumed = losses(root / "full"), losses(root / "resumed")
    assert sorted(full) == list(range(1, MAX_STEPS + 1))
    assert resumed == full  # same floats, train and validation, every step
    for rank in range(world):
        result = torch.load(root / f"result{rank}.pt", weights_only=False)
        assert result["stopped"] == {"interrupted": True, "steps": STOP_AT,
                                     "checkpoint": str(root / "resumed" / "checkpoints" / "step_00000003")}
        assert result["resumed_from"].endswith("step_00000003")
        assert result["batches_resumed"] == result["batches_full"]  # the data order
        assert result["summary"]["steps"] == MAX_STEPS
    # the final weights, experts and router buffers included, are the same tensors
    final_full = ckpt.find_checkpoint(str(root / "full"), root / "full")
    final_resumed = ckpt.find_checkpoint(str(root / "resumed"), root / "resumed")
    for name in [dsckpt.MODEL_STATES, dsckpt.expert_file(1, 3)]:
        a = torch.load(final_full / name, weights_only=False)
        b = torch.load(final_resumed / name, weights_only=False)
        a, b = a.get("module", a), b.get("module", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_mid_run_then_resume_reproduces_the_uninterrupted_losses_exactly(ep1_runs):
    assert_exact_resume(ep1_runs, world=1)
    run = ep1_runs / "resumed"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    # keep_last=3: steps 2, 3 (the signal), 4, 6 were saved; the oldest went
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == \
        ["step_00000006", "step_00000004", "step_00000003"]
    manifest = ckpt.read_manifest(run / "checkpoints" / "step_00000006")
    assert manifest["step"] == 6 and manifest["layout"]["ep_size"] == 1
    assert dsckpt.expert_file(0, 3) in manifest["files"] and len(manifest["files"][dsckpt.MODEL_STATES]["sha256"]) == 64


def test_exact_resume_with_two_processes_and_ep_size_2(ep2_runs):
    assert_exact_resume(ep2_runs, world=2)


def test_each_rank_loads_the_experts_saved_for_its_global_ids_with_ep_size_2(ep2_runs):
    """The known silent failure (DeepSpeed #6589, megablocks #160): every rank loading the same experts."""
    step3 = ep2_runs / "resumed" / "checkpoints" / "step_00000003"
    seen = {}
    for rank in range(2):
        result = torch.load(ep2_runs / f"result{rank}.pt", weights_only=False)
        loaded = result["loaded_experts"]
        assert sorted(loaded) == [(layer, 2 * rank + i) for layer in range(2) for i in range(2)]
        for (layer, global_id), params in loaded.items():
            shard = torch.load(step3 / dsckpt.expert_file(layer, global_id), weights_only=True)
            prefix = f"blocks.{layer}.ffn.deepspeed_moe.experts.deepspeed_experts.{global_id}."
            assert sorted(shard) == sorted(prefix + name for name in params)
            for name, tensor in params.items():
                assert torch.equal(tensor, shard[prefix + name])
            seen[(layer, global_id)] = params["w1.weight"]
        # the router's expert bias (a buffer, in the non-expert file) came back too
        module = torch.load(step3 / dsckpt.MODEL_STATES, weights_only=False)["module"]
        for layer, bias in enumerate(result["loaded_bias"]):
            saved = module[f"blocks.{layer}.ffn.deepspeed_moe.gate.router.balance_bias_E"]
            assert torch.equal(bias, saved) and bias.abs().sum() > 0
    assert len(seen) == 8  # 2 layers x 4 global experts, all different
    weights = list(seen.values())
    assert all(not torch.equal(weights[i], weights[j]) for i in range(8) for j in range(i + 1, 8))


def _layout_change_worker(rank, world, root, source, out):
    resharded = trainer_for(overrides(root, "ep1", f"train.resume={source}"))
    trainer = trainer_for(overrides(root, "ep1", f"train.resume={source}", "train.resume_weights_only=true"))
    torch.save({"resharded_state": len(resharded.client_optimizer.state),
                "params": sum(1 for _ in resharded.model.parameters()), "step": trainer.step,
                "consumed": trainer.consumed_samples, "experts": local_experts(trainer),
                "optimizer_state": len(trainer.client_optimizer.state)}, out)


def test_layout_change_reshards_the_optimizer_state_or_drops_it_with_weights_only(ep2_runs, tmp_path):
    """An ep_size=2 / world-2 checkpoint resumed by one process with ep_size=1 (ZeRO-0, fp32): the optimizer state
    follows by parameter name (tests/checkpoint/test_elastic_resume.py checks the values), or, with
    train.resume_weights_only, starts fresh."""
    source = ep2_runs / "resumed" / "checkpoints" / "step_00000003"
    run_distributed(_layout_change_worker, 1, ep2_runs, source, tmp_path / "out.pt", timeout_s=180)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert result["resharded_state"] == result["params"]  # every parameter got its Adam state
    assert result["step"] == 3 and result["consumed"] == 3 * 2 * 2 * 2  # progress kept: steps x mbs x accum x world
    assert result["optimizer_state"] == 0  # a fresh optimizer
    assert sorted(result["experts"]) == [(layer, e) for layer in range(2) for e in range(4)]
    for (layer, global_id), params in result["experts"].items():
        shard = torch.load(source / dsckpt.expert_file(layer, global_id), weights_only=True)
        prefix = f"blocks.{layer}.ffn.deepspeed_moe.experts.deepspeed_experts.{global_id}."
        assert all(torch.equal(t, shard[prefix + name]) for name, t in params.items())


def _zero_stage_change_worker(rank, world, root):
    """A ZeRO-2 run of MAX_STEPS, then ZeRO-1 runs resumed from its step-4 checkpoint: with the optimizer state, and
    with weights only."""
    trainer_for(overrides(root, "zero2", "parallel.zero_stage=2")).train()
    source = root / "zero2" / "checkpoints" / "step_00000004"
    trainer_for(overrides(root, "zero1", "parallel.zero_stage=1", f"train.resume={source}")).train()
    trainer_for(overrides(root, "zero1_weights", "parallel.zero_stage=1", f"train.resume={source}",
                          "train.resume_weights_only=true")).train()


def test_a_zero2_checkpoint_resumes_under_zero1_with_its_optimizer_state(tmp_path):
    """ZeRO-1 and ZeRO-2 write the same optimizer partitions, so a run begun under ZeRO-2 (the GPU recipes' stage
    before ZeRO-1) continues under ZeRO-1 as it would have: one process, fp32, the same gradients either way."""
    run_distributed(_zero_stage_change_worker, 1, tmp_path, timeout_s=300)
    full, resumed, fresh = (losses(tmp_path / run) for run in ("zero2", "zero1", "zero1_weights"))
    assert sorted(resumed) == sorted(fresh) == [5, 6]
    assert resumed == {step: full[step] for step in (5, 6)}  # same floats, train and validation
    assert fresh[6] != full[6]  # what a fresh Adam state gives instead


def _kill_while_saving_worker(rank, world, root):
    """SIGKILL this process between two expert-shard writes of the step-4 checkpoint."""
    import deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine as engine_module

    save, written = engine_module.torch.save, []

    def save_then_die(obj, path, *args, **kwargs):
        if ".tmp-step_00000004" in str(path) and "expert" in str(path):
            if written:
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(path)
        return save(obj, path, *args, **kwargs)
    engine_module.torch.save = save_then_die
    trainer_for(overrides(root, "run")).train()


def _resume_worker(rank, world, root, out):
    trainer = trainer_for(overrides(root, "run", "train.resume=auto"))
    resumed_from = str(trainer.last_checkpoint)
    summary = trainer.train()
    torch.save({"resumed_from": resumed_from, "summary": summary}, out)


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_previous_complete_one(tmp_path):
    with pytest.raises(Exception, match="SIGKILL"):
        run_distributed(_kill_while_saving_worker, 1, tmp_path, timeout_s=180)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step_00000002"]
    partial = checkpoints / ".tmp-step_00000004"
    assert (partial / dsckpt.expert_file(0, 0)).is_file() and not (partial / ckpt.MANIFEST).exists()

    run_distributed(_resume_worker, 1, tmp_path, tmp_path / "out.pt", timeout_s=180)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert result["resumed_from"].endswith("step_00000002") and result["summary"]["steps"] == MAX_STEPS
    assert not partial.exists()  # the next save cleared it
    assert ckpt.validate_checkpoint(checkpoints / "step_00000006") == []


def copy_run(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target / "checkpoints"


def test_a_truncated_expert_shard_is_named_and_resume_falls_back(ep1_runs, tmp_path, capsys):
    checkpoints = copy_run(ep1_runs / "resumed", tmp_path)
    newest = checkpoints / "step_00000006"
    shard = newest / dsckpt.expert_file(1, 2)
    shard.write_bytes(shard.read_bytes()[:1000])
    problems = ckpt.validate_checkpoint(newest)
    size = ckpt.read_manifest(newest)["files"][shard.name]["bytes"]
    assert problems == [f"{shard} has 1000 bytes, the manifest says {size} (truncated or rewritten)"]

    assert ckpt.find_checkpoint("auto", tmp_path / "run") == checkpoints / "step_00000004"
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: {shard} has 1000 bytes" in err
    assert f"falling back to {checkpoints / 'step_00000004'}" in err

    # an explicitly named corrupt checkpoint is an error, not a fallback
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.find_checkpoint(str(newest), tmp_path / "run")
    # and a fresh run must not write its checkpoints among those of an earlier run
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints .* set train.resume=auto"):
        ckpt.find_checkpoint("", tmp_path / "run")


def test_missing_or_corrupt_files_are_named_and_no_complete_checkpoint_stops_the_run(ep1_runs, tmp_path):
    checkpoints = copy_run(ep1_runs / "resumed", tmp_path)
    step6, step4, step3 = (checkpoints / f"step_0000000{s}" for s in (6, 4, 3))
    (step6 / dsckpt.expert_file(0, 1)).unlink()
    optim = step4 / "expp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the hash sees it
    optim.write_bytes(bytes(data))
    (step3 / ckpt.MANIFEST).unlink()

    assert ckpt.validate_checkpoint(step6) == [f"{step6 / dsckpt.expert_file(0, 1)} is missing"]
    assert ckpt.validate_checkpoint(step4) == [f"{optim} does not match its sha256 in the manifest (corrupt)"]
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.find_checkpoint("auto", tmp_path / "run")
    message = str(error.value)
    assert "no complete checkpoint" in message and "Not starting from scratch" in message
    for name in (dsckpt.expert_file(0, 1), optim.name, ckpt.MANIFEST):
        assert name in message


def test_auto_resume_without_checkpoints_starts_fresh_and_an_empty_explicit_path_is_an_error(tmp_path, capsys):
    assert ckpt.find_checkpoint("", tmp_path) is None
    (tmp_path / "checkpoints" / ".tmp-step_00000002").mkdir(parents=True)
    assert ckpt.find_checkpoint("auto", tmp_path) is None
    assert "(ignoring incomplete .tmp-step_00000002); starting from scratch" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.find_checkpoint(str(tmp_path), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="never completed"):
        ckpt.find_checkpoint(str(tmp_path / "checkpoints" / ".tmp-step_00000002"), tmp_path)


class FileWritingEngine:
    """Stands in for DeepSpeed's engine: writes the files of a one-process ZeRO-0 layout (minus `skip`)."""

    def __init__(self, layout, skip=()):
        self.layout, self.skip = layout, skip

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours to write, atomically and last
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        for name in self.layout.required_files():
            if name not in self.skip:
                torch.save({"step": client_state[ckpt.STEP]}, os.path.join(folder, name))


def save_steps(tmp_path, steps, keep_last, engine=None):
    layout = ckpt.Layout(world_size=1, ep_size=1, zero_stage=0, bf16=False, num_experts=2, num_moe_layers=1)
    engine = engine or FileWritingEngine(layout)
    for step in steps:
        state = ckpt.TrainingState(step, 4 * step, 0, {"seed": 1, "num_samples": 10}, {"model": {}}, layout)
        ckpt.save_checkpoint(engine, tmp_path, state, keep_last)
    return layout


def test_saves_rotate_and_a_rollback_sets_the_abandoned_branch_aside(tmp_path, capsys):
    save_steps(tmp_path, [1, 2, 3, 4], keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]
    assert (tmp_path / "latest").read_text() == "step_00000004"
    assert ckpt.validate_checkpoint(tmp_path / "step_00000004") == []

    # a run resumed from step 2 (say, a rollback after a divergence) saves step 3 again, then step 4 ...
    save_steps(tmp_path, [3], keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003"]  # the new one, kept
    aside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("abandoned-"))
    assert len(aside) == 1 and aside[0].startswith("abandoned-step_00000004-")
    assert "it is ahead of this run" in capsys.readouterr().err
    assert torch.load(tmp_path / "step_00000003" / dsckpt.MODEL_STATES)["step"] == 3


def test_a_save_missing_a_shard_after_every_rank_wrote_is_an_error_and_changes_nothing(tmp_path):
    layout = save_steps(tmp_path, [1], keep_last=3)
    broken = FileWritingEngine(layout, skip={dsckpt.expert_file(0, 1)})
    with pytest.raises(ckpt.CheckpointError, match="layer_0_expert_1"):
        save_steps(tmp_path, [2], keep_last=3, engine=broken)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert (tmp_path / "latest").read_text() == "step_00000001"


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / ckpt.tag_name(step)).mkdir()
        (tmp_path / ckpt.tag_name(step) / ckpt.MANIFEST).write_text("{}")
    (tmp_path / ckpt.tag_name(5)).mkdir()  # no manifest: not complete, not counted, left alone
    deleted = ckpt.rotate(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000002", "step_00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]


def _nan_worker(rank, world, root, out):
    """NaN final hidden states (so NaN logits) at steps 3, 5 and 6 with train.max_bad_steps=2."""
    from moe_lm.train.faults import TrainingDiverged

    trainer = trainer_for(overrides(root, "run", "train.save_interval=1", "train.max_bad_steps=2"))
    trainer.model.norm.register_forward_hook(
        lambda module, inputs, output: output * float("nan") if trainer.step + 1 in (3, 5, 6) else output)
    snapshots = {}
    train_step = trainer._train_step

    def step_and_snapshot(log=True):
        metrics = train_step(log=log)
        snapshots[trainer.step] = {"params": [p.detach().clone() for p in trainer.model.parameters()],
                                   "lr_epoch": trainer.scheduler.last_epoch,
                                   "skipped": trainer.engine.skipped_steps}
        return metrics
    trainer._train_step = step_and_snapshot
    with pytest.raises(TrainingDiverged) as error:
        trainer.train()
    torch.save({"error": str(error.value), "snapshots": snapshots}, out)


def test_nan_steps_are_skipped_and_counted_and_a_bad_streak_stops_the_run(tmp_path):
    run_distributed(_nan_worker, 1, tmp_path, tmp_path / "out.pt", timeout_s=180)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    snaps = result["snapshots"]
    assert sorted(snaps) == [1, 2, 3, 4, 5]  # step 6 raised
    assert all(torch.equal(a, b) for a, b in zip(snaps[2]["params"], snaps[3]["params"]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snaps[3]["params"], snaps[4]["params"]))
    assert [snaps[s]["lr_epoch"] for s in (2, 3, 4)] == [2, 2, 3]  # the LR schedule waits on a skipped step
    assert snaps[5]["skipped"] == 2  # DeepSpeed's own count agrees
    checkpoints = tmp_path / "run" / "checkpoints"
    assert "steps 5-6" in result["error"] and "train.max_bad_steps=2" in result["error"]
    assert str(checkpoints / "step_00000004") in result["error"]
    # no checkpoint from a bad state: 3, 5 and 6 were never saved; the last good one is intact
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step_00000004", "step_00000002",
                                                                    "step_00000001"]
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert ckpt.validate_checkpoint(checkpoints / "step_00000004") == []
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = {json.loads(line)["step"]: json.loads(line) for line in lines}
    assert [rows[s]["train/skipped_steps"] for s in (2, 3, 4, 5)] == [0, 1, 1, 2] and 6 not in rows
    assert rows[3]["train/loss"] != rows[3]["train/loss"]  # NaN, logged as such
