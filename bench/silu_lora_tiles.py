"""The SwiGLU backward with the down projection's LoRA term in dH, two ways, at the 1B / 8B MLP shapes:

- unfused (the default path): dH = (s GA @ A) + G @ W by one GEMM with the rank-r product in its epilogue
  (lora_linear.grad_input), then swiglu_triton.silu_backward (1-D, 1024 elements a program);
- fused (gated_mlp.FUSED_DH_LORA): dH_base = G @ W, then swiglu_triton.silu_backward_lora adding s GA @ A tile
  by tile, for each (BLOCK_M, BLOCK_N, ROW_STEPS, num_warps) of the sweep.

CUDA events, median of 50 calls; also the SiLU kernels alone and the bandwidth they reach (bytes: dH, G, U read;
H, dG, dU written; + GA and A for the fused one). Checks the fused outputs against the unfused ones.

    python bench/silu_lora_tiles.py [--shape llama-1b]
"""

import argparse

import torch
from common import cuda_event_us as timed

from lorakit.kernels import swiglu_triton
from lorakit.kernels.lora_linear import LoraLinearArgs, grad_input

SHAPES = {"llama-1b": (8192, 2048, 8192), "llama-8b": (4096, 4096, 14336)}  # tokens, hidden, intermediate
# (BLOCK_M, BLOCK_N, ROW_STEPS, num_warps); measured 2026-12-02 (H200) with ROW_STEPS 1: (16, 256, 4 warps) best,
# 0.947 / 0.927 of the unfused time on 1B / 8B; 64 x 128 (the first default) 1.10 / 1.09; larger tiles worse
TILES = [(16, 256, 1, 4), (16, 128, 1, 4), (16, 128, 1, 2), (16, 256, 1, 2), (32, 64, 1, 4), (16, 64, 1, 2),
         (16, 256, 4, 4), (16, 256, 8, 4), (16, 256, 16, 4), (16, 128, 8, 4), (16, 128, 8, 2), (16, 128, 16, 2),
         (32, 128, 8, 4), (16, 512, 8, 8), (16, 64, 16, 2), (32, 256, 4, 8)]

