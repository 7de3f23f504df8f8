"""The DeepSpeed MoE adapter: a DeepSpeed `MoE` layer with moe-lm's routing, dispatch, expert compute and records."""

import pytest
import torch
from torch.nn.functional import one_hot
from deepspeed.moe.layer import MoE

from moe_lm.config import load_config
from moe_lm.moe import (MoEFeedForward, capacity_slots, expert_capacity, grouped_swiglu, routing_counts_only,
                        routing_records_paused)
from moe_lm.moe.dispatch import sort_by_expert, stack_weights
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
    assert isinstance(layer, MoE)  # what DeepSpeed looks for: EP groups, MoE optimizer groups, expert files
    gate_names = [n for n, _ in layer.gate.named_parameters()] + [n for n, _ in layer.gate.named_buffers()]
    assert gate_names and not [n for n in gate_names if "expert" in n]  # DeepSpeed routes those to expert files
    x = torch.randn(2, T // 2, D, requires_grad=True)
    y, l_aux = layer(x, torch.randint(0, 100, x.shape[:2]))
    assert y.shape == x.shape and l_aux.ndim == 0
    (y.square().mean() + l_aux).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.router.parameters())
    assert all(p.grad is not None for p in layer.local_experts.parameters())


def test_expert_parameters_keep_deepspeeds_per_expert_checkpoint_keys():
    names = [n for n, _ in make_layer().named_parameters()]
    assert "deepspeed_moe.experts.deepspeed_experts.3.w2.weight" in names
    assert "deepspeed_moe.gate.router.proj.weight" in names


def reference_output(layer, x, capacity=None):
    """The plain loop: each token's kept experts, weighted; with `capacity`, slot-major first come first kept."""
    routed = layer.router(x)
    expected, used = torch.zeros_like(x), [0] * E
    for slot in range(K):
        for t in range(x.shape[0]):
            e = int(routed.expert_ids_TK[t, slot])
            if capacity is not None and used[e] >= capacity:
                continue
            used[e] += 1
            expected[t] += routed.weights_TK[t, slot] * layer.local_experts[e](x[t])
    return expected


@pytest.mark.parametrize("drop_tokens", [False, True])
def test_layer_output_equals_the_weighted_sum_of_the_routed_experts(drop_tokens):
    layer = make_layer("softmax_topk", f"model.moe.drop_tokens={drop_tokens}", "model.moe.capacity_factor=0.75",
                       "model.moe.min_capacity=1")
    x = torch.randn(T, D)
    with torch.no_grad():
        y, _ = layer(x)
        expected = reference_output(layer, x, expert_capacity(T, K, E, 0.75, 1) if drop_tokens else None)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_grouped_and_looped_expert_compute_give_equal_outputs_and_gradients():
    torch.manual_seed(0)
    ids_TK = torch.randint(0, E, (T, K))
    ids_TK[3, 1] = -1  # an unused slot: its row sorts last, into the last expert's group
    order = sort_by_expert(ids_TK, E)
    x = torch.randn(T * K, D)
    weights = [torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)]
    results = []
    for impl in ("grouped", "looped"):
        leaves = [t.clone().requires_grad_() for t in [x, *weights]]
        y = grouped_swiglu(*leaves, order.compute_group_end(), impl=impl)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for grouped, looped in zip(*results):
        torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)


def expert_matrices(layer, name):
    return [getattr(expert, name).weight for expert in layer.local_experts]


@pytest.mark.parametrize("name", ["w1", "w3", "w2"])
def test_stacked_expert_weights_are_a_view_of_the_parameters_not_a_copy(name):
    layer = make_layer()
    weights = expert_matrices(layer, name)
    stacked = stack_weights(weights)
    assert stacked.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()
    assert torch.equal(stacked, torch.stack(weights))
    layer.double()  # `.to()` and the like give every parameter a new storage: the layer packs them again
    weights = expert_matrices(layer, name)
    assert stack_weights(weights).untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()


def test_stacking_by_view_gives_each_weight_the_gradient_stacking_by_copy_gives():
    torch.manual_seed(0)
    packed = torch.randn(E, 3, F, D)
    views = [torch.nn.Parameter(packed[e, 1]) for e in range(E)]  # every third matrix: a stride of 3·F·D
    copies = [torch.nn.Parameter(v.detach().clone()) for v in views]
    grad_out = torch.randn(E, F, D)
    by_view, by_copy = stack_weights(views), stack_weights(copies)
    assert by_view.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert by_copy.untyped_storage().data_ptr() != copies[0].untyped_storage().data_ptr()  # separate storages: a copy
    (by_view * grad_out).sum().backward()
    (by_copy * grad_out).sum().backward()
    for view, copy, expected in zip(views, copies, grad_out):
        assert torch.equal(view.grad, expected) and torch.equal(copy.grad, expected)


def test_weights_out_of_order_are_stacked_by_copy_in_their_own_order():
    packed = torch.randn(E, F, D)
    reversed_views = [packed[e] for e in reversed(range(E))]
    stacked = stack_weights(reversed_views)
    assert stacked.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()
    assert torch.equal(stacked, packed.flip(0))


