"""The language-model loss: lm-head projection and cross-entropy fused, in chunks of tokens.

A plain `cross_entropy(h @ Wᵀ)` keeps the [N, V] logits (in fp32: 4·N·V bytes, 1 GiB for 16k tokens and a 50k
vocabulary) alive until backward, then runs a separate log-softmax backward over them. Here each chunk of tokens
gets its logits, its loss and, in the same pass, its gradients (softmax − one-hot, as Liger-Kernel's fused linear
cross-entropy does); only one chunk of logits ever exists, and backward is a scaling of stored gradients.
Shape suffixes: N tokens, D model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk: int, need_grads: bool) -> Tensor:
        num_tokens = h_ND.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h_ND = torch.empty_like(h_ND) if need_grads else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_grads else None
        for start in range(0, num_tokens, chunk):
            h_cD, targets_c1 = h_ND[start:start + chunk], targets_N[start:start + chunk].unsqueeze(1)
            # in place over one buffer: shift by the row max, exp, sum; the exponentials are the softmax's
            # numerators, so the gradient needs no second exp
            shifted_cV = (h_cD @ weight_VD.t()).float()
            shifted_cV.sub_(shifted_cV.amax(dim=-1, keepdim=True))
            target_c1 = shifted_cV.gather(1, targets_c1)
            exp_cV = shifted_cV.exp_()
            sum_c1 = exp_cV.sum(dim=-1, keepdim=True)
            loss_sum += (sum_c1.log() - target_c1).sum()
            if need_grads:  # d(mean loss)/d logits = (softmax − one-hot) / N
                dlogits_cV = exp_cV.mul_(sum_c1.reciprocal_().div_(num_tokens))
                dlogits_cV.scatter_add_(1, targets_c1, torch.full(targets_c1.shape, -1.0 / num_tokens,
                                                                  device=h_ND.device))
                dlogits_cV = dlogits_cV.to(h_ND.dtype)
                torch.mm(dlogits_cV, weight_VD, out=grad_h_ND[start:start + chunk])
                if h_cD.dtype == torch.float32:
                    grad_w_VD.addmm_(dlogits_cV.t(), h_cD)
                else:  # bf16 products, accumulated over the chunks in fp32
                    grad_w_VD += (dlogits_cV.t() @ h_cD).float()
        if need_grads:
            ctx.save_for_backward(grad_h_ND, grad_w_VD)
            ctx.weight_dtype = weight_VD.dtype
        return loss_sum / num_tokens

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        return (grad_h_ND * grad_loss.to(grad_h_ND.dtype), (grad_w_VD * grad_loss).to(ctx.weight_dtype),
                None, None, None)


def linear_cross_entropy(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """mean_n CE(softmax(h_n Wᵀ), target_n) in fp32, never holding more than `chunk_tokens` rows of logits.

    Equal to `F.cross_entropy((h @ W.t()).float(), targets)` up to float rounding, gradients included.
    """
    need_grads = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk_tokens, need_grads)
