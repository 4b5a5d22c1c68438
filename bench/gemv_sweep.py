"""Tile sweep of the fused 4-bit GEMV (lorakit.quant.triton_kernels.gemv_4bit_triton) against bitsandbytes.

x (M, K) bf16 with M in {1, 4, 16}, W NF4 + double quantization, block 64, for W of 4096 x 14336 and
14336 x 4096 (Llama-3-8B's MLP). For each shape: the default knobs (gemv_config), a handful of tiles
(block_n, block_k, warps, stages, dot, split_k) and bitsandbytes' matmul_4bit when it imports. Prints a table of
median microseconds over >= 50 timed calls (CUDA events, after warm-up) and effective GB/s = (4-bit codes +
absmax codes + nested state) bytes / time; the relative error against float64 is checked for every row.

    python bench/gemv_sweep.py                         # on a GPU (PYTHONPATH=$PWD/src from the repo root)
    python bench/gemv_sweep.py --device cpu --tiny     # smoke test under TRITON_INTERPRET=1, no timings
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from common import cuda_event_us

# knobs: (block_n, block_k, num_warps, num_stages, dot, split_k)
ONE_ROW = [(8, 512, 4, 1, False, 1), (4, 1024, 4, 1, False, 1), (16, 256, 4, 1, False, 1),
           (8, 1024, 8, 1, False, 1), (16, 512, 8, 1, False, 1), (32, 256, 8, 1, False, 1),
           (8, 512, 4, 3, False, 1), (8, 512, 4, 1, False, 2), (8, 512, 4, 1, False, 4),
           (16, 256, 4, 1, True, 1), (32, 128, 8, 1, True, 1), (64, 128, 8, 1, True, 1)]
ROWS = [(32, 128, 8, 1, True, 1), (16, 128, 4, 1, True, 1), (16, 256, 4, 1, True, 1), (64, 128, 8, 1, True, 1),
        (32, 256, 8, 1, True, 1), (32, 128, 4, 1, True, 1), (32, 128, 8, 2, True, 1), (32, 128, 8, 1, True, 2),
        (64, 128, 8, 1, True, 2), (16, 256, 4, 1, False, 1), (32, 256, 8, 1, False, 1)]


def timed(fn, device: str, iters: int) -> float | None:
    """Median microseconds of ``fn()`` over ``iters`` calls after warm-up (None off CUDA: no timing claims)."""
    if device != "cuda":
        fn()
        return None
    return cuda_event_us(fn, iters, warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (for --device cpu under the interpreter)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gemv_sweep.json"))
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    from lorakit.quant import nf4
    from lorakit.quant import triton_kernels as tk

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as exc:  # noqa: BLE001
        bnb = None
        print(f"bitsandbytes not available ({type(exc).__name__}: {exc}); lorakit rows only", flush=True)
    if args.device != "cuda":
        bnb = None
    device = args.device
    shapes = [(64, 256), (96, 192)] if args.tiny else [(4096, 14336), (14336, 4096)]
    row_counts = [1, 3] if args.tiny else [1, 4, 16]
    iters = max(50, args.iters)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "rows": []}
    print(f"{'W (N x K)':>13} {'M':>3} {'config':<34} {'us':>8} {'GB/s':>7} {'rel err':>8}", flush=True)
    for n, k in shapes:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        packed, state = nf4.quantize_4bit(w, 64, "nf4", True)
        w_deq = nf4.dequantize_4bit(packed, state, torch.bfloat16).double()
        nbytes = packed.numel() + state.nbytes  # what a GEMV must read of W
        if bnb is not None:
            pb, sb = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        del w
        for m in row_counts:
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            exact = x.double() @ w_deq.T
            configs = [("default", {})]
            for bn, bk, nw, ns, dot, sk in (ONE_ROW if m == 1 else ROWS):
                if args.tiny and (bk > k or bn > n):
                    continue
                configs.append((f"n{bn} k{bk} w{nw} s{ns}{' dot' if dot else ''}{f' split{sk}' if sk > 1 else ''}",
                                dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, dot=dot, split_k=sk)))
            if args.tiny:
                configs = configs[:4]
            runs = [(name, lambda kw=kw: tk.gemv_4bit_triton(x, packed, state, **kw)) for name, kw in configs]
            if bnb is not None:
                runs.append(("bitsandbytes matmul_4bit", lambda: bnb.matmul_4bit(x, pb.t(), quant_state=sb)))
            for name, fn in runs:
                try:
                    y = fn()
                    err = float((y.double() - exact).norm() / exact.norm())
                    us = timed(fn, device, iters)
                except Exception as exc:  # noqa: BLE001  (a tile that does not compile or fit: report, go on)
                    print(f"{n:>6}x{k:<6} {m:>3} {name:<34} failed: {type(exc).__name__}: {exc}", flush=True)
                    results["rows"].append({"N": n, "K": k, "M": m, "config": name, "error": repr(exc)})
                    continue
                gbs = nbytes / us / 1e3 if us else None
                print(f"{n:>6}x{k:<6} {m:>3} {name:<34} {us if us is not None else float('nan'):>8.1f} "
                      f"{gbs if gbs is not None else float('nan'):>7.0f} {err:>8.1e}", flush=True)
                results["rows"].append({"N": n, "K": k, "M": m, "config": name, "us": us, "GB_per_s": gbs,
                                        "rel_err": err})
    for m in row_counts:  # best lorakit config per M, summed over the two shapes
        per = {}
        for r in results["rows"]:
            if r["M"] == m and r.get("us") and not r["config"].startswith("bitsandbytes"):
                per.setdefault(r["config"], []).append(r["us"])
        full = {c: sum(v) for c, v in per.items() if len(v) == len(shapes)}
        if full:
            best = min(full, key=full.get)
            print(f"M={m}: best over both shapes: {best} ({full[best]:.1f} us total; default "
                  f"{full.get('default', float('nan')):.1f} us)", flush=True)
    if os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    bad = [r for r in results["rows"] if r.get("rel_err", 0) > 1e-2]
    if bad:
        print("rows with a relative error above 1e-2:", bad, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
