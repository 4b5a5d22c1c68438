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


# ------------------------------------------------------------------------------ dequantize + low rank
@triton.jit
def _lowrank_tile(a_ptr, b_ptr, rows64, row_ok, cols, col_ok, K, R, R_PAD: tl.constexpr, NATIVE: tl.constexpr):
    """(B @ A)[rows, cols] in fp32 from the tensor cores: B (N, R) and A (R, K) row-major, R padded to R_PAD."""
    j = tl.arange(0, R_PAD)
    j_ok = j < R
    b = tl.load(b_ptr + rows64[:, None] * R + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
    a = tl.load(a_ptr + j[:, None] * K + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
    if NATIVE:
        delta = tl.dot(b, a)
    else:  # the interpreter's 16-bit dot is wrong (triton 3.9): the same exact products in fp32
        delta = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    return delta


@triton.jit
def _dequant_lowrank_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                            a_ptr, b_ptr, out_ptr, N, K, R, scale,
                            BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                            R_PAD: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
                            NATIVE: tl.constexpr):
    # out[n, k] = dtype(D(W)[n, k] + scale * (B @ A)[n, k]) for W (N, K), K % BLOCKSIZE == 0 (a row is whole
    # blocks). One program = BLOCK_N rows x NB blocks of a row, read as (BLOCK_N, NB, HALF) bytes: absmax (and
    # its nested decode) once per block, as the plain kernel; D(W) is the reference's fp32 product code * absmax,
    # interleaved into a (BLOCK_N, TILE_K) tile. The tile's rank-R product comes from one tl.dot over A's
    # contiguous columns in fp32 (the compiler moves one of the two through shared memory to add them); one
    # rounding at the end. On an H200 (bench/qlora.py, 4096 x 14336, r=16): 73 us against 63 us for the
    # dequantization alone; a variant with R FMAs per value in the bytes' layout ran at 167 us at best.
    HALF: tl.constexpr = BLOCKSIZE // 2
    TILE_K: tl.constexpr = NB * BLOCKSIZE
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    blk_in_row = pid_k * NB + tl.arange(0, NB)
    blk_ok = row_ok[:, None] & (blk_in_row * BLOCKSIZE < K)[None, :]
    blk = rows64[:, None] * (K // BLOCKSIZE) + blk_in_row[None, :]
    scale_q = _absmax_rows(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, blk_ok,
                           NESTED, NESTED_BS)[:, :, None]
    byte = blk[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :]
    packed = tl.load(packed_ptr + byte, mask=blk_ok[:, :, None], other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4)) * scale_q
    low = tl.load(code_ptr + (packed & 0x0F)) * scale_q
    values = tl.reshape(tl.join(high, low), (BLOCK_N, TILE_K))  # value 2i, then 2i + 1, block after block
    cols = pid_k * TILE_K + tl.arange(0, TILE_K)
    col_ok = cols < K
    delta = _lowrank_tile(a_ptr, b_ptr, rows64, row_ok, cols, col_ok, K, R, R_PAD, NATIVE)
    out = _round_to(values + scale * delta, out_ptr.dtype.element_ty, NATIVE)
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


LOWRANK_MAX_RANK = 128


def _factors_fit(shape, A: torch.Tensor, B: torch.Tensor) -> bool:
    """A (r, K) and B (N, r) for a 2-D (N, K) weight, 0 < r <= 128, both in one 16-bit dtype (the tensor cores
    multiply them exactly)."""
    if len(shape) != 2 or A.dim() != 2 or B.dim() != 2:
        return False
    n, k = shape
    r = A.shape[0]
    return (0 < r <= LOWRANK_MAX_RANK and A.shape == (r, k) and B.shape == (n, r) and A.dtype == B.dtype
            and A.dtype in (torch.bfloat16, torch.float16))


def lowrank_supported(state: QuantState, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Operands ``dequantize_4bit_lowrank_triton`` takes: a 2-D W whose rows are whole blocks (block <= 512)
    and factors that fit (``_factors_fit``)."""
    return (_factors_fit(state.shape, A, B) and state.shape[1] % state.blocksize == 0
            and state.blocksize <= 512)


def dequantize_4bit_lowrank_triton(packed: torch.Tensor, state: QuantState, A: torch.Tensor, B: torch.Tensor,
                                   scale: float, dtype: torch.dtype, block_n: int = 32, tile_k: int = 128,
                                   num_warps: int = 4) -> torch.Tensor:
    """``D(W) + scale * B @ A`` rounded once to ``dtype``, in one pass: the dequantization's memory traffic
    plus a rank-r product per tile on the tensor cores (A and B are tiny and cached). With B == 0 the values
    equal ``dequantize_4bit_triton``'s (bits too, but for FP4's -0, which becomes +0). ``block_n`` rows by
    ``tile_k`` columns per program (powers of two; defaults: the best of an H200 sweep) and ``num_warps`` are
    tuning knobs."""
    if not lowrank_supported(state, A, B):
        raise ValueError(f"dequantize_4bit_lowrank_triton: unsupported shapes W {state.shape} (block "
                         f"{state.blocksize}), A {tuple(A.shape)} {A.dtype}, B {tuple(B.shape)} {B.dtype}")
    n, k = state.shape
    A, B = A.contiguous(), B.contiguous()
    nb = max(1, tile_k // state.blocksize)
    block_n = max(16, block_n)  # tl.dot takes 16 rows at least
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    nested_absmax, nested_code, offset, is_nested, nested_bs = _state_pointers(state)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, nb * state.blocksize))
    _dequant_lowrank_kernel[grid](packed, state.absmax, state.code, nested_absmax, nested_code, offset, A, B, out,
                                  n, k, A.shape[0], float(scale), BLOCKSIZE=state.blocksize, BLOCK_N=block_n,
                                  NB=nb, R_PAD=max(16, triton.next_power_of_2(A.shape[0])), NESTED=is_nested,
                                  NESTED_BS=nested_bs, NATIVE=not _interpreted(), num_warps=num_warps, **_LAUNCH)
    return out


# ---------------------------------------------------------------------------------------------- int8
@triton.jit
def _dequant_int8_kernel(codes_ptr, scb_ptr, out_ptr, n_cols, INV: tl.constexpr, BLOCK: tl.constexpr):
    # one program = BLOCK columns of one row: (code * SCB[row]) * INV in fp32, two roundings, never an FMA
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    codes = tl.load(codes_ptr + row * n_cols + cols, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scb_ptr + row).to(tl.float32)
    values = (codes * scale) * INV
    tl.store(out_ptr + row * n_cols + cols, _to_dtype(values, out_ptr.dtype.element_ty), mask=mask)


def dequantize_8bit_triton(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype,
                           out: torch.Tensor | None = None, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """Triton twin of ``int8.dequantize_8bit`` (bit-identical) in one pass: int8 in, ``dtype`` out. The torch
    reference makes three full-size passes (two fp32 multiplies, then the cast)."""
    from .int8 import INV_127

    codes, scb = codes.contiguous(), scb.contiguous()
    rows, cols = codes.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    grid = (rows, triton.cdiv(cols, block))
    _dequant_int8_kernel[grid](codes, scb, out, cols, INV=INV_127, BLOCK=block, num_warps=num_warps, **_LAUNCH)
    return out


@triton.jit
def _dequant_int8_lowrank_kernel(codes_ptr, scb_ptr, a_ptr, b_ptr, out_ptr, N, K, R, scale, INV: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                                 NATIVE: tl.constexpr):
    # out[n, k] = dtype((code * SCB[n]) * INV + scale * (B @ A)[n, k]): the reference's fp32 value (two
    # roundings, no FMA), the rank-R product from the tensor cores in fp32, one rounding at the end
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < K
    rows64 = rows.to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    codes = tl.load(codes_ptr + rows64[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.float32)
    scb = tl.load(scb_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    delta = _lowrank_tile(a_ptr, b_ptr, rows64, row_ok, cols, col_ok, K, R, R_PAD, NATIVE)
    values = (codes * scb[:, None]) * INV + scale * delta
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], _round_to(values, out_ptr.dtype.element_ty, NATIVE),
             mask=ok)


def int8_lowrank_supported(codes: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Operands ``dequantize_8bit_lowrank_triton`` takes: 2-D int8 codes and factors that fit."""
    return codes.dtype == torch.int8 and _factors_fit(codes.shape, A, B)


def dequantize_8bit_lowrank_triton(codes: torch.Tensor, scb: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                   scale: float, dtype: torch.dtype, block_n: int = 32, block_k: int = 256,
                                   num_warps: int = 4) -> torch.Tensor:
    """``codes * SCB / 127 + scale * B @ A`` rounded once to ``dtype``, in one pass (int8 twin of
    ``dequantize_4bit_lowrank_triton``; with B == 0 the values equal ``dequantize_8bit_triton``'s)."""
    from .int8 import INV_127

    if not int8_lowrank_supported(codes, A, B):
        raise ValueError(f"dequantize_8bit_lowrank_triton: unsupported operands codes {tuple(codes.shape)} "
                         f"{codes.dtype}, A {tuple(A.shape)} {A.dtype}, B {tuple(B.shape)} {B.dtype}")
    codes, scb, A, B = codes.contiguous(), scb.contiguous(), A.contiguous(), B.contiguous()
    n, k = codes.shape
    r = A.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=codes.device)
    block_n, block_k = max(16, block_n), max(16, block_k)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_int8_lowrank_kernel[grid](codes, scb, A, B, out, n, k, r, float(scale), INV=INV_127, BLOCK_N=block_n,
                                       BLOCK_K=block_k, R_PAD=max(16, triton.next_power_of_2(r)),
                                       NATIVE=not _interpreted(), num_warps=num_warps, **_LAUNCH)
    return out