TILES_DA = [(16, 128, 4, 4), (16, 128, 8, 4), (16, 128, 16, 4), (16, 128, 32, 4), (16, 64, 16, 2), (16, 64, 32, 4),
            (16, 256, 8, 4), (16, 256, 16, 8), (32, 128, 8, 4), (32, 64, 16, 4)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--best-out", help="write the fastest tile here as BLOCK_M,BLOCK_N,ROW_STEPS,num_warps")
    p.add_argument("--best-da-out", help="the same for the kernel with dA folded in")
    args = p.parse_args()
    m, hidden, inter = SHAPES[args.shape]
    dt, dev, s = torch.bfloat16, "cuda", 2.0
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen) * std

    g, w = rand(m, hidden), rand(hidden, inter, std=hidden ** -0.5)
    gate, up = rand(m, inter), rand(m, inter)
    B, A = rand(hidden, args.r, std=0.05), rand(args.r, inter, std=0.05)
    ga = g @ B
    la = LoraLinearArgs(s, False)
    mib = m * inter * 2 / 2 ** 20
    print(f"{args.shape}: {m} tokens x {inter} intermediate (hidden {hidden}), r={args.r}, bf16; "
          f"{torch.cuda.get_device_name()}; torch {torch.__version__}")

    def unfused():
        dh = grad_input(g, ga, w, A, la)
        return swiglu_triton.silu_backward(dh, gate, up, True)

    dh_ref = grad_input(g, ga, w, A, la)
    ref = swiglu_triton.silu_backward(dh_ref, gate, up, True)
    base = g @ w
    t_gemm_epi = timed(lambda: grad_input(g, ga, w, A, la))
    t_gemm = timed(lambda: g @ w)
    t_silu = timed(lambda: swiglu_triton.silu_backward(dh_ref, gate, up, True))
    t_unfused = timed(unfused)
    gbs = 6 * mib * 2 ** 20 / 1e9
    print(f"dH GEMM with the rank-r epilogue {t_gemm_epi:.0f} us; plain dH GEMM {t_gemm:.0f} us; "
          f"silu_backward (1-D) {t_silu:.0f} us = {gbs / (t_silu * 1e-6):.0f} GB/s; unfused total {t_unfused:.0f} us")
    print("| BLOCK_M | BLOCK_N | row steps | warps | silu_backward_lora us | GB/s | GEMM + it, us | / unfused | "
          "max |diff| dG |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = (float("inf"), None)
    for tile in TILES:
        def fused_kernel():
            return swiglu_triton.silu_backward_lora(base, gate, up, True, ga, A, s, tile=tile)

        try:
            got = fused_kernel()
        except Exception as e:  # noqa: BLE001 - a tile the compiler refuses (shared memory, registers): say so
            print("| " + " | ".join(map(str, tile)) + f" | failed: {type(e).__name__} | | | | |")
            continue
        diff = (got[1].float() - ref[1].float()).abs().max().item()
        t_k = timed(fused_kernel)
        t_tot = timed(lambda: swiglu_triton.silu_backward_lora(g @ w, gate, up, True, ga, A, s, tile=tile))
        best = min(best, (t_tot, tile))
        print("| " + " | ".join(map(str, tile)) + f" | {t_k:.0f} | {gbs / (t_k * 1e-6):.0f} | {t_tot:.0f} | "
              f"{t_tot / t_unfused:.3f} "
              f"| {diff:.3g} |")
    print(f"fastest: {best[1]}, {best[0]:.0f} us = {best[0] / t_unfused:.3f} of the unfused path")
    if args.best_out:
        with open(args.best_out, "w") as f:
            f.write(",".join(map(str, best[1])))

    # dA folded in: against the unfused path with its dA GEMM over the written H
    def unfused_da():
        h, dg, du = unfused()
        return dg, du, torch.addmm(A, ga.t(), h, beta=0, alpha=s)

    ref_da = unfused_da()[2].float()
    t_unfused_da = timed(unfused_da)
    print(f"\nwith dA = s GA^T @ H: unfused (GEMM epilogue + silu_backward writing H + dA GEMM) {t_unfused_da:.0f} us")
    print("| BLOCK_M | BLOCK_N | row steps | warps | silu_backward_lora_da us | GEMM + it, us | / unfused | "
          "max |diff| dA / max |dA| |")
    print("|---|---|---|---|---|---|---|---|")
    best = (float("inf"), None)
    for tile in TILES_DA:
        try:
            got = swiglu_triton.silu_backward_lora_da(base, gate, up, ga, A, s, tile=tile)
        except Exception as e:  # noqa: BLE001
            print("| " + " | ".join(map(str, tile)) + f" | failed: {type(e).__name__} | | | |")
            continue
        rel = ((got[2].float() - ref_da).abs().max() / ref_da.abs().max()).item()
        t_k = timed(lambda: swiglu_triton.silu_backward_lora_da(base, gate, up, ga, A, s, tile=tile))
        t_tot = timed(lambda: swiglu_triton.silu_backward_lora_da(g @ w, gate, up, ga, A, s, tile=tile))
        best = min(best, (t_tot, tile))
        print("| " + " | ".join(map(str, tile)) + f" | {t_k:.0f} | {t_tot:.0f} | {t_tot / t_unfused_da:.3f} | "
              f"{rel:.2e} |")
    print(f"fastest: {best[1]}, {best[0]:.0f} us = {best[0] / t_unfused_da:.3f} of the unfused path")
    if args.best_da_out:
        with open(args.best_da_out, "w") as f:
            f.write(",".join(map(str, best[1])))


if __name__ == "__main__":
    main()
