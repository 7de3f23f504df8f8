"""The training loop end to end, in one real process: data, DeepSpeed engine, metrics files, summary."""

import json
import math

import pytest
import torch

from moe_lm.config import load_config
from tests.distributed_utils import run_distributed

CORPUS = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


def tiny_overrides(tmp_path, *extra):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(CORPUS[i * 2000:(i + 1) * 2000 + 4000])
    return [f"data.sources=[{corpus}]", f"data.dir={tmp_path / 'data'}", "data.vocab_size=300", "data.val_fraction=0.2",
            "model.vocab_size=300", "model.seq_len=32", "model.n_layers=2", "model.d_model=32", "model.n_heads=4",
            "model.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2", "train.micro_batch_size=4",
            "train.max_steps=8", "train.warmup_steps=2", "train.eval_interval=4", "train.eval_batches=2",
            "train.log_interval=2", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}", *extra]


def expert_parallel_overrides(tmp_path, run, world, steps):
    """`tiny_overrides` for a dropless run of `steps` steps on `world` processes with ep_size = world and the same
    global batch (4 sequences), logged every step into tmp_path/run: the 1-process run is the reference."""
    return tiny_overrides(tmp_path, "model.moe.drop_tokens=false", f"train.micro_batch_size={4 // world}",
                          f"parallel.ep_size={world}", f"train.max_steps={steps}", "train.log_interval=1",
                          "train.eval_interval=3", "metrics.per_layer=true", "parallel.init_timeout_s=60",
                          f"run.dir={tmp_path / run}")


def _train(rank, world_size, overrides):
    from moe_lm.train import Trainer

    Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False).train()


def test_training_writes_metrics_and_a_summary_and_lowers_the_loss(tmp_path):
    run_distributed(_train, 1, tiny_overrides(tmp_path, "train.grad_accum_steps=2"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8]  # every log_interval, and step 1's router diagnostics
    assert "router/softmax_topk/alignment_mean" in train_rows[0]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert [r["step"] for r in rows if "val/loss" in r] == [4, 8]
    assert train_rows[-1]["tokens"] == 8 * 2 * 4 * 32  # steps x accumulation x micro-batch x sequence
    assert len(train_rows[-1]["moe/load_shares"]) == 2 and len(train_rows[-1]["moe/load_shares"][0]) == 4

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("val_loss", "val_ppl", "unigram_ppl", "tokens_per_s", "steps", "tokens", "moe/load_cv_mean",
                "moe/collapse_rate", "moe/token_entropy"):
        assert key in summary, key
    assert math.isclose(summary["val_ppl"], math.exp(summary["val_loss"]), rel_tol=1e-9)
    assert summary["steps"] == 8 and summary["router"] == "softmax_topk"
    assert (tmp_path / "run" / "config.yaml").read_text().count("num_experts: 4") == 1


def test_each_rank_writes_the_op_tables_and_trace_of_the_profiled_steps(tmp_path):
    run_distributed(_train, 2, expert_parallel_overrides(tmp_path, "run", 2, 4) + [
        "train.profile_start=2", "train.profile_steps=2", "train.profile_trace=true"])
    folder = tmp_path / "run" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        "steps2-3_rank0.trace.json", "steps2-3_rank0.txt", "steps2-3_rank1.trace.json", "steps2-3_rank1.txt"]
    for rank in (0, 1):
        table = (folder / f"steps2-3_rank{rank}.txt").read_text()
        assert table.startswith(f"steps 2-3, rank {rank}: ")
        assert int(table.splitlines()[0].split(", ")[-1].split()[0]) > 100  # "... N aten ops dispatched"
        assert table.count("aten::") >= 10 and "Self CPU time total" in table  # ops by self time and input shape
        assert json.loads((folder / f"steps2-3_rank{rank}.trace.json").read_text())["traceEvents"]


