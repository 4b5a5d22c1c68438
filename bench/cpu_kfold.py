"""The LoRA terms folded into the base GEMMs through K on the CPU (the shared-input op's layout, for GPT-2's
Conv1D), against the per-layer op's order: whole forward + backward of one projection, hot caches.

Per-layer order (kernels/lora_linear.py): Y = X W + b, then Y += s XA B^T; dX = G W^T, then dX += s (G B) A.
K-fold: Wc = [W; s B^T] stored (in + r, out), Xc = [X | XA]; Y = Xc Wc + b (one GEMM of K = in + r), and
[dX_base | s G B] = G Wc^T (one GEMM of N = in + r), then dX_base += (s G B) A. The rank-r products it removes
(XA B^T and G B) touch the widest tensors, but MKL runs the widened GEMMs slower by more than they cost.
Also the rank-16 GEMMs alone, per projection. GPT-2-124M's projections, 4 x 256 tokens, fp32, r=16; median of
30 calls; "x12" is one step's 12 layers.

    python bench/cpu_kfold.py
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

SHAPES = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}
M, R, S = 1024, 16, 2.0


def per_layer(x, W, b, A, B, g):
    y = torch.addmm(b, x, W)
    xa = x @ A.t()
    y.addmm_(xa, B.t(), alpha=S)
    gb = g @ B
    dx = (g @ W.t()).addmm_(gb, A, alpha=S)
    return y, dx, (gb.t() @ x) * S, (xa.t() @ g).t() * S


def k_fold(x, Wc, b, A, B, g):
    k = x.shape[1]
    Wc[k:].copy_(B.t() * S)  # s B^T in the widened rows (the optimizer moved B)
    xa = x @ A.t()
    y = torch.addmm(b, torch.cat([x, xa], 1), Wc)
    wide = g @ Wc.t()  # [dX_base | s G B]
    sgb = wide[:, k:]
    dx = wide[:, :k].addmm_(sgb, A)
    return y, dx, sgb.t() @ x, (xa.t() @ g).t() * S


def base(x, W, b, g):
    return torch.addmm(b, x, W), g @ W.t()


def median_ms(fn, n: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def row(k: int, n: int) -> tuple[list[float], float]:
    """Times of one projection (frozen, per-layer LoRA, K-fold LoRA, the rank-16 GEMMs alone) and the largest
    relative difference of the two LoRA orders' outputs."""
    x, W, b, g = torch.randn(M, k), torch.randn(k, n) / k ** 0.5, torch.randn(n), torch.randn(M, n)
    A, B = torch.randn(R, k) / k ** 0.5, torch.randn(n, R) * 0.01
    Wc = torch.empty(k + R, n)
    Wc[:k].copy_(W)
    ref, got = per_layer(x, W, b, A, B, g), k_fold(x, Wc, b, A, B, g)
    diff = max(((u - v).abs().max() / u.abs().max()).item() for u, v in zip(ref, got))
    xa, gb, y, dx = x @ A.t(), g @ B, torch.empty(M, n), torch.empty(M, k)
    ranked = [lambda: x @ A.t(), lambda: y.addmm_(xa, B.t()), lambda: g @ B, lambda: dx.addmm_(gb, A),
              lambda: gb.t() @ x, lambda: xa.t() @ g]
    return [median_ms(lambda: base(x, W, b, g)), median_ms(lambda: per_layer(x, W, b, A, B, g)),
            median_ms(lambda: k_fold(x, Wc, b, A, B, g)), sum(median_ms(f) for f in ranked)], diff


def main() -> None:
    torch.manual_seed(0)
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}, {time.strftime('%Y-%m-%d')}; "
          "ms, hot caches")
    print("| projection | frozen fwd+bwd | per-layer LoRA (+ over frozen) | K-fold LoRA (+ over frozen) | "
          "rank-16 GEMMs alone | max rel diff |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0, 0.0]
    for name, (k, n) in SHAPES.items():
        t, diff = row(k, n)
        totals = [a + c for a, c in zip(totals, t)]
        print(f"| {name} | {t[0]:.2f} | {t[1]:.2f} (+{t[1] - t[0]:.2f}) | {t[2]:.2f} (+{t[2] - t[0]:.2f}) | "
              f"{t[3]:.2f} | {diff:.1e} |")
    print(f"| x12 | {12 * totals[0]:.0f} | +{12 * (totals[1] - totals[0]):.0f} | +{12 * (totals[2] - totals[0]):.0f} | "
          f"{12 * totals[3]:.0f} | |")


if __name__ == "__main__":
    main()
