"""The engine's gradient passes (`moe_lm/moe/engine.py`).

- ZeRO-0 fp32: the gradient norm and clip cover each stacked expert gradient in one piece, with the result of one
  piece per parameter.
- ZeRO-1/2: the gradient norm is DeepSpeed's, from one fused pass instead of one per parameter; the parameters
  stay slices of DeepSpeed's flat buffers without being re-pointed there after every step.
- bf16 at any ZeRO stage: DeepSpeed's overflow check takes the trainer's verdict, and a step whose gradient (not
  its loss) is NaN is skipped as DeepSpeed's own check skipped it: no update, no scheduler step, counted.
"""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_lm.config import load_config
from moe_lm.data.sampler import make_batch
from moe_lm.moe.engine import coalesce_views, moe_grad_norm
from moe_lm.train.profiling import dispatched_ops
from tests.distributed_utils import run_distributed
from tests.moe.test_deepspeed_moe import D, E, T, make_layer
from tests.train.test_trainer import tiny_overrides


def test_tensors_that_tile_a_stretch_of_one_storage_are_replaced_by_a_flat_view_of_it():
    stacked = torch.randn(E, 3, 5)
    loose = torch.randn(7)
    coalesced = coalesce_views([*stacked.detach().unbind(0), loose])  # detached, as autograd's gradients are
    assert len(coalesced) == 2
    flat = next(t for t in coalesced if t is not loose)
    assert flat.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert torch.equal(flat, stacked.flatten())
    flat.mul_(2)  # in-place ops reach the original tensors
    assert torch.equal(stacked.flatten(), flat)


def test_tensors_with_gaps_between_them_or_strides_stay_as_they_are():
    stacked = torch.randn(E, 3, 5)
    every_other_expert = list(stacked.unbind(0))[1::2]
    every_other_row = [stacked[e, ::2] for e in range(E)]
    for tensors in (every_other_expert, every_other_row):
        coalesced = coalesce_views(tensors)
        assert len(coalesced) == len(tensors) and all(any(c is t for c in coalesced) for t in tensors)


def test_expert_gradients_of_a_layer_coalesce_into_one_tensor_per_matrix():
    layer = make_layer()
    out, _ = layer(torch.randn(T, D))
    out.sum().backward()
    expert_grads = [p.grad for name, p in layer.named_parameters() if "experts" in name]
    assert len(expert_grads) == 3 * E
    assert len(coalesce_views(expert_grads)) == 3  # w1, w3, w2: each stacked over the experts


def test_the_gradient_norm_over_coalesced_gradients_is_the_per_parameter_norm():
    layer = make_layer()
    out, _ = layer(torch.randn(T, D))
    out.square().sum().backward()
    per_parameter = torch.stack([p.grad.double().norm() for p in layer.parameters() if p.grad is not None])
    torch.testing.assert_close(moe_grad_norm(layer.parameters()), per_parameter.square().sum().sqrt())


def _zero_norms_worker(rank, world_size, overrides, out):
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    inputs, targets = make_batch(trainer.train_data, [0, 1, 2, 3])
    _, lm_loss, aux_loss = trainer.engine(inputs, targets)
    trainer.engine.backward(lm_loss + aux_loss)
    zero = trainer.engine.optimizer
    rows = []
    for i in range(len(zero.bit16_groups)):
        grads, params = zero.averaged_gradients[i], zero.params_in_partition[i]
        with profile(activities=[ProfilerActivity.CPU]) as fused:
            norm = zero.get_grad_norm_direct(grads, params)
        with profile(activities=[ProfilerActivity.CPU]) as deepspeeds:
            reference = type(zero).get_grad_norm_direct(zero, grads, params)
        rows.append({"norm": norm.item(), "reference": reference.item(), "gradients": len(list(grads)),
                     "fused_ops": dispatched_ops(fused.events()), "deepspeed_ops": dispatched_ops(deepspeeds.events())})
    out.write_text(json.dumps(rows))


@pytest.mark.parametrize("stage", [1, 2])
def test_the_zero_gradient_norm_is_deepspeeds_from_one_fused_pass(stage, tmp_path):
    out = tmp_path / "norms.json"
    run_distributed(_zero_norms_worker, 1,
                    tiny_overrides(tmp_path, f"parallel.zero_stage={stage}", "train.precision=bf16"), out)
    rows = json.loads(out.read_text())
    assert len(rows) >= 2  # the dense group and the experts' group
    for row in rows:
        assert row["norm"] == pytest.approx(row["reference"], rel=1e-5)
        assert row["deepspeed_ops"] >= row["gradients"] > 1  # DeepSpeed: at least one op per gradient
        assert row["fused_ops"] <= 12  # fused: a fixed handful, however many gradients


