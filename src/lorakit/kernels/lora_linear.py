"""Fused LoRA linear: base matmul and low-rank update in one autograd node, fewer passes over activations.

The reference path (``base(x) + scale * B(A(dropout(x)))`` through autograd) spends memory-bound passes over
(tokens x features) tensors on things that carry no FLOPs: the ``scale *`` multiply and the ``+`` in the
forward pass, ``g * scale`` and ``grad_x_base + grad_x_lora`` in the backward pass. Here they are folded into
GEMM epilogues (``addmm`` with alpha/beta) or into the tiny (r x features) matrices. The order matters: the
rank-r product is formed first and the large GEMM reads it in its epilogue, where the read overlaps compute;
adding it afterwards (``y.addmm_(xa, B.T)``) costs a separate read and write of all of y (measured on an H100
in bench/lora_gemm.py: 12% vs 17% over the plain GEMMs of a Llama-1B layer).

Forward, with X: (N, in), W: (out, in) frozen, A: (r, in), B: (out, r), s the scale, Xd = dropout(X):

    XA  = Xd @ A.T                            (N, r)    saved for backward
    Y   = b + s * XA @ B.T ;  Y += X @ W.T     the rank-r product first: the big GEMM adds it in its epilogue
                                              (without a bias, s is that GEMM's beta)

Backward, with G = dL/dY:

    GA     = G @ B                            (N, r)
    dB     = s * (G.T @ XA)                   (out, r)  s as the GEMM's alpha
    dA     = s * (GA.T @ Xd)                  (r, in)   s as the GEMM's alpha
    dX     = s * (GA @ A) + G @ W             the rank-r product first, scaled and added in the big GEMM's
                                              epilogue (beta = s); without dropout only
    dXd    = s * (GA @ A)                     only with dropout (autograd then applies the mask)

Saved for backward: Xd (for dA) and XA, never the (out, in) update B @ A. W is frozen, so X itself is not
needed by the base matmul's backward.

W may also be a packed weight (anything with ``dequantize(dtype)``, e.g. a 4-bit base): it is then dequantized
in forward and again in backward, and only a reference to the packed codes is kept (QLoRA's memory promise),
so the 4-bit path gets the same fused epilogues as the 16-bit one.

Merged packed path (no dropout, a packed weight whose ``dequantize_lowrank`` has a kernel: 4-bit on CUDA).
A packed W is materialized anyway, so the update can ride along: one pass writes Wm = D(W) + s * B @ A
(rounded once), and

    Y  = b + X @ Wm.T                           (forward: one GEMM, as without an adapter)
    dX = G @ Wm                                 (Wm materialized again; kept only while recomputing)
    GA = G @ B ;  XA = X @ A.T ;  dA = s * GA.T @ X ;  dB = s * G.T @ XA

Exactly the derivative of the function computed. Per layer it drops the (tokens x out) rank-r product and its
epilogue read in forward and the (tokens x in) one in backward, and XA moves to backward (with gradient
checkpointing the forward runs twice, so all of these would be paid twice). Numerics: the update is rounded
into Wm at the weight's scale instead of into Y at the output's; with B == 0 (a fresh adapter) Wm equals D(W).
``MERGE_PACKED = False`` turns it off (an A/B switch). On an H200 (bench/qlora.py, Llama-3-8B shape, NF4,
``checkpoint_kwargs``) one run gave 9.44k tokens/s merged against 8.24k unmerged.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from . import gemm_choice


class PackedWeight(Protocol):
    """A frozen weight stored in another format (4- or 8-bit codes): the fused op materializes it on demand."""

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor: ...


Weight = torch.Tensor | PackedWeight


MERGE_PACKED = True
"""Fold the update into a packed weight's dequantization where a kernel does that (see the module docstring)."""


