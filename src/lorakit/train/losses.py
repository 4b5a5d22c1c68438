"""Causal-LM cross-entropy without the full-vocabulary fp32 copies.

``F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ...)`` keeps, for a Llama-3 vocabulary (128k) at
2 x 2048 tokens, a shifted bf16 copy (1 GiB), the fp32 upcast (2 GiB) and the fp32 log-softmax saved for
backward (2 GiB), and its backward makes two more fp32 buffers: about 5 GiB at the step's peak, as much as the
whole 4-bit 8B model. Here the forward pass works on row chunks of the logits (fp32 only per chunk) and saves
nothing but the logits, which are alive anyway; the backward pass recomputes each chunk's log-softmax and
writes that chunk of the gradient. Each gradient element is the same expression autograd evaluates,
``grad_out * exp(log_softmax) - grad_out * onehot`` in fp32, cast to the logits' dtype once; only the
order of the loss sum differs (chunk by chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 25  # 32M fp32 values (128 MiB) per chunk: 261 rows of a 128k vocabulary


def _chunks(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int):
    """(batch row, first, last) spans over the shifted positions: logits[b, t] predicts labels[b, t + 1]."""
    rows = max(1, chunk_elements // logits.shape[-1])
    for b in range(logits.shape[0]):
        for t0 in range(0, logits.shape[1] - 1, rows):
            yield b, t0, min(t0 + rows, logits.shape[1] - 1)


class _ShiftedCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk_elements):
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for b, t0, t1 in _chunks(logits, labels, chunk_elements):
            total += F.cross_entropy(logits[b, t0:t1].float(), labels[b, t0 + 1:t1 + 1],
                                     ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index, ctx.chunk_elements = ignore_index, chunk_elements
        return total

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad[:, -1].zero_()  # the last position predicts nothing
        g = grad_out.float()
        for b, t0, t1 in _chunks(logits, labels, ctx.chunk_elements):
            target = labels[b, t0 + 1:t1 + 1]
            chunk = torch.log_softmax(logits[b, t0:t1].float(), dim=-1).exp_().mul_(g)
            keep = target != ctx.ignore_index
            rows = keep.nonzero().squeeze(1)
            chunk[rows, target[rows]] -= g
            chunk[~keep] = 0
            grad[b, t0:t1] = chunk
        return grad, None, None, None


def shifted_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                              chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Sum over b, t of the fp32 cross-entropy of ``logits[b, t]`` against ``labels[b, t + 1]``.

    ``logits``: (batch, seq, vocab) in any float dtype; ``labels``: (batch, seq) with ``ignore_index`` for
    positions that are not targets. Equal to the unchunked fp32 formula up to summation order.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (batch, seq, vocab) and labels (batch, seq) expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[1] < 2:
        return logits.sum() * 0.0
    return _ShiftedCrossEntropySum.apply(logits, labels, ignore_index, chunk_elements)


__all__ = ["CHUNK_ELEMENTS", "shifted_cross_entropy_sum"]
