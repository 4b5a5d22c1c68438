"""BGMV kernel knobs on a decode step's shapes: what one LoRA layer costs next to the base GEMMs it rides on.

Llama-3.2-1B shape, decode (one token per row), bf16, r=16, 33 slots (slot 0 = base). For each fused group
of a layer (q|k|v, o, gate|up, down): the base GEMM ``x @ W.T`` (cuBLAS), lorakit's shrink (+ split sum) and
expand kernels under several tile/split/warp settings, and the engine's path (the expand kernel summing the
shrink's split partials itself: two launches), with every row on one adapter ("uniform") and rows spread
over 32 adapters ("mixed"). Timed inside CUDA graphs (triton.testing.do_bench_cudagraph), as the engine runs.

    python bench/bgmv_sweep.py                 # on CUDA
    python bench/bgmv_sweep.py --device cpu    # smoke test under TRITON_INTERPRET=1 (tiny, no timings)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

if "--device" in sys.argv and "cpu" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

GROUPS = {  # name: (in, (slice widths...))
    "q|k|v": (2048, (2048, 512, 512)),
    "o": (2048, (2048,)),
    "gate|up": (2048, (8192, 8192)),
    "down": (8192, (2048,)),
}
TINY = {"q|k|v": (64, (64, 32, 32)), "o": (64, (64,)), "gate|up": (64, (128, 128)), "down": (128, (64,))}


def timed(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=50) * 1e3  # us
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from lorakit.serve import bgmv, bgmv_triton

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    groups = GROUPS if device == "cuda" else TINY
    rows, R, slots = (args.rows, args.rank, 33) if device == "cuda" else (4, 16, 3)
    torch.manual_seed(0)
    idx_modes = {
        "uniform": torch.ones(rows, dtype=torch.long, device=device),
        "mixed": (torch.arange(rows, device=device) % (slots - 1) + 1),
    }
    shrink_cfgs = [dict()] + [dict(block_k=bk, splits=sp, num_warps=w) for bk, sp, w in
                              itertools.product((128, 256, 512), (1, 2, 4, 8), (1, 2, 4))]
    expand_cfgs = [dict()] + [dict(block_n=bn, num_warps=w) for bn, w in itertools.product((32, 64, 128, 256),
                                                                                              (1, 2, 4))]
    if device != "cuda":
        shrink_cfgs, expand_cfgs = shrink_cfgs[:3], expand_cfgs[:3]
    total = {"base": 0.0, "default": 0.0, "best": 0.0, "engine": 0.0}
    print(f"rows {rows}, r={R}, {str(dtype).removeprefix('torch.')}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}, {time.strftime('%Y-%m-%d')}")
    print(f"| {'group':<8} | {'idx':<7} | base GEMM us | shrink default us | best shrink (us) | expand default us | "
          f"best expand (us) | engine path us |")
    for name, (fin, widths) in groups.items():
        N = sum(widths)
        W = torch.randn(N, fin, device=device, dtype=dtype) / fin**0.5
        A = torch.randn(slots, len(widths) * R, fin, device=device, dtype=dtype) / fin**0.5
        A[0] = 0
        B = torch.randn(slots, N, R, device=device, dtype=dtype) / R**0.5
        B[0] = 0
        scales = torch.rand(slots, len(widths), device=device)
        bounds = tuple(itertools.accumulate(widths))
        x = torch.randn(rows, fin, device=device, dtype=dtype)
        y = torch.randn(rows, N, device=device, dtype=dtype)
        t_base = timed(lambda: x @ W.t(), device)
        for mode, idx in idx_modes.items():
            ref_xa = bgmv.shrink_reference(x[:, None], A, idx)[:, 0]
            ref_y = bgmv.expand_reference_(y.clone()[:, None], ref_xa[:, None], B, scales, idx, bounds)[:, 0]
            s_times = {}
            for cfg in shrink_cfgs:
                xa = bgmv_triton.shrink(x, A, idx, **cfg)
                if not torch.allclose(xa, ref_xa, rtol=1e-3, atol=1e-3):
                    raise SystemExit(f"shrink {cfg} differs from the reference on {name}/{mode}")
                s_times[str(cfg) or "default"] = timed(lambda c=cfg: bgmv_triton.shrink(x, A, idx, **c), device)
            e_times = {}
            for cfg in expand_cfgs:
                out = bgmv_triton.expand_(y.clone(), ref_xa, B, scales, idx, bounds, **cfg)
                if not torch.allclose(out.float(), ref_y.float(), rtol=2e-2, atol=2e-2):
                    raise SystemExit(f"expand {cfg} differs from the reference on {name}/{mode}")
                yy = y.clone()
                e_times[str(cfg)] = timed(lambda c=cfg: bgmv_triton.expand_(yy, ref_xa, B, scales, idx, bounds, **c),
                                          device)
            yy = y.clone()
            t_engine = timed(lambda: bgmv_triton.expand_(yy, bgmv_triton.shrink_partials(x, A, idx), B, scales, idx,
                                                          bounds), device)
            got = bgmv_triton.expand_(y.clone(), bgmv_triton.shrink_partials(x, A, idx), B, scales, idx, bounds)
            if not torch.allclose(got.float(), ref_y.float(), rtol=2e-2, atol=2e-2):
                raise SystemExit(f"the engine path differs from the reference on {name}/{mode}")
            s_default, e_default = s_times["{}"], e_times["{}"]
            s_best = min(s_times, key=s_times.get)
            e_best = min(e_times, key=e_times.get)
            weight = 1.0
            total["base"] += t_base * weight if mode == "uniform" else 0.0
            total["default"] += (s_default + e_default) * weight if mode == "mixed" else 0.0
            total["best"] += (s_times[s_best] + e_times[e_best]) * weight if mode == "mixed" else 0.0
            total["engine"] += t_engine if mode == "mixed" else 0.0
            print(f"| {name:<8} | {mode:<7} | {t_base:>11.1f} | {s_default:>17.1f} | {s_times[s_best]:>6.1f} {s_best} | "
                  f"{e_default:>17.1f} | {e_times[e_best]:>6.1f} {e_best} | {t_engine:>14.1f} |")
    print(f"one layer (mixed): base GEMMs {total['base']:.1f} us; LoRA shrink + sum + expand with default knobs "
          f"{total['default']:.1f} us, with the best knobs {total['best']:.1f} us; engine path (shrink partials "
          f"-> expand, 2 launches) {total['engine']:.1f} us")


if __name__ == "__main__":
    main()
