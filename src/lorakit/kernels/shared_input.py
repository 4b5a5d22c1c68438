"""Several LoRA projections of one input (q, k, v; gate, up) as one autograd node, the LoRA terms inside the
base GEMMs through the K dimension.

Per projection, the unfused op writes the rank-r product XA @ (sB).T, a (tokens x out) tensor, and the base
GEMM reads it back in its epilogue: two extra passes over the output, the widest tensor of the layer for
gate and up. Here the input is widened once, Xc = [X | X @ A_1.T | ... | X @ A_n.T] (one GEMM for every
XA), and each frozen weight is stored widened, P_i = [W_i | 0 | s_i B_i | 0] with s_i B_i in projection i's
rank columns and any zero columns of padding (lorakit.widen keeps them so as the weight's own storage, no
copy of W):

    forward:   Y_i = Xc @ P_i.T (+ b_i)                        the LoRA projection in one GEMM
    backward:  [dX_base | s_1 GA_1 | ... | s_n GA_n] = sum_i dY_i @ P_i    chained GEMMs (beta = 1): the
               rank-r GA_i = dY_i @ B_i come free, and the dX sum needs no separate additions
               dX = dX_base + [s GA] @ [A_1; ...; A_n]         one skinny GEMM
               [dA_1; ...; dA_n] = [s GA].T @ X                one read of X for every A
               dB_i = s_i dY_i.T @ XA_i                        XA_i: Xc's columns

Xc is one more copy of X unless X was written into it: an RMSNorm of a known decoder layer that feeds the op
(lorakit.blocks.WideNorm) writes its output into the first columns of a buffer as wide as Xc
(kernels.rms_norm), and the op writes only the XA columns.

Saved for backward: Xc (the input the per-layer ops save too, plus the XA columns they save) and the stacked
[A_1; ...; A_n] (r x in, which dX needs again; stacking it anew would be one more op on the host). Rounding
differs from the per-layer path only in the order of the sums (the rank-r term is accumulated inside the
base GEMM, in its fp32 accumulator), so float64 results agree to 1e-12 (tests/test_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import gemm_choice
from .lora_linear import grad_lora_B


STRIDED_GRAD_X = True
"""The widened backward's dX: True adds the rank-r term in place into dX_base, the column slice of the widened
gradient, and hands that strided view on (28 us a call on the H200 at the 1B gate/up shape against 71 us for
torch.addmm, which first copies the slice into a new contiguous tensor: bench/skinny_addmm.py). On since the
whole-step A/Bs with graphed layers (bench/graphed_layers.py --variants, H200, 2026-12-02): faster in six of
seven paired runs on 1B and 8B, by 0.3-0.8%, at the same peak memory."""


@dataclass(frozen=True)
class SharedInputArgs:
    """Input features, the projections' ranks and scales, and which have a bias."""

    in_features: int
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    biases: tuple[bool, ...]


class LoraSharedInputFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, args: SharedInputArgs, x, wide, *tensors):
        """``tensors``: for each projection A_i, B_i, bias_i (None when absent), P_i (the widened weight, s_i B_i
        written in; all of one width). ``wide``: None, or the buffer whose first columns x is (kernels.rms_norm),
        at least as wide as the weights. Returns one output per projection."""
        n = len(args.ranks)
        As, Bs, biases, packed = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        x2 = x.reshape(-1, args.in_features)
        pad = packed[0].shape[1] - args.in_features - sum(args.ranks)  # the widened weights' zero columns
        a_all = torch.cat(As) if n > 1 else As[0]  # [A_1; ...; A_n], saved: backward's dX needs it too
        width, xa_end = packed[0].shape[1], packed[0].shape[1] - pad  # Xc: [X | XA | padding]
        if wide is not None:  # x is already in place: write the XA columns (and zero any padding) beside it,
            # through .data, an alias whose writes leave x's version counter alone (x's own columns do not change);
            # x is saved as well (below), so an in-place write to x before backward fails autograd's version check
            xc = wide.data.view(-1, wide.shape[-1])[:, :width]
        else:  # x copied in first, so that XA is the same GEMM (over the same strided X) either way: same bits
            xc = x2.new_empty(x2.shape[0], width)
            xc[:, :args.in_features].copy_(x2)
        torch.mm(xc[:, :args.in_features], a_all.t(), out=xc[:, args.in_features:xa_end])
        if pad:
            xc[:, xa_end:].zero_()
        lead = x.shape[:-1]
        outs = []
        for i in range(n):
            y = F.linear(xc, packed[i], biases[i])  # (addmm with the bias, mm without: one call on the host)
            outs.append(y.view(*lead, y.shape[-1]))
        ctx.args, ctx.x_shape, ctx.packed = args, x.shape, packed  # frozen weights: not saved activations
        ctx.set_materialize_grads(False)  # an output that reaches no loss: its GEMMs are skipped, not zero-filled
        # x for its version check where Xc is x's own storage; else Xc's copy in x's shape (no memory, and the same
        # saved tensors either way: a checkpointed recomputation may take the other branch)
        check = x if wide is not None else xc[:, :args.in_features].view(x.shape)
        ctx.save_for_backward(xc, a_all, check, *Bs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        args = ctx.args
        n, k = len(args.ranks), args.in_features
        xc, a_all, _, *Bs = ctx.saved_tensors  # the third: saved for its version check only
        need = ctx.needs_input_grad[3:]  # per projection: A, B, bias, packed
        grads2 = [g.reshape(-1, g.shape[-1]) if g is not None else None for g in grads]
        out: list[torch.Tensor | None] = [None] * (4 * n)
        grad_x = None
        if all(g is None for g in grads2):  # no output reached the loss
            return (None, None, None, *out)
        dx_base, sga = _grad_wide(grads2, ctx.packed, k, args.ranks)
        if ctx.needs_input_grad[1]:
            # in place where dX_base is a tensor of its own (the split backward): torch.addmm would copy it first
            # (bench/skinny_addmm.py); a column slice of the widened gradient only with STRIDED_GRAD_X
            in_place = dx_base.is_contiguous() or STRIDED_GRAD_X
            grad_x = (dx_base.addmm_(sga, a_all) if in_place else torch.addmm(dx_base, sga, a_all)).view(ctx.x_shape)
        if any(need[4 * i] for i in range(n)):
            grad_A = sga.t() @ xc[:, :k]
        offset = k
        for i, (g, r) in enumerate(zip(grads2, args.ranks)):
            if need[4 * i]:
                out[4 * i] = grad_A[offset - k:offset - k + r]
            if g is not None:
                if need[4 * i + 1]:
                    out[4 * i + 1] = grad_lora_B(g, xc[:, offset:offset + r], Bs[i], args.scales[i])
                if need[4 * i + 2] and args.biases[i]:
                    out[4 * i + 2] = g.sum(0)
            offset += r
        return (None, grad_x, None, *out)


def _grad_wide(grads, packed, k: int, ranks: tuple[int, ...]):
    """``(dX_base, [s_1 GA_1 | ... | s_n GA_n])`` = sum_i dY_i @ P_i, split at column k. By default as chained
    GEMMs over the widened weights (N = k + ranks + padding); or, where measured faster (gemm_choice: cuBLAS
    may pick a slower kernel for the widened N), as chained GEMMs over W_i (N = k) and one rank-r GEMM each
    for s_i GA_i = dY_i @ (s_i B_i). An output that reached no loss (its gradient None) takes the default."""
    rank = sum(ranks)

    def widened():
        wide = None
        for g, p in zip(grads, packed):
            if g is not None:
                wide = g @ p if wide is None else wide.addmm_(g, p)
        return wide[:, :k], wide[:, k:k + rank]

    def split():
        base = None
        for g, p in zip(grads, packed):
            base = g @ p[:, :k] if base is None else base.addmm_(g, p[:, :k])
        offsets = [k + sum(ranks[:i]) for i in range(len(ranks))]
        return base, torch.cat([g @ p[:, o:o + r] for g, p, o, r in zip(grads, packed, offsets, ranks)], 1)

    if any(g is None for g in grads):
        return widened()
    first = next(g for g in grads if g is not None)
    def key():
        return first.shape[0], k, packed[0].shape[1], ranks, tuple(g.shape[1] for g in grads), first.dtype

    return gemm_choice.run("shared_input_backward", key, first.device, (widened, split))


def lora_shared_input(x: torch.Tensor, projections, wide: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The outputs ``x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T`` for ``projections``: (A, B, bias or None,
    scale, packed) each, ``packed`` the widened frozen weight with s*B written in (lorakit.widen). Every
    operand is computed in x's dtype, which the packed weights have. ``wide``: the buffer x was written into
    by kernels.rms_norm, used where it is (x its first columns, contiguous, wide enough)."""
    dtype = x.dtype
    tensors = []
    for A, B, bias, _, packed in projections:  # casts only where needed: each .to() is an op on the host
        tensors += [A if A.dtype == dtype else A.to(dtype), B if B.dtype == dtype else B.to(dtype),
                    bias if bias is None or bias.dtype == dtype else bias.to(dtype), packed]
    args = SharedInputArgs(x.shape[-1], tuple(p[0].shape[0] for p in projections),
                           tuple(float(p[3]) for p in projections), tuple(p[2] is not None for p in projections))
    if wide is not None and not _holds(wide, x, projections[0][4].shape[1]):
        wide = None
    if not torch.is_autocast_enabled(x.device.type):
        return LoraSharedInputFunction.apply(args, x, wide, *tensors)
    with torch.autocast(x.device.type, enabled=False):
        return LoraSharedInputFunction.apply(args, x, wide, *tensors)


def _holds(wide: torch.Tensor, x: torch.Tensor, width: int) -> bool:
    """Whether x is the first columns of the contiguous buffer ``wide``, which has at least ``width`` of them."""
    return (wide.is_contiguous() and wide.dtype == x.dtype and wide.dim() == x.dim() and wide.shape[-1] >= width
            and wide.shape[:-1] == x.shape[:-1] and x.data_ptr() == wide.data_ptr()
            and x.stride() == wide.stride())
