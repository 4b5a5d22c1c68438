"""The rank-r GEMMs of a LoRA step on the CPU, each in two orders of its operands, with the caches flushed
before every call (in a training step the operands come from DRAM, not from a previous call's cache).

GPT-2-124M's projections, 4 x 256 tokens, fp32, r=16. For an (out, r) result such as dB = s G^T @ XA,
MKL can form it directly or as the transpose of the (r, out) product s XA^T @ G; they differ in how the
GEMM walks G. Median ms of 40 calls each; the last column is the step's total over 12 layers.

    python bench/cpu_lora_gemms.py
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

SHAPES = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


def main() -> None:
    torch.manual_seed(0)
    flush = torch.empty(64 * 2 ** 20 // 4)  # 64 MiB, larger than the last-level cache

    def cold_ms(fn, n: int = 40) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            flush.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    m, r, s = 1024, 16, 2.0
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; {m} tokens, r={r}, fp32; median ms of 40 calls, caches flushed")
    print("| projection (in -> out) | dB = s G^T @ XA | dB = (s XA^T @ G)^T | dA = s GA^T @ X | dA = (s X^T @ GA)^T "
          "| saved a step (12 layers), ms |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for name, (k, n) in SHAPES.items():
        x, g = torch.randn(m, k), torch.randn(m, n)
        A, B = torch.randn(r, k) * 0.01, torch.randn(n, r) * 0.01
        xa, ga = x @ A.t(), g @ B
        direct = torch.addmm(B, g.t(), xa, beta=0, alpha=s)
        transposed = torch.addmm(B.t(), xa.t(), g, beta=0, alpha=s).t()
        torch.testing.assert_close(transposed, direct, rtol=1e-4, atol=1e-4)
        cells = [cold_ms(lambda: torch.addmm(B, g.t(), xa, beta=0, alpha=s)),
                 cold_ms(lambda: torch.addmm(B.t(), xa.t(), g, beta=0, alpha=s).t()),
                 cold_ms(lambda: torch.addmm(A, ga.t(), x, beta=0, alpha=s)),
                 cold_ms(lambda: torch.addmm(A.t(), x.t(), ga, beta=0, alpha=s).t())]
        saved = 12 * (cells[0] - cells[1])
        total += saved
        print(f"| {name} ({k} -> {n}) | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {saved:.1f} |")
    print(f"dB as the transposed product saves {total:.1f} ms a GPT-2 step")


if __name__ == "__main__":
    main()