# ---------------------------------------------------------------------------------------------- GEMV
@triton.jit
def _round_to(x, dtype: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 -> dtype, round to nearest even: the hardware conversion when compiled (NATIVE), else
    ``_to_dtype`` (the interpreter's own bf16 cast truncates)."""
    if NATIVE:
        out = x.to(dtype)
    else:
        out = _to_dtype(x, dtype)
    return out


@triton.jit
def _bf16_pair(even, odd, NATIVE: tl.constexpr):
    """Round two fp32 tensors to bf16 (nearest even) into one uint32 each: ``even`` in the low half, ``odd`` in
    the high half, i.e. the two values in memory order. Compiled, one ``cvt.rn.bf16x2.f32`` per pair (a
    single-value conversion is a quarter-rate instruction, the bottleneck of this kernel otherwise)."""
    if NATIVE:
        out = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [odd, even],
                                        dtype=tl.uint32, is_pure=True, pack=1)
    else:
        lo = _to_dtype(even, tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = _to_dtype(odd, tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        out = lo | (hi << 16)
    return out


@triton.jit
def _gemv_kernel(x_ptr, x_pairs_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                 bias_ptr, out_ptr, M, N, K, HALF_K, K_SPLIT, HALF_K_SPLIT, stride_xm, stride_xp, stride_om,
                 BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 USE_DOT: tl.constexpr, ATOMIC: tl.constexpr, NATIVE: tl.constexpr):
    # out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]). A program owns BLOCK_N rows of W, BLOCK_M rows of x and
    # the columns [pid_k * K_SPLIT, + K_SPLIT) (all of K without split-K), walked BLOCK_K at a time; W is read
    # once for all BLOCK_M rows. The (BLOCK_N, BLOCK_K) tile of W is viewed as (BLOCK_N, NG, GROUP): GROUP
    # consecutive values of a row lie in one quantization block (GROUP divides K and BLOCKSIZE), so absmax
    # (and its nested decode) is read once per group, not per value. A byte holds values 2i (high nibble) and
    # 2i + 1 (low nibble): both are decoded from the 16-entry code book (a 64-byte table, L1-resident),
    # scaled in fp32 and rounded to x's dtype as the reference's dequantize-then-matmul does; products are
    # summed in fp32 (FMA path: per-thread partial sums, one reduction at the end; dot path: tensor cores).
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF_G: tl.constexpr = GROUP // 2
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    PAIRS: tl.constexpr = dtype == tl.bfloat16  # round both values of a byte in one instruction
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    grp = tl.arange(0, NG)
    half = tl.arange(0, HALF_G)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)  # a multiple of GROUP, as K and K_SPLIT are
    w_ptrs = (packed_ptr + rows64[:, None, None] * HALF_K + pid_k * HALF_K_SPLIT
              + (grp * HALF_G)[None, :, None] + half[None, None, :])  # (BLOCK_N, NG, HALF_G) bytes
    row_flat = rows64[:, None] * K + (grp * GROUP)[None, :]  # (BLOCK_N, NG): index of each group's value 0, - k0
    even_col = (grp * GROUP)[:, None] + 2 * half[None, :]  # (NG, HALF_G) column of value 2i, - k0
    # bf16 x read as uint32 pairs (value 2i, value 2i + 1), in W's tile shape: vector loads, no layout change
    xp_ptrs = (x_pairs_ptr + pid_k * HALF_K_SPLIT
               + tl.broadcast_to(((grp * HALF_G)[:, None] + half[None, :])[None, :, :], (BLOCK_N, NG, HALF_G)))
    m_idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m_idx < M
    acc_e = tl.zeros((BLOCK_N, NG, HALF_G), dtype=tl.float32)  # FMA path, one row of x: partial sums
    acc_o = tl.zeros((BLOCK_N, NG, HALF_G), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        grp_ok = row_ok[:, None] & ((k0 + grp * GROUP) < k_hi)[None, :]
        byte = tl.load(w_ptrs, mask=grp_ok[:, :, None], other=0).to(tl.int32)
        scale = _absmax_rows(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                             (row_flat + k0) // BLOCKSIZE, grp_ok, NESTED, NESTED_BS)[:, :, None]
        v_even = tl.load(code_ptr + (byte >> 4)) * scale  # fp32, rounded once
        v_odd = tl.load(code_ptr + (byte & 0x0F)) * scale
        if PAIRS:
            pair = _bf16_pair(v_even, v_odd, NATIVE)
            w_even_bits = (pair & 0xFFFF).to(tl.uint16)
            w_odd_bits = (pair >> 16).to(tl.uint16)
        if USE_DOT:  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N), exact products summed in fp32
            if PAIRS:
                w = tl.join(w_even_bits.to(tl.bfloat16, bitcast=True), w_odd_bits.to(tl.bfloat16, bitcast=True))
            else:
                w = tl.join(_round_to(v_even, dtype, NATIVE), _round_to(v_odd, dtype, NATIVE))
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))  # value 2i, then 2i + 1
            cols = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + m_idx[:, None] * stride_xm + cols[None, :],
                         mask=m_ok[:, None] & (cols < k_hi)[None, :], other=0.0)
            if NATIVE:
                acc = tl.dot(xt, tl.trans(w), acc)
            else:  # the interpreter's 16-bit dot is wrong (triton 3.9): the same exact products in fp32
                acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            if PAIRS:  # bf16 -> fp32 is a 16-bit shift
                w_even = (pair << 16).to(tl.float32, bitcast=True)
                w_odd = (pair & 0xFFFF0000).to(tl.float32, bitcast=True)
            else:
                w_even = _round_to(v_even, dtype, NATIVE).to(tl.float32)
                w_odd = _round_to(v_odd, dtype, NATIVE).to(tl.float32)
            x_off = tl.broadcast_to((k0 + even_col)[None, :, :], (BLOCK_N, NG, HALF_G))  # W's shape
            x_ok = tl.broadcast_to(((k0 + grp * GROUP) < k_hi)[None, :, None], (BLOCK_N, NG, HALF_G))  # by group
            for i in tl.static_range(BLOCK_M):
                m = pid_m * BLOCK_M + i
                if BLOCK_M > 1:
                    x_ok = x_ok & (x_off * 0 + m < M)
                if PAIRS:  # x through a uint32 view: the pair (2i, 2i + 1) in one load, bf16 -> fp32 by shifts
                    x_pair = tl.load(xp_ptrs + m * stride_xp, mask=x_ok, other=0).to(tl.uint32, bitcast=True)
                    x_even = (x_pair << 16).to(tl.float32, bitcast=True)
                    x_odd = (x_pair & 0xFFFF0000).to(tl.float32, bitcast=True)
                else:
                    x_even = tl.load(x_ptr + m * stride_xm + x_off, mask=x_ok, other=0.0).to(tl.float32)
                    x_odd = tl.load(x_ptr + m * stride_xm + x_off + 1, mask=x_ok, other=0.0).to(tl.float32)
                if BLOCK_M == 1:
                    acc_e = tl.fma(w_even, x_even, acc_e)
                    acc_o = tl.fma(w_odd, x_odd, acc_o)
                else:
                    part = tl.sum(tl.sum(tl.fma(w_even, x_even, w_odd * x_odd), axis=2), axis=1)  # (BLOCK_N,)
                    acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == i, part[None, :], 0.0)
        w_ptrs += BLOCK_K // 2
        xp_ptrs += BLOCK_K // 2
    if BLOCK_M == 1 and not USE_DOT:
        acc += tl.sum(tl.sum(acc_e + acc_o, axis=2), axis=1)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = bias * (pid_k == 0).to(tl.float32)  # added by the first K split only
        acc += bias[None, :]
    out_ptrs = out_ptr + m_idx[:, None] * stride_om + rows[None, :]
    out_ok = m_ok[:, None] & row_ok[None, :]
    if ATOMIC:  # split-K: fp32 partial sums into a zeroed buffer, rounded to x's dtype afterwards
        tl.atomic_add(out_ptrs, acc, mask=out_ok)
    else:
        tl.store(out_ptrs, _round_to(acc, out_ptr.dtype.element_ty, NATIVE), mask=out_ok)


