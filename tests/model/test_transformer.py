"""The decoder: causal, counted correctly, trainable end to end through DeepSpeed's MoE layer."""

import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_lm.config import load_config
from moe_lm.model.layers import CausalSelfAttention, rope_tables
from moe_lm.model.transformer import MoETransformer, count_parameters
from moe_lm.moe import MoEFeedForward


def tiny_config(*overrides):
    return load_config(None, ["model.vocab_size=64", "model.seq_len=16", "model.n_layers=2", "model.d_model=32",
                              "model.n_heads=4", "model.d_ff=48", "model.moe.num_experts=4", "model.moe.top_k=2",
                              "model.moe.drop_tokens=false", *overrides])


def test_changing_a_future_token_never_changes_an_earlier_logit():
    # dropless: with a capacity limit, a later token can take an earlier token's expert slot (a known
    # property of token-dropping MoE), which is not a property of the decoder
    torch.manual_seed(0)
    model = MoETransformer(tiny_config().model).eval()
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    with torch.no_grad():
        logits, _, _ = model(tokens)
        logits_changed, _, _ = model(changed)
    torch.testing.assert_close(logits[:, :10], logits_changed[:, :10], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])


def test_loss_is_next_token_cross_entropy_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config().model)
    tokens = torch.randint(0, 64, (2, 16))
    no_logits, lm_loss, aux_loss = model(tokens, tokens.roll(-1, 1))
    assert no_logits is None  # the fused loss never materialises them
    with torch.no_grad():
        logits, _, _ = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    torch.testing.assert_close(lm_loss, expected)
    assert aux_loss > 0
    (lm_loss + aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []



def test_aux_loss_reduction_mean_divides_the_layers_sum_by_the_number_of_moe_layers():
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    aux = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        model = MoETransformer(tiny_config("model.n_layers=3", f"model.moe.aux_loss_reduction={reduction}").model)
        aux[reduction] = model(tokens, tokens.roll(-1, 1))[2]
    torch.testing.assert_close(aux["mean"], aux["sum"] / 3)
    with pytest.raises(Exception, match="model.moe.aux_loss_reduction"):
        tiny_config("model.moe.aux_loss_reduction=max")


def test_moe_layer_placement_follows_layer_freq():
    model = MoETransformer(tiny_config("model.n_layers=4", "model.moe.layer_freq=2").model)
    assert [i for i, b in enumerate(model.blocks) if b.ffn in model.moe_layers()] == [1, 3]


def test_experts_start_from_independent_initialisations():
    layer = MoETransformer(tiny_config().model, seed=0).moe_layers()[0]
    w1 = layer.local_expert_w1()
    assert not any(torch.equal(w1[i], w1[j]) for i in range(4) for j in range(i + 1, 4))


def test_expert_weights_depend_on_global_id_not_on_ep_layout():
    full = MoETransformer(tiny_config().model, ep_size=1, ep_rank=0, seed=5).moe_layers()[0].local_expert_w1()
    torch.manual_seed(0)
    second_half = MoETransformer(tiny_config().model, ep_size=2, ep_rank=1, seed=5).moe_layers()[0].local_expert_w1()
    torch.testing.assert_close(second_half, full[2:], rtol=0, atol=0)


def test_parameter_counts_match_the_built_model():
    cfg = tiny_config("model.moe.layer_freq=2")
    counts = count_parameters(cfg.model)
    model = MoETransformer(cfg.model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    d, f, e, v = 32, 48, 4, 64
    per_expert = 3 * d * f
    assert counts.per_expert == per_expert
    # one MoE layer (layer 1 of 2): active = total − (E − k) experts; base = one FFN, no router
    assert counts.active == counts.total - (e - 2) * per_expert
    assert counts.base == counts.total - (e - 1) * per_expert - d * e
    assert counts.embedding == v * d


@pytest.mark.parametrize("recipe, base", [("350m_e8", 350e6), ("1.3b_e16", 1.3e9), ("2.7b_e32", 2.7e9)])
def test_presets_are_named_after_their_dense_base_model(recipe, base):
    counts = count_parameters(load_config(f"recipes/{recipe}.yaml").model)
    assert abs(counts.base - base) / base < 0.10
    assert counts.total > 2 * counts.base


def loss_and_grads(model, tokens):
    _, lm_loss, aux_loss = model(tokens, tokens.roll(-1, 1))
    model.zero_grad()
    (lm_loss + aux_loss).backward()
    return lm_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("router", ["softmax_topk", "grmoe", "mpi"])
def test_activation_checkpointing_changes_memory_not_results_and_records_routing_once(router):
    torch.manual_seed(0)
    model = MoETransformer(tiny_config(f"model.moe.router.name={router}").model)
    tokens = torch.randint(0, 64, (2, 16))
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, tokens)
    records = model.routing_records()
    model.activation_checkpointing = True
    torch.manual_seed(1)
    _, lm_loss, aux_loss = model(tokens, tokens.roll(-1, 1))
    forward_records = model.routing_records()
    model.zero_grad()
    (lm_loss + aux_loss).backward()
    assert [r is f for r, f in zip(model.routing_records(), forward_records)] == [True, True]  # not retaken
    torch.testing.assert_close(lm_loss.detach(), loss)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)
    for before, after in zip(records, forward_records):
        torch.testing.assert_close(dataclasses.asdict(after), dataclasses.asdict(before))


