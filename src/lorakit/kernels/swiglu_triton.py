"""Triton kernels for the SiLU (gated or not) of a fused LoRA MLP: one pass forward, one pass backward.

Forward writes H = silu(G) * U (or silu(G)); backward reads dH, G, U once and writes H (recomputed, for the
LoRA's dA), dG and dU. PyTorch's ops take five passes for the same backward (silu, the product, two products
for the gradients, silu_backward), each reading and writing a (tokens x intermediate) tensor.

The arithmetic and its roundings follow PyTorch's kernels, so both paths give the same values up to the
last bit of the exponential: silu(G) is rounded to the dtype before the product (as ``F.silu(g) * u``);
dG = dtype(dtype(dH * U) * s * (1 + G * (1 - s))) with s = sigmoid(G), as ``silu_backward(dH * U, G)``.
They run on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the tests check them against
``lorakit.kernels.gated_mlp``'s torch path).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quant.triton_kernels import _to_dtype

_BLOCK = 2048  # elements a program of the 1-D kernels; with _WARPS, the fastest of bench/silu_blocks.py on 8B
_WARPS = 4  # (H200, 2026-12-04: forward + backward 301 us against 330 at 1024 elements; 1B 362 against 365)
_LAUNCH = {"enable_fp_fusion": True}  # multiply-adds contracted, as nvcc does for PyTorch's own kernels


@triton.jit
def _silu_fwd(g_ptr, u_ptr, h_ptr, n, GATED: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = _to_dtype(g / (1.0 + tl.exp(-g)), DTYPE).to(tl.float32)  # torch's formula for silu
    if GATED:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = _to_dtype(h * u, DTYPE).to(tl.float32)
    tl.store(h_ptr + offs, _to_dtype(h, DTYPE), mask=mask)


@triton.jit
def _silu_bwd(dh_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, n, GATED: tl.constexpr, WANT_H: tl.constexpr,
              DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _silu_grads(dh, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, offs, mask, GATED, WANT_H, DTYPE)


@triton.jit
def _silu_grads(dh, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, offs, mask, GATED: tl.constexpr, WANT_H: tl.constexpr,
                DTYPE: tl.constexpr):
    """For dH = ``dh`` (fp32, already rounded as stored): H (when WANT_H), dG and dU at ``offs``; returns H
    (fp32 of the dtype-rounded value) for a caller that uses it in registers."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))  # as torch's silu_backward
    act = _to_dtype(g / (1.0 + tl.exp(-g)), DTYPE).to(tl.float32)  # silu(G) in the dtype, as the forward
    if GATED:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WANT_H:
            tl.store(h_ptr + offs, _to_dtype(act * u, DTYPE), mask=mask)
        tl.store(du_ptr + offs, _to_dtype(dh * act, DTYPE), mask=mask)
        dact = _to_dtype(dh * u, DTYPE).to(tl.float32)
        h = _to_dtype(act * u, DTYPE).to(tl.float32)
    else:
        if WANT_H:
            tl.store(h_ptr + offs, _to_dtype(act, DTYPE), mask=mask)
        dact = dh
        h = act
    tl.store(dg_ptr + offs, _to_dtype(dact * sig * (1.0 + g * (1.0 - sig)), DTYPE), mask=mask)
    return h


