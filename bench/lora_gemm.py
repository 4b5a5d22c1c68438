"""GEMM with the LoRA term in the epilogue (lorakit.kernels.lora_gemm) against cuBLAS, on the shapes of a LoRA step.

For each projection of a Llama shape (tokens = batch x seq), forward ``Y = X W^T + XA (sB)^T`` and backward
``dX = G W + GA A``, three ways, median time (triton.testing.do_bench):

    cuBLAS alone      X @ W.T only: what the frozen floor pays
    cuBLAS + addmm_   what the fused LoRA op did first (the rank-r term read-modify-writes the output)
    cuBLAS, r first   the rank-r product written first, then the big GEMM adds it in its epilogue (beta=1)
    Triton fused      one kernel, rank-r term added to each tile before the store (defined below: a
                      tutorial-style Triton GEMM; on an H100 it lost to cuBLAS by ~35%, so lorakit ships
                      the "r first" order instead; see docs/speed.md)

    python bench/lora_gemm.py                      # llama-1b shapes, 4 x 2048 tokens, on CUDA
    python bench/lora_gemm.py --device cpu --tiny  # correctness smoke test under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if "--device" in sys.argv and "cpu" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=3, num_warps=8),
]
_SMALL = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_stages=1, num_warps=4)]


def _kernel_body(x_ptr, w_ptr, p_ptr, q_ptr, y_ptr, M, N, K,
                 sxm, sxk, swk, swn, spm, spr, sqr, sqn, sym, syn,
                 R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # grouped order: neighbouring programs share rows of X (L2 reuse)
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk
    w_ptrs = w_ptr + rk[:, None].to(tl.int64) * swk + rn[None, :] * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    rr = tl.arange(0, R)
    p = tl.load(p_ptr + rm[:, None].to(tl.int64) * spm + rr[None, :] * spr, mask=rm[:, None] < M, other=0.0)
    q = tl.load(q_ptr + rr[:, None] * sqr + rn[None, :] * sqn, mask=rn[None, :] < N, other=0.0)
    acc = tl.dot(p, q, acc)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :] * syn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_kernel_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "R"])(triton.jit(_kernel_body))
_kernel_small = triton.autotune(configs=_SMALL, key=["M", "N", "K", "R"])(triton.jit(_kernel_body))


def lora_gemm(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ w + p @ q`` in one kernel: x (M, K), w (K, N) (any strides: pass ``W.t()`` as a view),
    p (M, r), q (r, N); fp32 accumulation, output in x's dtype. r must be a power of two >= 16 (pad it)."""
    M, K = x.shape
    N = w.shape[1]
    R = p.shape[1]
    if R < 16 or R & (R - 1):
        raise ValueError(f"lora_gemm needs a power-of-two rank >= 16, got {R} (pad p and q with zeros)")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel = _kernel_tuned if x.is_cuda else _kernel_small

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel[grid](x, w, p, q, y, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                 p.stride(0), p.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1), R=R)
    return y


SHAPES = {
    "llama-1b": (2048, 8192, 512),  # hidden, intermediate, kv width
    "llama-8b": (4096, 14336, 1024),
    "tiny": (64, 128, 32),
}


def timed(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100) * 1e3  # us
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.tokens = "tiny", 96
    device, dtype, r = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32, args.rank
    hidden, inter, kv = SHAPES[args.shape]
    projections = {"q/o": (hidden, hidden), "k/v": (hidden, kv), "gate/up": (hidden, inter), "down": (inter, hidden)}
    torch.manual_seed(0)
    rows = []
    totals = {"cublas": 0.0, "addmm": 0.0, "first": 0.0, "triton": 0.0}
    weights = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
    for name, (fin, fout) in projections.items():
        W = torch.randn(fout, fin, device=device, dtype=dtype) / fin**0.5
        A = torch.randn(r, fin, device=device, dtype=dtype) / fin**0.5
        B = torch.randn(fout, r, device=device, dtype=dtype) / r**0.5
        x = torch.randn(args.tokens, fin, device=device, dtype=dtype)
        g = torch.randn(args.tokens, fout, device=device, dtype=dtype)
        xa, ga = x @ A.t(), g @ B
        for direction, (lhs, w, p, q) in {"fwd": (x, W.t(), xa, B.t()), "bwd": (g, W, ga, A)}.items():
            def current():
                y = lhs @ w
                y.addmm_(p, q)
                return y

            def low_rank_first():
                y = p @ q
                y.addmm_(lhs, w)
                return y

            ref = (lhs.float() @ w.float() + p.float() @ q.float())
            err = ((lora_gemm(lhs, w, p, q).float() - ref).abs().max() / ref.abs().max()).item()
            err_cublas = ((current().float() - ref).abs().max() / ref.abs().max()).item()
            err_first = ((low_rank_first().float() - ref).abs().max() / ref.abs().max()).item()
            t = {"cublas": timed(lambda: lhs @ w, device), "addmm": timed(current, device),
                 "first": timed(low_rank_first, device), "triton": timed(lambda: lora_gemm(lhs, w, p, q), device)}
            for k in totals:
                totals[k] += weights[name] * t[k]
            rows.append((f"{name} {direction} ({lhs.shape[0]}x{lhs.shape[1]} @ {w.shape[0]}x{w.shape[1]})",
                         t["cublas"], t["addmm"], t["first"], t["triton"], err, max(err_cublas, err_first)))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter: no timing claims)"
    print(f"\n{args.shape}, {args.tokens} tokens, r={r}, {str(dtype).removeprefix('torch.')}; {gpu}; "
          f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"| {'GEMM':<44} | cuBLAS alone us | cuBLAS + addmm_ us | cuBLAS, r first us | Triton fused us | "
          f"r first / alone | fused / alone | max rel err fused (cuBLAS) |")
    print(f"|{'-' * 46}|-----------------|--------------------|--------------------|-----------------|"
          f"-----------------|---------------|----------------------------|")
    for label, a, b, f, c, e, e2 in rows:
        print(f"| {label:<44} | {a:>15.1f} | {b:>18.1f} | {f:>18.1f} | {c:>15.1f} | {f / a:>15.3f} | "
              f"{c / a:>13.3f} | {e:.1e} ({e2:.1e}) |")
    print(f"| {'one layer (7 projections, fwd + bwd)':<44} | {totals['cublas']:>15.1f} | {totals['addmm']:>18.1f} | "
          f"{totals['first']:>18.1f} | {totals['triton']:>15.1f} | {totals['first'] / totals['cublas']:>15.3f} | "
          f"{totals['triton'] / totals['cublas']:>13.3f} | |")


if __name__ == "__main__":
    main()