def one_hot_capacity_slots(expert_ids_TK, weights_TK, num_experts, capacity):
    """The slot assignment moe-lm shipped before the sort: a [K, T, E] one-hot and a cumsum along K·T."""
    ids_KT = expert_ids_TK.t()
    used_KT = ids_KT >= 0
    one_hot_KTE = one_hot(ids_KT.clamp_min(0), num_experts) * used_KT.unsqueeze(-1)
    position_KTE = one_hot_KTE.flatten(0, 1).cumsum(0).view_as(one_hot_KTE) - 1
    location_KT = position_KTE.gather(-1, ids_KT.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    kept_KT = used_KT & (location_KT < capacity)
    return (torch.where(kept_KT, ids_KT, -1).to(torch.int32), torch.where(kept_KT, location_KT, 0).to(torch.int32),
            torch.where(kept_KT, weights_TK.t().float(), 0.0))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("capacity", [1, 3, 8, 64])
def test_sorted_slot_assignment_equals_the_one_hot_one(seed, capacity):
    generator = torch.Generator().manual_seed(seed)
    num_experts, tokens, slots = 6, 40, 3
    ids_TK = torch.randint(-1, num_experts, (tokens, slots), generator=generator)  # -1: unused slots
    weights_TK = torch.rand(tokens, slots, generator=generator)
    for new, old in zip(capacity_slots(ids_TK, weights_TK, num_experts, capacity),
                        one_hot_capacity_slots(ids_TK, weights_TK, num_experts, capacity)):
        assert torch.equal(new, old)


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
    layer(torch.randn(T, D))
    assert layer.gate.record.counts_E.tolist() == [T * K / E] * E


def test_routing_record_is_kept_only_in_training_with_grad():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(T, D))
    assert layer.gate.record is None
    layer(torch.randn(T, D))
    assert layer.gate.record.num_tokens == T and layer.gate.record.counts_E.sum() == T * K


def test_no_routing_record_is_taken_while_records_are_paused():
    """Activation checkpointing recomputes the forward under `routing_records_paused`: the forward's record stays."""
    layer = make_layer()
    layer(torch.randn(T, D))
    record = layer.gate.record
    with routing_records_paused():
        layer(torch.randn(T, D))
    assert layer.gate.record is record


def test_a_forward_that_only_counts_keeps_the_counts_and_no_record():
    """A training step that does not log runs under `routing_counts_only`: routers with per-step state still get
    the assignment counts, and no routing record is built; a paused recomputation inside it keeps nothing."""
    layer = make_layer()
    layer(torch.randn(T, D))
    record = layer.gate.record
    with routing_counts_only():
        layer(torch.randn(T, D))
        counts = layer.gate.counts_E
        with routing_records_paused():
            layer(torch.randn(T, D))
    assert layer.gate.record is record
    assert layer.gate.counts_E is counts and counts.sum() == T * K and not torch.equal(counts, record.counts_E)


def test_capacity_drops_are_recorded_per_expert():
    layer = make_layer("softmax_topk", "model.moe.drop_tokens=true", "model.moe.capacity_factor=0.25",
                       "model.moe.min_capacity=1")
    layer(torch.randn(T, D))
    record = layer.gate.record
    assert torch.equal(record.kept_counts_E, record.counts_E.clamp_max(4))


class _FixedExpertChoice(torch.nn.Module):
    """A stub expert-choice router: expert e takes tokens (2e, 2e+1, 2e+2) with weights 0.5, 0.25, 0.25."""

    needs_expert_w1 = False
    loss_coefs = {}

    def forward(self, x_TD, **context):
        from moe_lm.routers import RouterOutput

        token_ids_EC = (2 * torch.arange(E).unsqueeze(1) + torch.arange(3)) % x_TD.shape[0]
        probs_TE = torch.full((x_TD.shape[0], E), 1.0 / E)
        return RouterOutput(probs_TE, None, None, token_ids_EC=token_ids_EC,
                            weights_EC=torch.tensor([0.5, 0.25, 0.25]).expand(E, 3))


def test_expert_choice_output_sums_each_tokens_picks_and_leaves_unpicked_tokens_at_zero():
    layer = make_layer()
    layer.gate.router = _FixedExpertChoice()
    x = torch.randn(T, D)
    with torch.no_grad():
        y, _ = layer(x)
    expected = torch.zeros_like(x)
    for e in range(E):
        for c, weight in enumerate([0.5, 0.25, 0.25]):
            t = (2 * e + c) % T
            expected[t] += weight * layer.local_experts[e](x[t])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert y[2 * E + 1:].abs().sum() == 0  # picked by no expert: the residual stream carries it unchanged


def test_threshold_dispatch_gets_buffers_sized_for_top_k_not_for_k_max():
    layer = make_layer("grmoe", "model.moe.drop_tokens=true", "model.moe.eval_capacity_factor=1.0",
                       "model.moe.min_capacity=1").eval()
    layer.router.set_alpha(0.01)  # near-uniform probabilities: every token needs all E experts to reach τ
    layer.router.set_eval_threshold(0.99, max_experts=E)
    layer.gate.record_always = True
    with torch.no_grad():
        layer(torch.randn(T, D))
    assert layer.gate.record.counts_E.tolist() == [T] * E
    assert layer.gate.record.kept_counts_E.tolist() == [expert_capacity(T, K, E, 1.0, 1)] * E  # 16, not 32
