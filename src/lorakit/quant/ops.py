"""The 4-bit kernels as PyTorch custom ops: ``torch.ops.lorakit.dequantize_4bit`` and ``.gemv_4bit``.

Why ops and not plain functions: torch.compile traces an op as one opaque node (its fake implementation gives
the output's shape and dtype), so a compiled model calls the Triton kernels without a graph break, and meta /
fake tensors (export, shape propagation) work. An op takes only tensors and plain values, so a QuantState goes
in as its tensors plus shape, blocksize and dtype, and is rebuilt inside.

Kernels: CPU (and any other device) runs the reference in nf4.py; CUDA runs the Triton kernels when they are
usable (``triton_module()``: Triton imports and ``LORAKIT_NO_TRITON`` is not 1), else the reference. Both give
the same bits. ``gemv_4bit`` has a backward (for x and bias), ``dequantize_4bit`` none: the weight is frozen.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._triton import load_kernels
from .nf4 import NestedState, QuantState
from .nf4 import dequantize_4bit as _reference_dequantize


@functools.lru_cache(maxsize=1)
def triton_module():
    """lorakit.quant.triton_kernels, or None when Triton does not import or LORAKIT_NO_TRITON=1."""
    return load_kernels("lorakit.quant.triton_kernels")


def _state(shape, dtype, blocksize, quant_type, absmax, code, nested_absmax, nested_code, nested_offset,
           nested_blocksize) -> QuantState:
    nested = None
    if nested_absmax is not None:
        nested = NestedState(nested_absmax, nested_code, nested_offset, nested_blocksize)
    return QuantState(tuple(shape), dtype, blocksize, quant_type, absmax, code, nested)


def state_args(state: QuantState) -> tuple:
    """A QuantState as the op arguments after the data: 5 tensors (None without double quantization), then
    shape, blocksize, quant_type and the nested blocksize."""
    n = state.nested
    tensors = (None, None, None) if n is None else (n.absmax, n.code, n.offset)
    return (state.absmax, state.code, *tensors, list(state.shape), state.blocksize, state.quant_type,
            256 if n is None else n.blocksize)


# ---------------------------------------------------------------------------------------------- dequantize
# Schemas written out: torch 2.4 cannot infer them from postponed (string) annotations.
_STATE_ARGS = "Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, Tensor? nested_offset"
_META_ARGS = "int[] shape, int blocksize, str quant_type, int nested_blocksize"
_DEQUANTIZE_SCHEMA = f"(Tensor packed, {_STATE_ARGS}, {_META_ARGS}, ScalarType dtype) -> Tensor"
_GEMV_SCHEMA = (f"(Tensor x, Tensor packed, {_STATE_ARGS}, Tensor? bias, {_META_ARGS}, "
                "ScalarType weight_dtype) -> Tensor")


@torch.library.custom_op("lorakit::dequantize_4bit", mutates_args=(), schema=_DEQUANTIZE_SCHEMA)
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                    nested_offset: torch.Tensor | None, shape: list[int], blocksize: int, quant_type: str,
                    nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype`` and ``shape`` (reference implementation: every device but CUDA)."""
    state = _state(shape, dtype, blocksize, quant_type, absmax, code, nested_absmax, nested_code,
                   nested_offset, nested_blocksize)
    return _reference_dequantize(packed, state, dtype)


@dequantize_4bit.register_kernel("cuda")
def dequantize_4bit_cuda(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize,
                         quant_type, nested_blocksize, dtype):
    """The CUDA kernel (Triton when usable); dispatch.dequantize calls it directly in eager mode."""
    state = _state(shape, dtype, blocksize, quant_type, absmax, code, nested_absmax, nested_code,
                   nested_offset, nested_blocksize)
    triton = triton_module()
    if triton is None:
        return _reference_dequantize(packed, state, dtype)
    return triton.dequantize_4bit_triton(packed, state, dtype)


@dequantize_4bit.register_fake
def _dequantize_4bit_fake(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize,
                          quant_type, nested_blocksize, dtype):
    return packed.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------- gemv
def _reference_gemv(x, packed, state, bias):
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, _reference_dequantize(packed, state, x.dtype), bias)


@torch.library.custom_op("lorakit::gemv_4bit", mutates_args=(), schema=_GEMV_SCHEMA)
def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
              nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
              nested_offset: torch.Tensor | None, bias: torch.Tensor | None, shape: list[int], blocksize: int,
              quant_type: str, nested_blocksize: int, weight_dtype: torch.dtype) -> torch.Tensor:
    """``x @ W.T + bias`` in x's dtype for the (N, K) 4-bit W (reference: dequantize, then one matmul)."""
    state = _state(shape, weight_dtype, blocksize, quant_type, absmax, code, nested_absmax, nested_code,
                   nested_offset, nested_blocksize)
    return _reference_gemv(x, packed, state, bias)


@gemv_4bit.register_kernel("cuda")
def gemv_4bit_cuda(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, bias, shape, blocksize,
                   quant_type, nested_blocksize, weight_dtype):
    """The CUDA kernel (fused Triton GEMV when usable and K is even); dispatch.gemv_4bit calls it directly."""
    state = _state(shape, weight_dtype, blocksize, quant_type, absmax, code, nested_absmax, nested_code,
                   nested_offset, nested_blocksize)
    triton = triton_module()
    if triton is None or len(shape) != 2 or shape[1] % 2:
        return _reference_gemv(x, packed, state, bias)
    return triton.gemv_4bit_triton(x, packed, state, bias)


@gemv_4bit.register_fake
def _gemv_4bit_fake(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, bias, shape,
                    blocksize, quant_type, nested_blocksize, weight_dtype):
    return x.new_empty(*x.shape[:-1], shape[0])


def _gemv_setup_context(ctx, inputs, output):
    x, packed, absmax, code, nested_absmax, nested_code, nested_offset, bias = inputs[:8]
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, nested_offset)
    ctx.rest = inputs[8:]  # shape, blocksize, quant_type, nested_blocksize, weight_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gemv_backward(ctx, grad):
    """dL/dx = dL/dy @ W (W dequantized again, in the gradient's dtype); dL/dbias = dL/dy summed; W frozen."""
    packed, absmax, code, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    shape, blocksize, quant_type, nested_blocksize, _ = ctx.rest
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, shape, blocksize,
                            quant_type, nested_blocksize, grad.dtype)
        grad_x = grad @ w
    if ctx.bias_dtype is not None and ctx.needs_input_grad[7]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None, None, None


gemv_4bit.register_autograd(_gemv_backward, setup_context=_gemv_setup_context)
