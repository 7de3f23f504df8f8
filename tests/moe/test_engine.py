"""The gradient norm and clip of ZeRO-0 fp32 (`moe_lm/moe/engine.py`) cover each stacked expert gradient in one
piece, with the result of one piece per parameter."""

import torch

from moe_lm.moe.engine import coalesce_views, moe_grad_norm
from tests.moe.test_deepspeed_moe import D, E, T, make_layer


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
