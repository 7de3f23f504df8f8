"""The memory planner: model states follow the ZeRO/expert-parallel arithmetic, activations match a real forward."""

import pytest
import torch

from moe_lm.cli import main
from moe_lm.config import load_config
from moe_lm.model.memory import STATE_BYTES, activation_bytes, estimate_memory
from moe_lm.model.transformer import MoETransformer, count_parameters

QUICKSTART = "recipes/quickstart.yaml"


def tiny_config(*overrides):
    # 4 layers, MoE on every other one: both FFN kinds are counted
    return load_config(None, ["model.vocab_size=64", "model.seq_len=32", "model.n_layers=4", "model.d_model=32",
                              "model.n_heads=4", "model.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2",
                              "model.moe.layer_freq=2", "train.micro_batch_size=2", *overrides])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_gpu_holds_every_parameter_at_its_bytes_per_state(precision):
    cfg = tiny_config()
    total = count_parameters(cfg.model).total
    est = estimate_memory(cfg, world_size=1, bf16=precision == "bf16")
    state = STATE_BYTES[precision]
    assert est.dense_params + est.expert_params == total
    assert (est.weights, est.gradients, est.optimizer_states) == (
        total * state.weights, total * state.gradients, total * state.optimizer)


def test_mixed_precision_adam_costs_twenty_bytes_per_parameter():
    # ZeRO paper §3: 2 (bf16 weights) + 12 (fp32 master + moments); gradients 2 + 4 (fp32 copy for the step)
    assert STATE_BYTES["bf16"].weights + STATE_BYTES["bf16"].gradients + STATE_BYTES["bf16"].optimizer == 20
    assert STATE_BYTES["fp32"].weights + STATE_BYTES["fp32"].gradients + STATE_BYTES["fp32"].optimizer == 16


def test_zero1_divides_optimizer_states_by_the_data_parallel_size_and_zero2_gradients_too():
    world = 4
    zero0, zero1, zero2 = (estimate_memory(tiny_config(f"parallel.zero_stage={s}"), world, bf16=True)
                           for s in (0, 1, 2))
    assert zero1.optimizer_states == pytest.approx(zero0.optimizer_states / world, rel=1e-3)  # shards round up
    assert zero1.gradients == zero0.gradients
    assert zero2.gradients == pytest.approx(zero0.gradients / world, rel=1e-3)
    assert zero2.optimizer_states == zero1.optimizer_states
    assert zero0.weights == zero1.weights == zero2.weights


def test_ep_size_divides_the_experts_each_gpu_holds_and_not_the_dense_parameters():
    world = 4
    ep1 = estimate_memory(tiny_config(), world, bf16=True)
    ep4 = estimate_memory(tiny_config("parallel.ep_size=4"), world, bf16=True)
    assert ep4.expert_params * 4 == ep1.expert_params
    assert ep4.dense_params == ep1.dense_params
    assert ep1.weights - ep4.weights == (ep1.expert_params - ep4.expert_params) * STATE_BYTES["bf16"].weights


def test_under_zero_every_gpu_holds_one_world_share_of_the_optimizer_states_whatever_ep_size():
    # experts are data-parallel over world/ep_size GPUs, each holding 1/ep_size of them: 1/world per GPU either way
    world = 4
    shards = {ep: estimate_memory(tiny_config(f"parallel.ep_size={ep}", "parallel.zero_stage=2"), world, bf16=True)
              for ep in (1, 2, 4)}
    assert shards[1].optimizer_states == shards[2].optimizer_states == shards[4].optimizer_states
    assert shards[1].gradients == shards[2].gradients == shards[4].gradients


@pytest.mark.parametrize("ep_size", [1, 2])
def test_activations_grow_linearly_with_the_micro_batch(ep_size):
    # capacity_factor 1: the expert-parallel capacity T·K/E is exact at every micro-batch, no rounding up
    model = tiny_config("model.moe.capacity_factor=1.0").model
    one, two, three = (activation_bytes(model, micro_batch=b, bf16=True, checkpointing=False,
                                        loss_chunk_tokens=4096, ep_size=ep_size) for b in (1, 2, 3))
    assert three.layers - two.layers == two.layers - one.layers > 0
    assert (three.attention, three.dense_ffn) == (3 * one.attention, 3 * one.dense_ffn)


def test_checkpointing_keeps_each_block_input_plus_one_block_recomputed():
    model = tiny_config().model
    full, ckpt = (activation_bytes(model, micro_batch=8, bf16=True, checkpointing=c, loss_chunk_tokens=4096)
                  for c in (False, True))
    block_input = 2 * 8 * model.seq_len * model.d_model
    assert ckpt.layers == model.n_layers * block_input + full.attention + full.moe_ffn
    assert ckpt.layers < full.layers
    assert (ckpt.head, ckpt.loss_chunk) == (full.head, full.loss_chunk)


def test_the_loss_working_set_stops_growing_once_the_micro_batch_exceeds_a_chunk():
    model = tiny_config().model
    chunk = 2 * model.seq_len
    small, large, larger = (activation_bytes(model, micro_batch=b, bf16=True, checkpointing=True,
                                             loss_chunk_tokens=chunk) for b in (1, 2, 4))
    assert small.loss_chunk < large.loss_chunk == larger.loss_chunk


def saved_activation_bytes(model: MoETransformer, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one training forward, parameters and buffers excluded
    (a view keeps its whole storage alive, so storages are what count)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, lm_loss, aux_loss = model(input_ids_BS, targets_BS)
    assert lm_loss.requires_grad and aux_loss.requires_grad  # a training forward: the graph is alive
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_the_tensors_a_training_forward_saves(dtype):
    cfg = load_config(QUICKSTART, ["model.seq_len=64", "data.vocab_size=512", "model.moe.layer_freq=2",
                                   "train.micro_batch_size=4"])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).to(dtype).train()
    input_ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1))
    measured = saved_activation_bytes(model, input_ids[:, :-1], input_ids[:, 1:])
    estimate = activation_bytes(cfg.model, cfg.train.micro_batch_size, bf16=dtype == torch.bfloat16,
                                checkpointing=False, loss_chunk_tokens=cfg.train.loss_chunk_tokens)
    # the loss chunk is a working set, not saved; left out of the estimate: per-token norm statistics, routing
    # indices and the routers' aux-loss tensors, under 1% of a block
    assert estimate.layers + estimate.head == pytest.approx(measured, rel=0.02)


def test_info_prints_the_memory_plan_and_whether_it_fits(capsys):
    main(["info", QUICKSTART, "parallel.ep_size=2", "--gpus", "2"])
    fits = capsys.readouterr().out
    assert "2 GPU(s), ep_size 2" in fits and "yes" in fits
    main(["info", QUICKSTART, "--gpu-mem-gib", "0.01"])
    assert "no," in capsys.readouterr().out


def test_info_refuses_a_gpu_count_that_ep_size_does_not_divide():
    with pytest.raises(SystemExit, match="parallel.ep_size"):
        main(["info", QUICKSTART, "parallel.ep_size=2", "--gpus", "3"])
