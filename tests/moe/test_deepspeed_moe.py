"""The DeepSpeed gate adapter: the contract of the installed DeepSpeed, capacity, and the layer's output."""

import pytest
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate

from moe_lm.config import load_config
from moe_lm.moe import MoEFeedForward, capacity_slots, expert_capacity
from moe_lm.routers import REGISTRY, build_router

D, F, E, K, T = 16, 24, 4, 2, 32


def make_layer(router_name="softmax_topk", *overrides):
    cfg = load_config(None, [f"model.moe.router.name={router_name}", f"model.moe.num_experts={E}",
                             f"model.moe.top_k={K}", "model.moe.drop_tokens=false", *overrides])
    torch.manual_seed(0)
    router = build_router(cfg.model.moe.router, D, E, K)
    return MoEFeedForward(D, F, cfg.model.moe, router, ep_size=1, ep_rank=0, init_std=0.1, out_init_std=0.1,
                          seed=0, layer_idx=0)


@pytest.mark.parametrize("router_name", sorted(REGISTRY))
def test_every_router_runs_forward_and_backward_through_deepspeeds_moe_layer(router_name):
    layer = make_layer(router_name)
    assert isinstance(layer, MoE) and isinstance(layer.gate, TopKGate)
    gate_names = [n for n, _ in layer.gate.named_parameters()] + [n for n, _ in layer.gate.named_buffers()]
    assert gate_names and not [n for n in gate_names if "expert" in n]  # DeepSpeed routes those to expert files
    x = torch.randn(2, T // 2, D, requires_grad=True)
    y, l_aux = layer(x)
    assert y.shape == x.shape and l_aux.ndim == 0
    (y.square().mean() + l_aux).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.router.parameters())
    assert all(p.grad is not None for p in layer.local_experts.parameters())


def test_gate_speaks_the_sparse_route_contract_of_the_installed_deepspeed():
    layer = make_layer()
    l_aux, capacity, num_experts, indices, locations, gates, counts = layer.gate(torch.randn(T, D), None, True, False)
    assert num_experts == E and isinstance(capacity, int)
    assert indices.shape == locations.shape == gates.shape == (K, T)
    assert indices.dtype == locations.dtype == torch.int32 and gates.dtype == torch.float32
    assert counts.shape == (E,) and counts.sum() == T * K


def test_layer_output_equals_the_weighted_sum_of_the_routed_experts():
    layer = make_layer()
    x = torch.randn(T, D)
    with torch.no_grad():
        y, _ = layer(x)
        routed = layer.router(x)
        expected = torch.zeros_like(x)
        for t in range(T):
            for slot in range(K):
                expert = layer.local_experts[int(routed.expert_ids_TK[t, slot])]
                expected[t] += routed.weights_TK[t, slot] * expert(x[t])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_capacity_drops_later_assignments_first_choices_before_second():
    # 3 tokens all choosing expert 0 first, expert 1 second; capacity 2
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    weights = torch.full((3, 2), 0.5)
    indices, locations, gates = capacity_slots(ids, weights, num_experts=2, capacity=2)
    assert indices.tolist() == [[0, 0, -1], [1, 1, -1]]
    assert locations.tolist() == [[0, 1, 0], [0, 1, 0]]
    assert gates.tolist() == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]


def test_unused_slots_are_never_dispatched():
    ids = torch.tensor([[2, -1], [2, 0]])
    indices, _, gates = capacity_slots(ids, torch.tensor([[1.0, 0.0], [0.6, 0.4]]), num_experts=3, capacity=4)
    assert indices.tolist() == [[2, 2], [-1, 0]] and gates[1, 0] == 0


def test_dropped_tokens_contribute_nothing_to_the_output():
    layer = make_layer("softmax_topk", "model.moe.drop_tokens=true", "model.moe.capacity_factor=0.25",
                       "model.moe.min_capacity=1")
    x = torch.randn(T, D)
    with torch.no_grad():
        y, _ = layer(x)
    record_capacity = expert_capacity(T, K, E, 0.25, 1)
    assert record_capacity == 4
    assert (y.abs().sum(-1) == 0).any()  # some tokens lost both experts to the capacity limit


def test_force_balanced_routing_spreads_tokens_evenly():
    layer = make_layer("softmax_topk", "model.moe.force_balanced_routing=true")
    _, _, _, indices, _, _, counts = layer.gate(torch.randn(T, D), None, True, False)
    assert counts.tolist() == [T * K / E] * E


def test_routing_record_is_kept_only_in_training_with_grad():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(T, D))
    assert layer.gate.record is None
    layer(torch.randn(T, D))
    assert layer.gate.record["num_tokens"] == T and layer.gate.record["counts_E"].sum() == T * K
