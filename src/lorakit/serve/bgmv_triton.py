"""Triton BGMV kernels for decode rows: each row reads its own adapter's A and B straight from the stacks.

No gathered copy of the weights is made (the torch reference copies A[idx] and B[idx] for every row); a row
whose slot is 0 (the base model, all zeros) returns at once. Accumulation is fp32; see bgmv.py for the
layout and the maths. The kernels run on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the tests check
them against the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, out_ptr, K, RR, K_PER_SPLIT,
                   sx_b, sx_k, sa_n, sa_r, sa_k, so_s, so_b, so_r,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (row b, block of BLOCK_R adapter rows, split ks of K):
    #   out[ks, b, r] = sum over k in split ks of A[slot, r, k] * x[b, k]
    # (K is split so that a 64-row batch still fills the GPU when K is 8192; the splits are summed after)
    b = tl.program_id(0)
    pr = tl.program_id(1)
    ks = tl.program_id(2)
    slot = tl.load(idx_ptr + b).to(tl.int64)
    rr = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + ks * so_s + b * so_b + rr * so_r
    if slot == 0:
        tl.store(out_ptrs, tl.zeros((BLOCK_R,), tl.float32), mask=rr < RR)
        return
    acc = tl.zeros((BLOCK_R,), tl.float32)
    a_row = a_ptr + slot * sa_n + rr[:, None] * sa_r
    k_start = ks * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        kk = k_start + k0 + tl.arange(0, BLOCK_K)
        k_ok = (kk < K) & (kk < k_start + K_PER_SPLIT)
        xv = tl.load(x_ptr + b * sx_b + kk * sx_k, mask=k_ok, other=0.0).to(tl.float32)
        av = tl.load(a_row + kk[None, :] * sa_k, mask=(rr[:, None] < RR) & k_ok[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    tl.store(out_ptrs, acc, mask=rr < RR)


@triton.jit
def _expand_kernel(xa_ptr, b_ptr, idx_ptr, scale_ptr, y_ptr, N, R, N0, N1, R1, R2,
                   sxa_p, sxa_b, sxa_r, sb_n, sb_o, sb_r, ss_n, ss_s, sy_b, sy_o,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr):
    # program (row b, block of BLOCK_N outputs): y[b, n] += scale[slot, s] * sum_r B[slot, n, r] * xa[b, s*R + r]
    # where xa is the sum of the shrink kernel's SPLITS partial sums, added here in a fixed order (no separate
    # reduction kernel: at decode batch sizes every launch costs more than the work it does)
    b = tl.program_id(0)
    pn = tl.program_id(1)
    slot = tl.load(idx_ptr + b).to(tl.int64)
    if slot == 0:
        return
    nn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    n_ok = nn < N
    s = (nn >= N0).to(tl.int32) + (nn >= N1).to(tl.int32)  # slice of each output column
    r_ok = rr < R
    # the (up to 3) slices' R values, each summed over the splits once, then picked per output column
    ok1 = rr < R1  # R1, R2: R where the group has a second / third slice, else 0
    ok2 = rr < R2
    row = xa_ptr + b * sxa_b + rr * sxa_r
    x0 = tl.load(row, mask=r_ok, other=0.0)
    x1 = tl.load(row + R * sxa_r, mask=ok1, other=0.0)
    x2 = tl.load(row + 2 * R * sxa_r, mask=ok2, other=0.0)
    for p in tl.static_range(1, SPLITS):
        x0 += tl.load(row + p * sxa_p, mask=r_ok, other=0.0)
        x1 += tl.load(row + p * sxa_p + R * sxa_r, mask=ok1, other=0.0)
        x2 += tl.load(row + p * sxa_p + 2 * R * sxa_r, mask=ok2, other=0.0)
    xa = tl.where(s[:, None] == 0, x0[None, :], tl.where(s[:, None] == 1, x1[None, :], x2[None, :]))
    bv = tl.load(b_ptr + slot * sb_n + nn[:, None] * sb_o + rr[None, :] * sb_r,
                 mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.sum(bv.to(tl.float32) * xa, axis=1)
    scale = tl.load(scale_ptr + slot * ss_n + s * ss_s, mask=n_ok, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + b * sy_b + nn * sy_o
    y_old = tl.load(y_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y_old + acc * scale).to(y_ptr.dtype.element_ty), mask=n_ok)


def shrink_partials(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, *, block_k: int | None = None,
                    splits: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x: (rows, in); A: (n_slots, RR, in); idx: (rows,) -> (splits, rows, RR) fp32 partial sums over K
    (``expand_`` adds them up). The knobs are for bench/bgmv_sweep.py; None keeps the defaults."""
    rows, K = x.shape
    RR = A.shape[1]
    BLOCK_R = 16
    BLOCK_K = block_k or (256 if K >= 256 else triton.next_power_of_2(K))
    if splits is None:  # 8 splits fill an H100 with 64 decode rows (bench/bgmv_sweep.py, 2026-11-23)
        splits = max(1, min(8, K // 256))
    per_split = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, per_split)
    out = torch.empty(splits, rows, RR, device=x.device, dtype=torch.float32)
    grid = (rows, triton.cdiv(RR, BLOCK_R), splits)
    _shrink_kernel[grid](x, A, idx, out, K, RR, per_split, x.stride(0), x.stride(1), A.stride(0), A.stride(1),
                         A.stride(2), out.stride(0), out.stride(1), out.stride(2), BLOCK_R=BLOCK_R,
                         BLOCK_K=BLOCK_K, num_warps=num_warps)
    return out


def shrink(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, **knobs) -> torch.Tensor:
    """x: (rows, in); A: (n_slots, RR, in); idx: (rows,) -> (rows, RR) fp32 (the partials summed in order)."""
    return shrink_partials(x, A, idx, **knobs).sum(0)


def expand_(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, idx: torch.Tensor,
            bounds: tuple[int, ...], *, block_n: int | None = None, num_warps: int = 2) -> torch.Tensor:
    """y: (rows, N) updated in place; xa: (rows, S * R) fp32, or (splits, rows, S * R) partial sums straight
    from ``shrink_partials``; B: (n_slots, N, R); bounds: slice ends (<= 3)."""
    if len(bounds) > 3:
        raise ValueError(f"the expand kernel handles up to 3 slices per group, got {len(bounds)}")
    rows, N = y.shape
    R = B.shape[-1]
    N0 = bounds[0] if len(bounds) > 1 else N
    N1 = bounds[1] if len(bounds) > 2 else N
    BLOCK_N = min(block_n or 128, triton.next_power_of_2(N))
    grid = (rows, triton.cdiv(N, BLOCK_N))
    parts = xa if xa.dim() == 3 else xa.unsqueeze(0)
    R1, R2 = (R if len(bounds) > 1 else 0), (R if len(bounds) > 2 else 0)
    _expand_kernel[grid](parts, B, idx, scales, y, N, R, N0, N1, R1, R2, parts.stride(0), parts.stride(1), parts.stride(2),
                         B.stride(0),
                         B.stride(1), B.stride(2), scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
                         BLOCK_N=BLOCK_N, BLOCK_R=triton.next_power_of_2(R), SPLITS=parts.shape[0],
                         num_warps=num_warps)
    return y
