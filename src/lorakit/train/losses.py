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

CHUNK_ELEMENTS = 1 << 26  # 64M fp32 values (256 MiB) per chunk: 523 rows of a 128k vocabulary


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Flat targets for the flat logits rows: row (b, t) predicts labels[b, t + 1]; each last position none."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)


def _spans(rows: int, vocab: int, chunk_elements: int):
    step = max(1, chunk_elements // vocab)
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


class _ShiftedCrossEntropySum(torch.autograd.Function):
    """No host synchronisation inside (no nonzero / boolean indexing): the GPU queue stays full."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk_elements):
        flat = logits.reshape(-1, logits.shape[-1])
        targets = _shifted_targets(labels, ignore_index)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for r0, r1 in _spans(flat.shape[0], flat.shape[1], chunk_elements):
            total += F.cross_entropy(flat[r0:r1].float(), targets[r0:r1], ignore_index=ignore_index,
                                     reduction="sum")
        ctx.save_for_backward(logits, targets)
        ctx.ignore_index, ctx.chunk_elements = ignore_index, chunk_elements
        return total

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(flat)
        g = grad_out.float()
        keep = targets != ctx.ignore_index
        index = targets.clamp_min(0).unsqueeze(1)
        minus_g = (-g * keep).unsqueeze(1).float()  # -g at targets, 0 on ignored rows
        for r0, r1 in _spans(flat.shape[0], flat.shape[1], ctx.chunk_elements):
            chunk = torch.log_softmax(flat[r0:r1].float(), dim=-1).exp_().mul_(g)
            chunk.scatter_add_(1, index[r0:r1], minus_g[r0:r1])  # exp * g + (-g): autograd's rounding
            chunk.mul_(keep[r0:r1].unsqueeze(1))  # ignored rows (prompt, padding, last position): zero
            grad[r0:r1] = chunk
        return grad.view_as(logits), None, None, None


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
