"""The fused lm-head + cross-entropy: the plain cross-entropy's value and gradients, one chunk of logits at a time."""

import pytest
import torch
import torch.nn.functional as F

from moe_lm.model.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    expected = F.cross_entropy(h @ weight.t(), targets)
    expected_grads = torch.autograd.grad(3 * expected, (h, weight))
    loss = linear_cross_entropy(h, weight, targets, chunk)
    grads = torch.autograd.grad(3 * loss, (h, weight))  # the upstream gradient scales the stored ones
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_tied_weights_receive_the_gradient_of_both_uses():
    torch.manual_seed(0)
    embed = torch.randn(30, 8, requires_grad=True)
    tokens = torch.randint(0, 30, (20,))
    plain = F.cross_entropy(torch.tanh(embed[tokens]) @ embed.t(), tokens.roll(1))
    (expected,) = torch.autograd.grad(plain, embed)
    (got,) = torch.autograd.grad(linear_cross_entropy(torch.tanh(embed[tokens]), embed, tokens.roll(1), 6), embed)
    torch.testing.assert_close(got, expected)


def test_without_grad_nothing_is_kept_for_backward():
    h, weight = torch.randn(10, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, torch.randint(0, 9, (10,)), 3)
    assert loss.grad_fn is None and loss.ndim == 0


def test_bf16_inputs_give_the_fp32_loss_and_gradients_within_bf16_rounding():
    torch.manual_seed(0)
    h, weight = torch.randn(32, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (32,))
    h16, w16 = h.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    loss = linear_cross_entropy(h16, w16, targets, 10)
    loss.backward()
    h32, w32 = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    expected = F.cross_entropy(h32 @ w32.t(), targets)
    expected.backward()
    assert loss.dtype == torch.float32 and h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=5e-2, atol=5e-3)
