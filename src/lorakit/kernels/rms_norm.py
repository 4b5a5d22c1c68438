"""Llama's RMSNorm (transformers' LlamaRMSNorm.forward) with its output written into the first columns of a wider
buffer: the shared-input op that reads it (kernels.shared_input) then writes its XA columns beside it instead of
copying it (lorakit.blocks.WideNorm installs it).

The class's ops, through autograd, with only the last one, ``weight * normed``, a node of its own
(ScaleIntoWide) that writes into the buffer: same kernels, same bits, same saved tensors (tests/test_blocks.py).
Tried and not kept (session 30): the whole norm as one node, backward written out as autograd's formulas. Same
bits in 16-bit, but little host time back (a forward + backward of a tiny bf16 norm on the 2-core CPU: 184 us,
against 199 for these two parts and 151 for the class's own ops: a Python backward costs more than autograd's
C++ nodes), and for float32 inputs one node cannot keep autograd's order of summing x's gradient (from the
product, the square and the residual's add), so it would need both designs.
"""

from __future__ import annotations

import torch


class ScaleIntoWide(torch.autograd.Function):
    """``weight * normed`` written into the first columns of a new buffer ``extra`` columns wider, returned as that
    column view. Backward is autograd's for the product: the same ops."""

    @staticmethod
    def forward(ctx, weight, normed, extra: int):
        k = normed.shape[-1]
        out = normed.new_empty(*normed.shape[:-1], k + extra)[..., :k]
        torch.mul(weight, normed, out=out)
        # what autograd's product saves: each factor only where the other needs its gradient
        ctx.save_for_backward(weight if ctx.needs_input_grad[1] else None, normed if ctx.needs_input_grad[0] else None)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, normed = ctx.saved_tensors
        grad_weight = (grad * normed).sum_to_size(weight.shape) if ctx.needs_input_grad[0] else None
        grad_normed = grad * weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_normed, None


def rms_norm_into_wide(x: torch.Tensor, weight: torch.Tensor, eps: float, extra: int) -> torch.Tensor:
    """LlamaRMSNorm(x) as the first columns of a buffer ``extra`` (> 0) columns wider: the output's view base
    (``._base``; none for an inference tensor, which keeps no view's base)."""
    h = x.to(torch.float32)  # the class's ops
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return ScaleIntoWide.apply(weight, h.to(x.dtype), extra)
