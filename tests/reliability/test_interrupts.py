"""Ctrl-C loses nothing: a first SIGINT checkpoints the step boundary, a second aborts and leaves the last complete
checkpoint valid; a resume after either reproduces the uninterrupted run's losses exactly.

Training runs in a spawned process (`run_distributed`), several trainers one after another, reporting through
files in tmp_path; the signals are sent by the worker to itself from inside a step, so they land mid-run.
"""

import json
import os
import signal

import pytest

from moe_lm import checkpoint as ckpt
from moe_lm.config import load_config
from moe_lm.train.run_dir import LOCK_FILE
from tests.checkpoint.test_checkpoint import losses
from tests.distributed_utils import run_distributed
from tests.train.test_trainer import tiny_overrides

MAX_STEPS = 6
STOP_AT = 3  # both interrupted runs get their first SIGINT during this step


def overrides(root, run, *extra):
    return tiny_overrides(root, f"train.max_steps={MAX_STEPS}", "train.log_interval=1", "train.eval_interval=3",
                          "train.eval_batches=1", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                          "metrics.diagnostics_interval=1000", f"run.dir={root / run}", *extra)


def trainer_for(args):
    from moe_lm.train import Trainer

    return Trainer(load_config("recipes/quickstart.yaml", args), progress=False)


def sigint_during_step(trainer, step):
    """SIGINT to this process during step `step` (mid-run, from inside the loop)."""
    train_step = trainer._train_step

    def step_then_signal(log=True):
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(log=log)
    trainer._train_step = step_then_signal


def sigint_while_saving(tag):
    """SIGINT to this process once DeepSpeed has written one file of checkpoint `tag` (a `.tmp-` directory)."""
    import deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine as engine_module

    save = engine_module.torch.save

    def save_then_signal(obj, path, *args, **kwargs):
        result = save(obj, path, *args, **kwargs)
        if f"{ckpt.TMP_PREFIX}{tag}" in str(path):
            engine_module.torch.save = save
            os.kill(os.getpid(), signal.SIGINT)
        return result
    engine_module.torch.save = save_then_signal


def _interrupt_worker(rank, world, root):
    from moe_lm.train.faults import SecondInterrupt

    trainer_for(overrides(root, "full")).train()
    report = {}

    # one SIGINT with the default train.save_interval=0: only the interrupt's checkpoint exists
    once = trainer_for(overrides(root, "once"))
    sigint_during_step(once, STOP_AT)
    report["once"] = {"summary": once.train(), "cause": once.stop_cause}
    trainer_for(overrides(root, "once", "train.resume=auto")).train()

    # two SIGINTs: the second arrives while the interrupt's own checkpoint (step 3) is being written
    twice = trainer_for(overrides(root, "twice", "train.save_interval=2"))
    sigint_during_step(twice, STOP_AT)
    sigint_while_saving(ckpt.tag_name(STOP_AT))
    try:
        twice.train()
    except SecondInterrupt as exc:
        checkpoints = root / "twice" / "checkpoints"
        report["twice"] = {"error": str(exc), "lock_left": (root / "twice" / LOCK_FILE).exists(),
                           "complete": [p.name for p in ckpt.list_checkpoints(checkpoints)
                                        if not ckpt.validate_checkpoint(p)],
                           "latest": (checkpoints / ckpt.LATEST).read_text(),
                           "partial": sorted(p.name for p in checkpoints.glob(ckpt.TMP_PREFIX + "*")
                                             if not (p / ckpt.MANIFEST).exists())}
    resumed = trainer_for(overrides(root, "twice", "train.resume=auto", "train.save_interval=2"))
    report["twice"]["resumed_from"] = str(resumed.last_checkpoint)
    resumed.train()
    (root / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    run_distributed(_interrupt_worker, 1, root, timeout_s=300)
    return root, json.loads((root / "report.json").read_text())


def test_a_first_sigint_checkpoints_the_step_boundary_and_the_resume_matches_the_uninterrupted_run(runs):
    root, report = runs
    checkpoint = root / "once" / "checkpoints" / ckpt.tag_name(STOP_AT)
    assert report["once"] == {"summary": {"interrupted": True, "steps": STOP_AT, "checkpoint": str(checkpoint)},
                              "cause": "interrupted"}
    assert sorted(losses(root / "full")) == list(range(1, MAX_STEPS + 1))
    assert losses(root / "once") == losses(root / "full")  # same floats, train and validation, every step
    assert not (root / "once" / LOCK_FILE).exists()


def test_a_second_sigint_aborts_mid_save_and_leaves_the_previous_checkpoint_valid(runs):
    root, report = runs
    step2 = root / "twice" / "checkpoints" / ckpt.tag_name(2)
    assert report["twice"]["error"] == (f"second interrupt: aborted without checkpointing; the last complete "
                                        f"checkpoint is {step2}: resume with train.resume=auto")
    assert not report["twice"]["lock_left"]
    # on disk right after the abort: step 2 complete and `latest`, step 3 only a `.tmp-` directory
    assert report["twice"]["complete"] == [ckpt.tag_name(2)] and report["twice"]["latest"] == ckpt.tag_name(2)
    assert report["twice"]["partial"] == [ckpt.TMP_PREFIX + ckpt.tag_name(STOP_AT)]
    assert report["twice"]["resumed_from"] == str(step2)
    assert losses(root / "twice") == losses(root / "full")
    checkpoints = root / "twice" / "checkpoints"
    assert ckpt.validate_checkpoint(checkpoints / ckpt.tag_name(MAX_STEPS)) == []
    assert not list(checkpoints.glob(ckpt.TMP_PREFIX + "*"))  # the resumed run's first save cleared the leftovers
