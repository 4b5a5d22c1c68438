"""The 1-D SiLU kernels (swiglu_triton.silu_forward / silu_backward) at the 1B / 8B MLP shapes, for each
(elements a program, warps) of a sweep, against liger-kernel's SwiGLU kernels where it is installed.

CUDA events, median of 50 calls; the bandwidth each reaches: forward reads G, U and writes H; backward reads
dH, G, U and writes H, dG, dU (liger's backward writes no H: it reads dH, G, U and writes dG, dU over G, U).
Checks that every setting gives the default's bits.

    python bench/silu_blocks.py [--shape llama-8b] [--best-out FILE]
"""

import argparse

import torch
from common import cuda_event_us as timed

from lorakit.kernels import swiglu_triton as tk

SHAPES = {"llama-1b": (8192, 8192), "llama-8b": (4096, 14336)}  # tokens, intermediate
SETTINGS = [(1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16),
            (16384, 16), (16384, 32), (512, 4), (512, 2)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--best-out", help="write the fastest setting (forward + backward time) here as BLOCK,WARPS")
    args = p.parse_args()
    m, inter = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate, up, dh = (torch.randn(m, inter, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    tensor_gb = gate.numel() * 2 / 1e9
    print(f"{args.shape}: {m} x {inter}, bf16 ({tensor_gb * 1e3:.0f} MB a tensor); {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}")
    default = (tk._BLOCK, tk._WARPS)
    ref_h, ref_b = tk.silu_forward(gate, up), tk.silu_backward(dh, gate, up, True)
    rows = []
    for block, warps in SETTINGS:
        tk._BLOCK, tk._WARPS = block, warps
        h, b = tk.silu_forward(gate, up), tk.silu_backward(dh, gate, up, True)
        same = torch.equal(h, ref_h) and all(torch.equal(x, y) for x, y in zip(b, ref_b))
        fwd = timed(lambda: tk.silu_forward(gate, up))
        bwd = timed(lambda: tk.silu_backward(dh, gate, up, True))
        g2, u2, d2 = gate.clone(), up.clone(), dh.clone()
        bwd_ip = timed(lambda t=(d2, g2, u2): tk.silu_backward(*t, True, in_place=True))  # values drift: time only
        rows.append(((block, warps), fwd, bwd, bwd_ip, same))
    tk._BLOCK, tk._WARPS = default
    print("| BLOCK, warps | forward us | GB/s | backward us | GB/s | in place us | same bits |")
    print("|---|---|---|---|---|---|---|")
    for (block, warps), fwd, bwd, bwd_ip, same in rows:
        mark = " (default)" if (block, warps) == default else ""
        print(f"| {block}, {warps}{mark} | {fwd:.1f} | {3 * tensor_gb / fwd * 1e6:.0f} | {bwd:.1f} | "
              f"{6 * tensor_gb / bwd * 1e6:.0f} | {bwd_ip:.1f} | {same} |")
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        print("liger-kernel not installed: no reference row")
    else:
        a, b_, d = gate.clone(), up.clone(), dh.clone()
        fwd = timed(lambda: swiglu_forward(a, b_))
        bwd = timed(lambda: swiglu_backward(a.clone(), b_.clone(), d))  # clones: its backward writes over a, b
        copy = timed(lambda: (a.clone(), b_.clone()))
        print(f"| liger-kernel swiglu | {fwd:.1f} | {3 * tensor_gb / fwd * 1e6:.0f} | {bwd - copy:.1f} "
              f"(clones subtracted) | {5 * tensor_gb / (bwd - copy) * 1e6:.0f} | | |")
    best = min(rows, key=lambda r: r[1] + r[2] if r[4] else float("inf"))
    print(f"fastest: BLOCK {best[0][0]}, {best[0][1]} warps: forward + backward {best[1] + best[2]:.1f} us against "
          f"{sum(r[1] + r[2] for r in rows if r[0] == default):.1f} at the default")
    if args.best_out:
        with open(args.best_out, "w") as f:
            f.write(f"{best[0][0]},{best[0][1]}\n")


if __name__ == "__main__":
    main()