def test_compiling_keeps_checkpoint_keys_and_leaves_dispatch_and_experts_eager(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the test environment turns dynamo off elsewhere
    model = MoETransformer(tiny_config("model.n_layers=4", "model.moe.layer_freq=2").model)
    keys = list(model.state_dict())
    model.compile_static_parts()
    assert list(model.state_dict()) == keys
    moe_blocks = [block for block in model.blocks if isinstance(block.ffn, MoEFeedForward)]
    dense_blocks = [block for block in model.blocks if block not in moe_blocks]
    assert moe_blocks and dense_blocks
    assert all(block._compiled_call_impl is not None for block in dense_blocks)  # one region per dense block
    assert all(block._compiled_call_impl is None and hasattr(block.attend, "_torchdynamo_orig_callable")
               for block in moe_blocks)
    assert all(layer.router._compiled_call_impl is not None for layer in model.moe_layers())
    assert all(layer._compiled_call_impl is None for layer in model.moe_layers())
    assert all(expert._compiled_call_impl is None for layer in model.moe_layers() for expert in layer.local_experts)


def test_compiled_attention_rotates_in_real_arithmetic_with_the_eager_result(monkeypatch):
    """inductor does not lower complex ops, so the traced RoPE takes the real form, which it fuses. Traced here
    with the aot_eager backend: the same graph as inductor gets, without a C++ build."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the test environment turns dynamo off elsewhere
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4)
    x = torch.randn(2, 16, 32, requires_grad=True)
    cos, sin = rope_tables(16, 8, 10000.0)
    eager = attn(x, cos, sin)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    compiled_attn = torch.compile(attn, backend="aot_eager")
    compiled = compiled_attn(x, cos, sin)
    (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled_attn(x, cos, sin)
    assert not {e.name for e in prof.events()} & {"aten::view_as_complex", "aten::view_as_real", "aten::complex"}


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_a_compiled_model_takes_the_eager_step(activation_checkpointing, monkeypatch):
    """`train.compile`: the compiled regions (dense blocks whole, the attention half and the router of MoE blocks)
    give the eager loss and gradients, also recomputed under activation checkpointing. aot_eager traces the graphs
    inductor would get, without a C++ build."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    torch._dynamo.reset()
    cfg = tiny_config("model.n_layers=4", "model.moe.layer_freq=2").model
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    steps = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MoETransformer(cfg, activation_checkpointing=activation_checkpointing)
        if compiled:
            model.compile_static_parts(backend="aot_eager")
        _, lm_loss, aux_loss = model(tokens, tokens.roll(-1, 1))
        (lm_loss + aux_loss).backward()
        steps.append((lm_loss.detach(), aux_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_e, aux_e, grads_e), (loss_c, aux_c, grads_c) = steps
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(aux_c, aux_e)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, msg=name)
