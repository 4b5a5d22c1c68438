"""Choose the implementation: the Triton kernels on CUDA when Triton imports, the reference otherwise.

Set ``LORAKIT_NO_TRITON=1`` to force the reference everywhere (to compare, or to work around a driver issue).
Both paths give the same bits, so the choice never changes results, only speed. The choice is made inside the
custom ops of ops.py (``torch.ops.lorakit.*``) by the inputs' device, so torch.compile sees one opaque node.

One shortcut: an eager call on plain CUDA tensors that needs no gradient runs the op's CUDA kernel directly.
The dispatcher round trip of a Python custom op (autograd wrapper, redispatch, backend wrapper) costs about
10 us per call, as much as a decode-sized GEMV itself; the kernel called is the very function the op
registers, so the bits are the same. Under torch.compile/export, on fake or subclassed tensors, on other
devices and whenever autograd must record the call, the op itself is called.
"""

from __future__ import annotations

import torch

from . import ops
from .nf4 import QuantState
from .ops import triton_module as _triton_module


def triton_available() -> bool:
    """True when the Triton kernels can be used (Triton imports and LORAKIT_NO_TRITON is not set)."""
    return _triton_module() is not None


def _direct(t: torch.Tensor) -> bool:
    """Call the CUDA kernel without the dispatcher: eager, a plain CUDA tensor (not fake, not a subclass)."""
    return not torch.compiler.is_compiling() and t.is_cuda and type(t) is torch.Tensor


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize a 4-bit tensor to ``dtype`` (default: the original dtype), on its own device."""
    dtype = state.dtype if dtype is None else dtype
    if _direct(packed):  # no autograd to record: the op has no backward (the weight is frozen)
        return ops.dequantize_4bit_cuda(packed, *ops.state_args(state), dtype)
    return ops.dequantize_4bit(packed, *ops.state_args(state), dtype)


def dequantize_lowrank(packed: torch.Tensor, state: QuantState, A: torch.Tensor, B: torch.Tensor, scale: float,
                       dtype: torch.dtype) -> torch.Tensor | None:
    """``D(W) + scale * B @ A`` rounded once to ``dtype`` in one Triton pass (eager CUDA, shapes the kernel
    takes), else None: the caller then keeps the low-rank term apart. Never recorded by autograd (the caller
    is an autograd Function that differentiates the product itself)."""
    triton = _triton_module()
    if triton is None or not _direct(packed) or not triton.lowrank_supported(state, A, B):
        return None
    return triton.dequantize_4bit_lowrank_triton(packed, state, A, B, scale, dtype)


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit W; fused (no dequantized copy) on CUDA, dequantize + matmul elsewhere.
    Differentiable in x and bias (the backward dequantizes W again)."""
    absmax, code, n_absmax, n_code, n_offset, shape, bs, qt, n_bs = ops.state_args(state)
    args = (x, packed, absmax, code, n_absmax, n_code, n_offset, bias, shape, bs, qt, n_bs, state.dtype)
    if _direct(x) and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None
                                                                             and bias.requires_grad))):
        return ops.gemv_4bit_cuda(*args)
    return ops.gemv_4bit(*args)


def dequantize_8bit(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row-wise int8 codes times SCB / 127 in ``dtype``: one Triton pass on CUDA (eager), the torch reference
    elsewhere and under torch.compile (whose fusion of it is its own business). Same bits either way."""
    from .int8 import dequantize_8bit as reference

    triton = _triton_module()
    if triton is not None and _direct(codes) and codes.dtype == torch.int8 and codes.dim() == 2 \
            and scb.shape == (codes.shape[0],):
        return triton.dequantize_8bit_triton(codes, scb, dtype)
    return reference(codes, scb, dtype)


def dequantize_8bit_lowrank(codes: torch.Tensor, scb: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                            dtype: torch.dtype) -> torch.Tensor | None:
    """int8 twin of ``dequantize_lowrank``: one Triton pass on eager CUDA, else None."""
    triton = _triton_module()
    if triton is None or not _direct(codes) or scb.shape != (codes.shape[0],) \
            or not triton.int8_lowrank_supported(codes, A, B):
        return None
    return triton.dequantize_8bit_lowrank_triton(codes, scb, A, B, scale, dtype)