def _param_binding_worker(rank, world_size, overrides, out):
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    zero = trainer.engine.optimizer
    rebinding_ops = []
    try:
        for _ in range(3):
            trainer._train_step(log=False)
            with profile(activities=[ProfilerActivity.CPU]) as prof:  # what DeepSpeed runs after each step
                for i in range(len(zero.bit16_groups)):
                    zero._update_model_bit16_weights(i)
            rebinding_ops.append(dispatched_ops(prof.events()))
        bound = all(p.data_ptr() == zero.bit16_groups_flat[i].narrow(0, offset, p.numel()).data_ptr()
                    for i, group in enumerate(zero.round_robin_bit16_groups)
                    for p, offset in zip(group, zero.round_robin_bit16_offsets[i]))
        out.write_text(json.dumps({"bound": bound, "rebinding_ops": rebinding_ops}))
    finally:
        trainer._release_run_dir()


@pytest.mark.parametrize("stage, precision", [(1, "bf16"), (2, "fp32")])
def test_parameters_stay_slices_of_the_flat_buffer_without_being_pointed_there_again_each_step(stage, precision,
                                                                                                tmp_path):
    """DeepSpeed re-points every parameter at its slice of the flat bit16 buffer after each ZeRO step; moe-lm keeps
    that only for a parameter or buffer that moved, so the step does no per-parameter work there."""
    out = tmp_path / "binding.json"
    run_distributed(_param_binding_worker, 1, tiny_overrides(tmp_path, f"parallel.zero_stage={stage}",
                                                             f"train.precision={precision}"), out)
    result = json.loads(out.read_text())
    assert result["bound"]
    assert result["rebinding_ops"] == [0, 0, 0]


def _reductions_worker(rank, world_size, overrides, out):
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    zero = trainer.engine.optimizer
    reduce, reduced = zero.reduce_ready_partitions_and_remove_grads, []

    def counting(param, *args, **kwargs):
        reduced.append(param)
        return reduce(param, *args, **kwargs)
    zero.reduce_ready_partitions_and_remove_grads = counting  # the per-parameter work: hooks, copies, reduction
    try:
        trainer._train_step(log=False)
        out.write_text(json.dumps({"reductions": len(reduced),
                                   "parameters": sum(p.requires_grad for p in trainer.model.parameters())}))
    finally:
        trainer._release_run_dir()


def test_the_gpu_recipes_reduce_each_gradient_once_a_step_where_zero2_does_once_a_micro_batch(tmp_path):
    """ZeRO-2 must reduce after every backward, since each rank keeps only its shard of the gradients; the GPU
    recipes' ZeRO-1 accumulates the micro-batches' gradients first, so its per-parameter host work and gradient
    traffic do not grow with `train.grad_accum_steps`."""
    recipe_stage = load_config("recipes/350m_e8.yaml").parallel.zero_stage
    micro_batches, counts = 4, {}
    for stage in (recipe_stage, 2):
        out = tmp_path / f"zero{stage}.json"
        run_distributed(_reductions_worker, 1, tiny_overrides(tmp_path, f"parallel.zero_stage={stage}",
                                                              "train.precision=bf16",
                                                              f"train.grad_accum_steps={micro_batches}",
                                                              f"run.dir={tmp_path / f'run{stage}'}"), out)
        counts[stage] = json.loads(out.read_text())
    assert counts[recipe_stage]["reductions"] == counts[recipe_stage]["parameters"]
    assert counts[2]["reductions"] == micro_batches * counts[2]["parameters"]


def _nan_gradient_worker(rank, world_size, overrides, out):
    from moe_lm.train import Trainer

    trainer = Trainer(load_config("recipes/quickstart.yaml", overrides), progress=False)
    expert_weight = trainer.model.moe_layers()[0].local_experts[0].w1.weight
    expert_weight.register_hook(lambda grad: grad * float("nan") if trainer.step + 1 == 2 else grad)
    snapshots = []
    for _ in range(3):
        metrics = trainer._train_step(log=True)
        snapshots.append({"params": [p.detach().float().clone() for p in trainer.model.parameters()],
                          "loss": metrics["train/loss"], "lr_epoch": trainer.scheduler.last_epoch,
                          "skipped": trainer.skipped_steps, "deepspeed_skipped": trainer.engine.skipped_steps})
    torch.save(snapshots, out)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_bf16_step_whose_gradient_alone_is_nan_is_skipped(stage, tmp_path):
    out = tmp_path / "steps.pt"
    run_distributed(_nan_gradient_worker, 1,
                    tiny_overrides(tmp_path, f"parallel.zero_stage={stage}", "train.precision=bf16"), out)
    first, bad, after = torch.load(out, weights_only=False)
    assert bad["loss"] == bad["loss"]  # the loss was finite: only the gradient tells
    assert all(torch.equal(a, b) for a, b in zip(first["params"], bad["params"]))
    assert not all(torch.equal(a, b) for a, b in zip(bad["params"], after["params"]))
    assert [s["lr_epoch"] for s in (first, bad, after)] == [1, 1, 2]
    assert [s["skipped"] for s in (first, bad, after)] == [0, 1, 1]
    assert [s["deepspeed_skipped"] for s in (first, bad, after)] == [0, 1, 1]
