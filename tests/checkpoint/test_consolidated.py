"""Consolidated weights (moe_lm/checkpoint/consolidated.py): one state dict and one safetensors file with every
expert keyed by its global id and the config in the header, and the ep_size=1 model rebuilt from either."""

import json

import pytest
import torch
from safetensors import safe_open

import moe_lm.moe.deepspeed_checkpoint as dsckpt
from moe_lm import checkpoint as ckpt
from moe_lm.cli import main
from tests.checkpoint.test_checkpoint import local_experts, overrides, trainer_for
from tests.distributed_utils import run_distributed

INPUTS = (torch.arange(64) * 7 % 300).view(2, 32)


def _train_ep2_worker(rank, world, root):
    trainer = trainer_for(overrides(root, "run", "parallel.ep_size=2", "train.max_steps=2"))
    trainer.train()
    trainer.engine.eval()
    with torch.no_grad():
        logits, _, _ = trainer.engine(INPUTS)  # the same batch on both ranks: each rank's output is the full model's
    torch.save({"logits": logits, "experts": local_experts(trainer)}, root / f"result{rank}.pt")


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run_distributed(_train_ep2_worker, 2, root, timeout_s=300)
    return root


def test_export_keys_experts_by_global_id_and_the_file_or_the_run_rebuild_the_ep2_model(ep2_run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    main(["export", str(ep2_run / "run"), "--out", str(out)])  # a run dir: its newest complete checkpoint
    assert f"wrote {out}" in capsys.readouterr().out

    state, cfg = ckpt.load_exported(out)
    assert cfg.parallel.ep_size == 2 and cfg.model.moe.num_experts == 4 and cfg.train.max_steps == 2
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["moe_lm_step"] == "2"
    for rank in range(2):
        for (layer, global_id), params in torch.load(ep2_run / f"result{rank}.pt")["experts"].items():
            prefix = f"blocks.{layer}.ffn.deepspeed_moe.experts.deepspeed_experts.{global_id}."
            for name, tensor in params.items():
                assert torch.equal(state[prefix + name], tensor), (rank, layer, global_id, name)
    biases = [state[f"blocks.{layer}.ffn.deepspeed_moe.gate.router.balance_bias_E"] for layer in range(2)]
    assert any(torch.count_nonzero(bias) for bias in biases)  # router buffers are part of the export

    trained = torch.load(ep2_run / "result0.pt")["logits"]
    for source in (out, ep2_run / "run"):  # the exported file, and the run's newest complete checkpoint
        model, cfg = ckpt.load_model(source)  # ep_size=1, loaded strictly: no key missing, none extra
        assert not model.training and cfg.parallel.ep_size == 2
        with torch.no_grad():
            logits, _, _ = model(INPUTS)
        torch.testing.assert_close(logits, trained)


def copy_checkpoint(ep2_run, tmp_path):
    path = ckpt.find_checkpoint(str(ep2_run / "run"), ep2_run / "run")
    copy = tmp_path / path.name
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def test_export_refuses_a_corrupt_checkpoint(ep2_run, tmp_path):
    broken = copy_checkpoint(ep2_run, tmp_path)
    state, manifest = ckpt.consolidated_state_dict(broken)
    assert manifest["step"] == 2 and len([k for k in state if ".deepspeed_experts." in k]) == 2 * 4 * 3
    shard = broken / dsckpt.expert_file(0, 3)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SystemExit, match=f"{shard} has"):
        main(["export", str(broken), "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()
    assert json.loads((broken / ckpt.MANIFEST).read_text())["step"] == 2


def test_an_expert_shard_that_holds_another_expert_is_refused_naming_it(ep2_run, tmp_path):
    swapped = copy_checkpoint(ep2_run, tmp_path)
    shard = swapped / dsckpt.expert_file(0, 3)
    shard.write_bytes((swapped / dsckpt.expert_file(0, 2)).read_bytes())
    manifest = ckpt.read_manifest(swapped)
    manifest["files"][shard.name] = dsckpt.file_entry(shard, sha256=True)  # a manifest that vouches for it
    (swapped / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=f"{shard} should hold expert 3 only"):
        ckpt.consolidated_state_dict(swapped)