def gemv_config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Default knobs of ``gemv_4bit_triton`` for x (M, K) @ W (N, K).T: the best total over W of 4096x14336
    and 14336x4096 in bench/gemv_sweep.py on an H100 (2026-11-23): one row on FMAs, 2-16 rows through
    tl.dot; one pipelining stage (with more, Triton turns the code-book gather into async copies)."""
    if M > 1 and dtype in (torch.bfloat16, torch.float16):
        return {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 1, "dot": True, "split_k": 1}
    if M > 1:
        return {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 1, "dot": False, "split_k": 1}
    return {"block_n": 4, "block_k": 1024, "num_warps": 4, "num_stages": 1, "dot": False, "split_k": 1}


def _interpreted() -> bool:
    return type(_gemv_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1: no PTX, no inline asm


def gemv_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     bias: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
                     num_warps: int | None = None, split_k: int | None = None, dot: bool | None = None,
                     block_m: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """``x @ dequantize(W).T + bias`` for a few rows of x without writing the dequantized weight anywhere.

    x: (..., K) in the compute dtype; W: (N, K) as ``packed`` + ``state``, K even. For small batches
    (decoding), where reading the 4-bit weight once is the whole cost: W is read once per ``block_m`` (<= 16)
    rows of x. The other arguments are tuning knobs, None meaning ``gemv_config``'s choice: tile (block_n rows
    of W by block_k columns), warps, pipelining stages, ``split_k`` > 1 to cut K among programs that add fp32
    partial sums atomically (order not deterministic), ``dot`` for the tensor cores (16-bit x only).
    """
    N, K = state.shape
    if K % 2:
        raise ValueError(f"gemv_4bit_triton needs an even number of input features, got {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    cfg = gemv_config(M, N, K, x.dtype)
    block_n = cfg["block_n"] if block_n is None else block_n
    block_k = cfg["block_k"] if block_k is None else block_k
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    split_k = cfg["split_k"] if split_k is None else split_k
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    dot = cfg["dot"] if dot is None else dot
    dot = dot and x.dtype in (torch.bfloat16, torch.float16)  # fp32 would go through tf32: not exact
    if dot:  # tl.dot needs 16 x 16 tiles at least; extra rows of x are masked
        block_n, block_k, block_m = max(block_n, 16), max(block_k, 32), 16
    elif block_m is None:
        block_m = min(16, triton.next_power_of_2(M))
    group = min(K & -K, state.blocksize, block_k)  # largest power of two dividing K, within a block and the tile
    k_split = triton.cdiv(triton.cdiv(K, max(1, split_k)), block_k) * block_k
    n_split = triton.cdiv(K, k_split)
    atomic = n_split > 1
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device) if atomic else x.new_empty(M, N)
    nested_absmax, nested_code, offset, is_nested, nested_bs = _state_pointers(state)
    grid = (triton.cdiv(N, block_n), n_split, triton.cdiv(M, block_m))
    launch = dict(_LAUNCH, num_warps=num_warps, num_stages=num_stages)
    pairs = x.dtype == torch.bfloat16 and x2.stride(0) % 2 == 0 and x2.storage_offset() % 2 == 0
    if x.dtype == torch.bfloat16 and not pairs:
        x2 = x2.contiguous()
    x_pairs = x2.view(torch.int32) if x.dtype == torch.bfloat16 else x2  # bf16 x read as (2i, 2i + 1) pairs
    _gemv_kernel[grid](x2, x_pairs, packed, state.absmax, state.code, nested_absmax, nested_code, offset,
                       bias if bias is not None else out, out, M, N, K, K // 2, k_split, k_split // 2,
                       x2.stride(0), x_pairs.stride(0), out.stride(0),
                       BLOCKSIZE=state.blocksize, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       NESTED=is_nested, NESTED_BS=nested_bs, HAS_BIAS=bias is not None, USE_DOT=dot,
                       ATOMIC=atomic, NATIVE=not _interpreted(), **launch)
    if atomic:
        out = out.to(x.dtype)
    return out.reshape(*lead, N)