def test_router_is_swapped_by_name_from_the_command_line(tmp_path):
    run_distributed(_train, 1, tiny_overrides(tmp_path, "model.moe.router.name=mpi", "train.max_steps=2",
                                              "train.eval_interval=2", "metrics.diagnostics_interval=1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["router"] == "mpi" and summary["steps"] == 2


def _train_steps_and_save_the_model(rank, world_size, overrides, log, out):
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    try:
        for _ in range(3):
            trainer._train_step(log=log)
        if not log:
            assert trainer.model.routing_records() == [None] * len(trainer.model.moe_layers())
        if rank == 0:
            torch.save(trainer.model.state_dict(), out)
    finally:
        trainer._release_run_dir()


def test_steps_that_do_not_log_take_no_routing_records_and_train_the_same(tmp_path):
    """Without logging a step builds no routing record, yet a router with per-step state (the expert bias of
    aux-loss-free balancing) gets the same all-reduced counts: 2 ranks, 2 micro-batches, logged or not, end at the
    same weights and biases."""
    states = []
    for log in (True, False):
        out, run_root = tmp_path / f"model_log_{log}.pt", tmp_path / f"log_{log}"
        run_root.mkdir()
        overrides = tiny_overrides(run_root, "model.moe.router.bias_update_rate=0.01",
                                   "train.grad_accum_steps=2", "train.micro_batch_size=2")
        run_distributed(_train_steps_and_save_the_model, 2, overrides, log, out)
        states.append(torch.load(out))
    logged, silent = states
    biases = [key for key in logged if key.endswith("balance_bias_E")]
    assert biases and all(logged[key].abs().sum() > 0 for key in biases)
    assert logged.keys() == silent.keys()
    for key in logged:
        assert torch.equal(logged[key], silent[key]), key


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_activation_checkpointing_trains_the_same_under_the_gpu_recipes_zero_stages(tmp_path, zero_stage):
    """The recomputation's backward is where DeepSpeed's gradient hooks fire under activation checkpointing: in bf16
    over 2 micro-batches a step, ZeRO-1 (the GPU recipes) and ZeRO-2 (2.7b_e32) end at the same weights with it as
    without it."""
    states = []
    for checkpointing in (False, True):
        out, run_root = tmp_path / f"model_{checkpointing}.pt", tmp_path / f"checkpointing_{checkpointing}"
        run_root.mkdir()
        overrides = tiny_overrides(run_root, f"parallel.zero_stage={zero_stage}", "train.precision=bf16",
                                   "train.grad_accum_steps=2", "train.micro_batch_size=2",
                                   f"train.activation_checkpointing={checkpointing}")
        run_distributed(_train_steps_and_save_the_model, 1, overrides, True, out)
        states.append(torch.load(out))
    plain, checkpointed = states
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.equal(plain[key], checkpointed[key]), key


def _check_expert_weights_stack_in_place(rank, world_size, overrides):
    from moe_lm.moe.dispatch import strided_stack_step
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    try:
        for _ in range(2):  # after DeepSpeed's flattening, and after optimizer steps that write into its buffers
            for layer in trainer.model.moe_layers():
                for name in ("w1", "w3", "w2"):
                    weights = [getattr(expert, name).weight for expert in layer.local_experts]
                    assert strided_stack_step(weights) == 3 * weights[0].numel(), (name, overrides[-2:])
            trainer._train_step(log=False)
    finally:
        trainer._release_run_dir()


@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (2, "fp32"), (1, "bf16")])
def test_expert_weights_stay_packed_for_in_place_stacking_under_deepspeeds_optimizers(tmp_path, zero_stage,
                                                                                       precision):
    # ZeRO and DeepSpeed's bf16 optimizer move every parameter into flat buffers of their own: the packing must
    # survive that, or every forward copies every expert weight again
    run_distributed(_check_expert_weights_stack_in_place, 1,
                    tiny_overrides(tmp_path, f"parallel.zero_stage={zero_stage}", f"train.precision={precision}"))
