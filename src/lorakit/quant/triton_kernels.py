"""Triton kernels for 4-bit weights: dequantization, and a fused dequant + matmul for a few rows (GEMV).

Both reproduce lorakit.quant.nf4 exactly: every value is ``dtype(code[q] * absmax)`` with absmax decoded as
``map[q2] * absmax2`` then ``+ offset`` in fp32, each step rounded on its own. Floating-point contraction is
switched off at compile time (``enable_fp_fusion=False``) so no multiply-add is fused into an FMA, which
would round once instead of twice and break bit equality with the reference and with bitsandbytes.

Layout reminders (see nf4.py): values are flat row-major, block b covers values [b * bs, (b + 1) * bs),
byte i holds value 2i in its high nibble and value 2i + 1 in its low nibble.

The kernels run on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the tests check them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import QuantState

_LAUNCH = {"enable_fp_fusion": False}


@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even, as torch's ``.to``. bf16 is rounded with integer arithmetic:
    the same bits on a GPU and under TRITON_INTERPRET=1, whose own bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)  # finite values only (quantized weights always are)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out  # one return: the compiler types every return statement, taken or not


@triton.jit
def _absmax_rows(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                 NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """fp32 absmax of the blocks ``blk`` (any shape), decoding the double quantization when NESTED."""
    if NESTED:
        q2 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        decoded = tl.load(nested_code_ptr + q2) * scale2  # one rounding ...
        absmax = decoded + tl.load(offset_ptr)  # ... and a second one, never an FMA
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
                    n, n_blocks,
                    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    # one program = ROWS quantization blocks; tile (ROWS, BLOCKSIZE // 2) bytes -> (ROWS, BLOCKSIZE) values
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_ok = blk < n_blocks
    byte = blk.to(tl.int64)[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    byte_ok = row_ok[:, None] & (byte * 2 < n)
    packed = tl.load(packed_ptr + byte, mask=byte_ok, other=0).to(tl.int32)
    scale = _absmax_rows(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, row_ok,
                         NESTED, NESTED_BS)[:, None]  # (ROWS, 1)
    high = tl.load(code_ptr + (packed >> 4)) * scale
    low = tl.load(code_ptr + (packed & 0x0F)) * scale
    values = tl.reshape(tl.join(high, low), (ROWS, BLOCKSIZE))  # interleave: value 2i, then 2i + 1
    index = blk.to(tl.int64)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + index, _to_dtype(values, out_ptr.dtype.element_ty), mask=row_ok[:, None] & (index < n))


def _state_pointers(state: QuantState):
    nested = state.nested
    if nested is None:
        dummy = state.absmax  # never read when NESTED is False
        return dummy, dummy, dummy, False, 256
    return nested.absmax, nested.code, nested.offset.reshape(1), True, nested.blocksize


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                           out: torch.Tensor | None = None, rows: int | None = None,
                           num_warps: int = 4) -> torch.Tensor:
    """Triton twin of ``nf4.dequantize_4bit`` (bit-identical): one launch, double quantization decoded inline.

    ``rows`` (quantization blocks per program) and ``num_warps`` are tuning knobs (bench/qlora.py sweeps them).
    """
    dtype = state.dtype if dtype is None else dtype
    n = state.numel
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    n_blocks = state.n_blocks
    if rows is None:  # 64 blocks of 64 per program: the fastest tile measured on an H100 (bench/qlora.py)
        rows = max(1, min(64, 4096 // state.blocksize))
    nested_absmax, nested_code, offset, is_nested, nested_bs = _state_pointers(state)
    grid = (triton.cdiv(n_blocks, rows),)
    _dequant_kernel[grid](packed, state.absmax, state.code, nested_absmax, nested_code, offset, out, n, n_blocks,
                          BLOCKSIZE=state.blocksize, ROWS=rows, NESTED=is_nested, NESTED_BS=nested_bs,
                          num_warps=num_warps, **_LAUNCH)
    return out


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                 bias_ptr, out_ptr, N, K, stride_xm, stride_om,
                 BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NESTED: tl.constexpr,
                 NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr):
    # out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for even K: each byte holds W[n, k] (high nibble) and
    # W[n, k + 1] (low nibble) for even k, so a (BLOCK_N, BLOCK_K // 2) tile of bytes is read once, row by row.
    # W is rounded to x's dtype as the reference's dequantize-then-matmul does; products summed in fp32.
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, HALF_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        even = k0 + 2 * tl.arange(0, HALF_K)  # (HALF_K,) even column indices
        col_ok = even < K
        ok = row_ok[:, None] & col_ok[None, :]
        flat = rows.to(tl.int64)[:, None] * K + even[None, :]  # value index of the even column
        byte = tl.load(packed_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
        scale = _absmax_rows(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // BLOCKSIZE, ok,
                             NESTED, NESTED_BS)
        w_even = _to_dtype(tl.load(code_ptr + (byte >> 4)) * scale, x_ptr.dtype.element_ty).to(tl.float32)
        w_odd = _to_dtype(tl.load(code_ptr + (byte & 0x0F)) * scale, x_ptr.dtype.element_ty).to(tl.float32)
        x_even = tl.load(x_ptr + m * stride_xm + even, mask=col_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + m * stride_xm + even + 1, mask=col_ok, other=0.0).to(tl.float32)
        acc += tl.where(ok, w_even * x_even[None, :] + w_odd * x_odd[None, :], 0.0)
    total = tl.sum(acc, axis=1)
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rows, _to_dtype(total, out_ptr.dtype.element_ty), mask=row_ok)


def gemv_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     bias: torch.Tensor | None = None, block_n: int = 4, block_k: int = 512,
                     num_warps: int = 4) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` for a few rows of x without writing the dequantized weight anywhere.

    x: (..., K) in the compute dtype; W: (N, K) as ``packed`` + ``state``, K even. For small batches
    (decoding), where reading the 4-bit weight once is the whole cost.
    """
    N, K = state.shape
    if K % 2:
        raise ValueError(f"gemv_4bit_triton needs an even number of input features, got {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    nested_absmax, nested_code, offset, is_nested, nested_bs = _state_pointers(state)
    grid = (triton.cdiv(N, block_n), M)
    bias_arg = bias if bias is not None else out
    _gemv_kernel[grid](x2, packed, state.absmax, state.code, nested_absmax, nested_code, offset, bias_arg, out,
                       N, K, x2.stride(0), out.stride(0),
                       BLOCKSIZE=state.blocksize, BLOCK_N=block_n, BLOCK_K=block_k, NESTED=is_nested,
                       NESTED_BS=nested_bs, HAS_BIAS=bias is not None, num_warps=num_warps, **_LAUNCH)
    return out.reshape(*lead, N)
