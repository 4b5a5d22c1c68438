"""LoRA's extra GPU time over the frozen floor, modelled: the memory traffic of its rank-r passes.

A model, not a measurement. The frozen base's GEMMs stay cuBLAS's, so the rank-r work does not hide inside
them; each rank-r pass is a kernel of its own (as cuBLAS's skinny GEMMs are), fused only where two passes can
share a read. It needs, per LoRA projection (X: tokens x in, its input; G: tokens x out, its output's
gradient):

- forward: one read of X to form XA (once per group of projections sharing X: q/k/v, gate/up); adding the
  rank-r term to Y, either one read + write of Y (epilogue or after) or a widened input [X | XA], one read +
  write of X (once per group), whichever is smaller;
- backward: one read of G for both GA = G @ B and dB = G.T @ XA (fused); one read of X for dA = GA.T @ X (once
  per group); adding GA @ A to dX, one read + write of dX, or of G widened [G | GA];
- with gradient checkpointing, the forward's share twice.

Rank-r FLOPs and the widened GEMMs' extra K or N (1-2%) come on top; bf16 (2 bytes). Kernels of lorakit's own
around the projections could go below it: XA formed inside the RMSNorm or SwiGLU kernel that writes X, the
GA @ A term added inside the SwiGLU backward that reads dH. The time is the traffic at
``--tb-s`` (3.3 TB/s: what the rank-16 GEMMs reached on an H200, docs/speed.md). Against a floor's GPU time this gives
the best ratio a LoRA step can reach without also making the base's own work cheaper (as the fused SwiGLU
kernel does: about 3 ms of the 1B floor's elementwise work).

    python bench/lora_traffic.py --floor-ms 122.8              # Llama-3.2-1B, 4 x 2048
    python bench/lora_traffic.py --shape llama-8b --tokens 4096 --ckpt --floor-ms 366
"""

from __future__ import annotations

import argparse

SHAPES = {  # hidden, q/o width (heads x head_dim), k/v width, intermediate, layers
    "llama-1b": (2048, 2048, 512, 8192, 16),
    "llama-8b": (4096, 4096, 1024, 14336, 32),
}


def layer_elements(tokens: int, hidden: int, q: int, kv: int, inter: int, ckpt: bool) -> dict[str, int]:
    """Elements moved per layer, by group, forward and backward (the model in the module docstring)."""
    groups = {  # name: (input width, output widths of the projections that share that input)
        "q/k/v": (hidden, (q, kv, kv)),
        "o": (q, (hidden,)),
        "gate/up": (hidden, (inter, inter)),
        "down": (inter, (hidden,)),
    }
    out = {}
    for name, (width_in, widths_out) in groups.items():
        xa_read = width_in
        add_term = min(2 * sum(widths_out), 2 * width_in)
        forward = (xa_read + add_term) * (2 if ckpt else 1)
        g_reads = sum(widths_out)
        da_read = width_in
        dx_term = min(2 * width_in, 2 * sum(widths_out))
        out[name] = tokens * (forward + g_reads + da_read + dx_term)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x sequence)")
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing: the forward twice")
    parser.add_argument("--tb-s", type=float, default=3.3, help="bandwidth in TB/s")
    parser.add_argument("--floor-ms", type=float, default=None, help="the floor's GPU time per step, ms")
    args = parser.parse_args()
    hidden, q, kv, inter, layers = SHAPES[args.shape]
    per_layer = layer_elements(args.tokens, hidden, q, kv, inter, args.ckpt)
    print(f"{args.shape}, {args.tokens} tokens, checkpointing {args.ckpt}, bf16, {args.tb_s} TB/s; per step:")
    print("| group | GB | ms |")
    print("|---|---|---|")
    total = 0.0
    for name, elements in per_layer.items():
        gb = elements * 2 * layers / 1e9
        total += gb
        print(f"| {name} | {gb:.2f} | {gb / args.tb_s:.2f} |")
    ms = total / args.tb_s
    print(f"| all | {total:.2f} | {ms:.2f} |")
    if args.floor_ms:
        print(f"best LoRA step / floor by GPU time: {args.floor_ms / (args.floor_ms + ms):.3f} "
              f"(floor {args.floor_ms} ms + {ms:.1f} ms)")


if __name__ == "__main__":
    main()