@dataclass(frozen=True)
class LoraLinearArgs:
    """Non-tensor arguments of the fused op. ``transposed``: W is stored (in, out) (GPT-2's Conv1D); ``merge``:
    try the merged packed path."""

    scale: float
    transposed: bool = False
    merge: bool = False


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, A, B, args: LoraLinearArgs):
        in_features = A.shape[1]
        x2 = x.reshape(-1, in_features)
        xd2 = x2 if x_drop is None else x_drop.reshape(-1, in_features)
        packed = not isinstance(weight, torch.Tensor)
        ctx.args = args
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.has_drop = x_drop is not None
        merged = None
        if args.merge and packed and x_drop is None and hasattr(weight, "dequantize_lowrank"):
            merged = weight.dequantize_lowrank(x2.dtype, A, B, args.scale)
        ctx.merged = merged is not None
        if merged is not None:
            y = torch.nn.functional.linear(x2, merged, bias)
            need_x = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
            ctx.save_for_backward(x2 if need_x else None, A, B, merged if keeping_weights() else None)
            ctx.packed = weight
            return y.view(*x.shape[:-1], y.shape[-1])
        dense = weight.dequantize(x2.dtype) if packed else weight
        y, xa = unmerged_forward(x2, xd2, dense, bias, A, B, args)
        if packed and not keeping_weights():  # keep the codes, not the dequantized copy
            ctx.save_for_backward(xd2, xa, A, B)
            ctx.packed = weight
        else:  # a dense weight is a reference anyway; a dequantized one only while recomputing (keeping_weights)
            ctx.save_for_backward(xd2, xa, dense, A, B)
            ctx.packed = None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.merged:
            return _merged_backward(ctx, grad_out)
        if ctx.packed is None:
            xd2, xa, weight, A, B = ctx.saved_tensors
        else:
            xd2, xa, A, B = ctx.saved_tensors
            weight = None
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if need_x and weight is None:
            weight = ctx.packed.dequantize(g.dtype)
        grad_x, grad_xd, grad_A, grad_B = unmerged_backward(
            g, xd2, xa, weight, A, B, ctx.args, need_x, ctx.has_drop, ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        grad_x = grad_x.view(ctx.x_shape) if grad_x is not None else None
        grad_xd = grad_xd.view(ctx.x_shape) if grad_xd is not None else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None


def unmerged_forward(x2, xd2, dense, bias, A, B, args: LoraLinearArgs):
    """``(Y, XA)`` of the unmerged fused forward (module docstring) for 2-d ``x2`` and its dropout ``xd2``."""
    xa = xd2 @ A.t()
    return forward_from_xa(x2, xa, dense, bias, B, args), xa


def forward_from_xa(x2, xa, dense, bias, B, args: LoraLinearArgs):
    """Y = X @ W.T + b + s * XA @ B.T for a given XA: the base GEMM with the rank-r term."""
    w_t = dense if args.transposed else dense.t()  # (in, out) view, no copy
    s = args.scale

    def epilogue():
        # the rank-r product (and the bias) first, then the big GEMM adds it in its epilogue: cheaper than
        # y.addmm_(xa, B.T) after it, which reads and writes all of y once more (bench/lora_gemm.py), for
        # most shapes (gemm_choice); the scale rides in a GEMM's alpha or beta: no separate multiply launched
        if bias is not None:
            return torch.addmm(bias, xa, B.t(), alpha=s).addmm_(x2, w_t)
        return (xa @ B.t()).addmm_(x2, w_t, beta=s)

    def after():  # the base GEMM alone (cuBLAS's kernel of the frozen model), then the rank-r term added
        y = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
        return y.addmm_(xa, B.t(), alpha=s)

    def key():
        return x2.shape[0], w_t.shape[1], x2.shape[1], xa.shape[1], bias is not None, args.transposed, x2.dtype

    return gemm_choice.run("lora_forward", key, x2.device, (epilogue, after))


def unmerged_backward(g, xd2, xa, weight, A, B, args: LoraLinearArgs, need_x: bool, has_drop: bool,
                      need_A: bool, need_B: bool):
    """``(dX, dXd, dA, dB)`` of the unmerged fused op for the 2-d output gradient ``g`` (module docstring);
    ``weight`` dense (only read when ``need_x``). With dropout dX is the base part and dXd the update's."""
    s = args.scale
    ga = g @ B  # (N, r), unscaled: s is applied in the alpha/beta of the GEMMs that use it
    # addmm with beta=0 ignores its input (A, B: only a shape donor) and scales the product by alpha
    grad_A = torch.addmm(A, ga.t(), xd2, beta=0, alpha=s) if need_A else None
    grad_B = grad_lora_B(g, xa, B, s) if need_B else None
    grad_x = grad_xd = None
    if need_x and has_drop:
        grad_x = g @ (weight.t() if args.transposed else weight)  # (N, in)
        grad_xd = torch.addmm(xd2, ga, A, beta=0, alpha=s)
    elif need_x:
        grad_x = grad_input(g, ga, weight, A, args)
    return grad_x, grad_xd, grad_A, grad_B


CPU_TRANSPOSED_GRAD_B = True
"""grad_lora_B's CPU order (False: the direct one, as on CUDA; bench/train_cpu.py's A/B row)."""


def grad_lora_B(g: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """dB = s * G^T @ XA (out x r). On the CPU formed as the transpose of the (r x out) product s * XA^T @ G,
    which MKL's GEMM runs 1.6-1.9x faster at GPT-2's shapes with cold caches (bench/cpu_lora_gemms.py: ~12 ms
    of a 2 s step); the result is that product's transposed view, and autograd copies it into B's layout
    (r x out values). On CUDA the direct form."""
    if g.device.type == "cpu" and CPU_TRANSPOSED_GRAD_B:
        return torch.addmm(B.t(), xa.t(), g, beta=0, alpha=scale).t()
    return torch.addmm(B, g.t(), xa, beta=0, alpha=scale)


def grad_input(g, ga, weight, A, args: LoraLinearArgs):
    """dX = s * GA @ A + G @ W for GA = G @ B: by default the rank-r term first and the big GEMM adds it in its
    epilogue (scaled by beta), as in forward; or after it, where that is measured faster (gemm_choice)."""
    w = weight.t() if args.transposed else weight
    s = args.scale

    def epilogue():
        return (ga @ A).addmm_(g, w, beta=s)

    def after():
        return (g @ w).addmm_(ga, A, alpha=s)

    def key():
        return g.shape[0], w.shape[1], g.shape[1], A.shape[0], args.transposed, g.dtype

    return gemm_choice.run("lora_grad_input", key, g.device, (epilogue, after))


def _merged_backward(ctx, grad_out):
    """Backward of the merged packed path (module docstring): the update's gradients as in the unmerged path
    (XA formed here, where dB needs it: with checkpointing the forward runs twice, this once), dX through Wm
    materialized again by the same deterministic kernel, or kept from a recomputation (keeping_weights)."""
    x2, A, B, merged = ctx.saved_tensors
    s = ctx.args.scale
    g = grad_out.reshape(-1, grad_out.shape[-1])
    need_a, need_b = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    grad_A = grad_B = grad_x = None
    if need_a:
        grad_A = torch.addmm(A, (g @ B).t(), x2, beta=0, alpha=s)
    if need_b:
        grad_B = torch.addmm(B, g.t(), x2 @ A.t(), beta=0, alpha=s)
    if ctx.needs_input_grad[0]:
        if merged is None:
            merged = ctx.packed.dequantize_lowrank(g.dtype, A, B, s)
        if merged is None:  # the kernel accepted these operands in forward; only a changed environment gets here
            merged = torch.addmm(ctx.packed.dequantize(g.dtype), B, A, alpha=s)
        grad_x = (g @ merged).view(ctx.x_shape)
    grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias, grad_A, grad_B, None


_KEEP = threading.local()


def keeping_weights() -> bool:
    """True inside ``keep_weights()``."""
    return getattr(_KEEP, "depth", 0) > 0


@contextlib.contextmanager
def keep_weights():
    """Inside, the fused op saves a packed base's materialized 16-bit weight for backward instead of
    materializing it again there. Made for non-reentrant activation checkpointing (``checkpoint_kwargs``),
    which drops whatever the first forward saves and recomputes it right before the block's backward: so this
    holds one block's 16-bit weights for a moment and saves one of the three dequantizations per step.
    (Both passes must save the same tensors, hence the context around both.) Outside checkpointing it would
    keep every layer's weight until backward."""
    _KEEP.depth = getattr(_KEEP, "depth", 0) + 1
    try:
        yield
    finally:
        _KEEP.depth -= 1


def _checkpoint_contexts():
    return keep_weights(), keep_weights()


def checkpoint_kwargs() -> dict:
    """Arguments for ``torch.utils.checkpoint.checkpoint`` (or Hugging Face's ``gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=...)``): non-reentrant, forward and recomputation inside ``keep_weights``."""
    return {"use_reentrant": False, "context_fn": _checkpoint_contexts}


def lora_linear_fused(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout: torch.nn.Module | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """``x @ W.T + b + scale * dropout(x) @ A.T @ B.T`` as one autograd node (W must be frozen; a tensor or a
    packed weight dequantized to the compute dtype on demand).

    Under autocast every operand is cast to the autocast dtype first (the casts of A and B are tiny and
    differentiable, so fp32 master adapters still get their gradients).
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, A, B = (t.to(dtype) for t in (x, A, B))
        weight = weight.to(dtype) if isinstance(weight, torch.Tensor) else weight
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _apply(x, weight, bias, A, B, scale, dropout, transposed)
    return _apply(x, weight, bias, A, B, scale, dropout, transposed)


def _apply(x, weight, bias, A, B, scale, dropout, transposed):
    x_drop = dropout(x) if dropout is not None else None
    merge = MERGE_PACKED and x_drop is None and not isinstance(weight, torch.Tensor) \
        and not torch.compiler.is_compiling()
    args = LoraLinearArgs(float(scale), transposed, merge)
    return LoraLinearFunction.apply(x, x_drop, weight, bias, A, B, args)