@triton.jit
def _silu_bwd_lora(dh_ptr, ga_ptr, a_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, da_ptr, M, N, R, scale,
                   GATED: tl.constexpr, WANT_H: tl.constexpr, DTYPE: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, ROW_STEPS: tl.constexpr,
                   FOLD_DA: tl.constexpr):
    """_silu_bwd on ROW_STEPS (BLOCK_M x BLOCK_N) tiles, one under the other, of dH = dH_base + scale * GA @ A:
    the down projection's LoRA term added here, where dH is read anyway, instead of written as a
    (tokens x intermediate) tensor and read back. A's (r x BLOCK_N) slice is loaded once for all the tiles.
    FOLD_DA: also GA^T @ H over this program's rows, H in registers (not written and read back for dA), stored
    as this row chunk's fp32 partial (chunk, r, N) at ``da_ptr``."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, R_PAD)
    col_ok, k_ok = cols < N, ks < R
    a = tl.load(a_ptr + ks[:, None].to(tl.int64) * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                other=0.0)
    if IEEE:
        a = a.to(tl.float32)
    if FOLD_DA:
        acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for step in range(ROW_STEPS):
        rows = (tl.program_id(0) * ROW_STEPS + step) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ga = tl.load(ga_ptr + rows[:, None].to(tl.int64) * R + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if IEEE:  # fp32 operands (and Triton's interpreter, whose dot mishandles 16-bit ones): exact fp32 products
            lora = tl.dot(ga.to(tl.float32), a, input_precision="ieee")
        else:  # 16-bit operands on the tensor cores, fp32 accumulator
            lora = tl.dot(ga, a)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32) + scale * lora
        dh = _to_dtype(dh, DTYPE).to(tl.float32)  # dH in the dtype, as the unfused path materializes it
        h = _silu_grads(dh, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, offs, mask, GATED, WANT_H, DTYPE)
        if FOLD_DA:  # rows past M: their GA rows were loaded as 0
            if IEEE:
                acc += tl.dot(tl.trans(ga.to(tl.float32)), h, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(ga), _to_dtype(h, DTYPE))
    if FOLD_DA:
        chunk = tl.program_id(0).to(tl.int64) * R * N
        tl.store(da_ptr + chunk + ks[:, None] * N + cols[None, :], acc, mask=k_ok[:, None] & col_ok[None, :])


_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TILE = (16, 128, 1, 4)  # BLOCK_M, BLOCK_N, ROW_STEPS, num_warps of _silu_bwd_lora (bench/silu_lora_tiles.py)
_TILE_DA = (16, 128, 16, 4)  # the same with FOLD_DA: several row tiles a program, so fewer partials to sum
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def supported(*tensors: torch.Tensor | None) -> bool:
    """Contiguous tensors of one shape and one float dtype the kernels take (None: an absent operand)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    return first.dtype in _DTYPES and all(
        t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype and t.device == first.device
        for t in present
    )


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def silu_forward(gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
    """``silu(gate) * up`` (``silu(gate)`` when up is None) in one pass."""
    h = torch.empty_like(gate)
    n = gate.numel()
    _silu_fwd[_grid(n)](gate, gate if up is None else up, h, n, GATED=up is not None,
                        DTYPE=_DTYPES[gate.dtype], BLOCK=_BLOCK, num_warps=_WARPS, **_LAUNCH)
    return h


def silu_backward(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, want_h: bool,
                  in_place: bool = False):
    """``(H or None, dGate, dUp or None)`` for dH = ``grad_h`` in one pass; H recomputed when ``want_h``.
    ``in_place``: dGate written over ``gate``, dUp over ``up`` and H over ``grad_h`` (each element is read
    before it is written, by the same program), so the pass allocates nothing; the caller owns all three."""
    h, grad_gate, grad_up, pointers = _backward_outputs(gate, up, want_h, grad_h if in_place else None)
    n = gate.numel()
    _silu_bwd[_grid(n)](grad_h, gate, *pointers, n, GATED=up is not None, WANT_H=want_h,
                        DTYPE=_DTYPES[gate.dtype], BLOCK=_BLOCK, num_warps=_WARPS, **_LAUNCH)
    return h, grad_gate, grad_up


def _backward_outputs(gate: torch.Tensor, up: torch.Tensor | None, want_h: bool,
                      in_place_over: torch.Tensor | None = None):
    """(H or None, dGate, dUp or None) allocated, and the kernels' (u, h, dg, du) pointer arguments, with dGate
    standing in for the operands a constexpr branch never touches. ``in_place_over`` (dH): nothing allocated,
    the outputs are detached aliases of dH, gate and up (returned gradients carry no autograd history)."""
    if in_place_over is not None:
        h = in_place_over.detach() if want_h else None
        grad_gate = gate.detach()
        grad_up = up.detach() if up is not None else None
    else:
        h = torch.empty_like(gate) if want_h else None
        grad_gate = torch.empty_like(gate)
        grad_up = torch.empty_like(gate) if up is not None else None
    pointers = tuple(grad_gate if t is None else t for t in (up, h, grad_gate, grad_up))
    return h, grad_gate, grad_up, pointers


def silu_backward_lora(grad_h_base: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, want_h: bool,
                       ga: torch.Tensor, A: torch.Tensor, scale: float,
                       tile: tuple[int, int, int, int] | None = None):
    """``silu_backward`` for dH = ``grad_h_base`` + ``scale`` * ga @ A (ga: tokens x r, A: r x intermediate), the
    rank-r term formed inside the pass. The caller checks ``supported`` for the (tokens x intermediate)
    operands and that ga and A are contiguous in their dtype. ``tile``: (BLOCK_M, BLOCK_N, ROW_STEPS, num_warps)
    other than the default (bench/silu_lora_tiles.py sweeps them)."""
    h, grad_gate, grad_up, pointers = _backward_outputs(gate, up, want_h)
    _launch_lora(grad_h_base, gate, up, want_h, ga, A, scale, pointers, grad_gate, tile or _TILE)
    return h, grad_gate, grad_up


def silu_backward_lora_da(grad_h_base: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None,
                          ga: torch.Tensor, A: torch.Tensor, scale: float,
                          tile: tuple[int, int, int, int] | None = None):
    """``(dGate, dUp or None, dA)``: silu_backward_lora, and the down projection's dA = ``scale`` * ga^T @ H
    from H in registers (H is neither written nor read back). dA in A's dtype, summed in fp32 from one partial
    per program row chunk."""
    _, grad_gate, grad_up, pointers = _backward_outputs(gate, up, False)
    tile = tile or _TILE_DA
    n = gate.shape[-1]
    chunks = triton.cdiv(gate.numel() // n, tile[0] * tile[2])
    partial = torch.empty(chunks, A.shape[0], n, device=gate.device, dtype=torch.float32)
    _launch_lora(grad_h_base, gate, up, False, ga, A, scale, pointers, partial, tile, fold_da=True)
    grad_a = partial.sum(0).mul_(scale).to(A.dtype)
    return grad_gate, grad_up, grad_a


def _launch_lora(grad_h_base, gate, up, want_h, ga, A, scale, pointers, da, tile, fold_da=False):
    n = gate.shape[-1]
    m = gate.numel() // n
    r = A.shape[0]
    block_m, block_n, row_steps, num_warps = tile
    grid = (triton.cdiv(m, block_m * row_steps), triton.cdiv(n, block_n))
    _silu_bwd_lora[grid](grad_h_base, ga, A, gate, *pointers, da, m, n, r, float(scale), GATED=up is not None,
                         WANT_H=want_h, DTYPE=_DTYPES[gate.dtype], IEEE=gate.dtype == torch.float32 or _INTERPRETED,
                         BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=max(16, triton.next_power_of_2(r)),
                         ROW_STEPS=row_steps, FOLD_DA=fold_da, num_warps=num_warps, **_LAUNCH)
