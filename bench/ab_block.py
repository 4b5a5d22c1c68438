"""Interleaved A/B of lorakit's fused blocks on one model: the same LoRA model timed with the shared-input ops
(q/k/v and gate/up, widened weights) and the MLP's down op, with the down op only, and unfused, in
alternating rounds (so clocks and allocator state drift over both alike), wall time per step and the
GPU time of the same steps from CUDA events.

    python bench/ab_block.py --shape llama-1b --rounds 3 --steps 8 [--pad-to 64] [--padded-modes]
    python bench/ab_block.py --shape llama-8b --batch 2 --grad-ckpt --modes "gate/up shared,GEMM orders measured"
    python bench/ab_block.py --modes "gate/up shared,strided dX,fused dH,strided dX + fused dH"   # not yet run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from train_gpu import SHAPES, TARGETS, build_for_training

import lorakit as lk
import lorakit.widen
from lorakit.kernels import gated_mlp, gemm_choice, shared_input


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pad-to", type=int, default=1, help="lorakit.widen.PAD_TO: pad widened rows to this multiple")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--modes", default="", help="comma list of the modes to run (default: the first four)")
    p.add_argument("--padded-modes", action="store_true",
                   help="also the shared-input modes with rows padded to 64 (widen.PAD_TO), in the same rounds")
    args = p.parse_args()
    model = build_for_training(args.shape, "cuda", args.grad_ckpt)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    pad = args.pad_to
    # (fused MLP block, shared-input ops, q/k/v too, PAD_TO, GEMM orders measured, strided dX, fused dH)
    modes = {"shared-input ops": (True, True, True, pad, False, False, False),
             "gate/up shared": (True, True, False, pad, False, False, False),
             "down op only": (True, False, False, pad, False, False, False),
             "block not fused": (False, False, False, pad, False, False, False)}
    every = modes | {"shared, pad 64": (True, True, True, 64, False, False, False),
                     "gate/up, pad 64": (True, True, False, 64, False, False, False),
                     "GEMM orders measured": (True, True, False, pad, True, False, False),  # gemm_choice.ENABLED
                     "+ q/k/v, measured": (True, True, True, pad, True, False, False),
                     "strided dX": (True, True, False, pad, False, True, False),  # shared_input.STRIDED_GRAD_X
                     "fused dH": (True, True, False, pad, False, False, True),  # gated_mlp.FUSED_DH_LORA
                     "strided dX + fused dH": (True, True, False, pad, False, True, True)}
    if args.padded_modes:
        modes |= {k: every[k] for k in ("shared, pad 64", "gate/up, pad 64")}
    if args.modes:
        modes = {k: every[k] for k in args.modes.split(",")}
    res: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, (fused, widen, qkv, pad_to, choose, strided, fused_dh) in modes.items():
            lk.blocks.unfuse(model)  # gives the widened weights back: the next mode widens them anew
            lk.widen.PAD_TO = pad_to
            gemm_choice.ENABLED = choose
            shared_input.STRIDED_GRAD_X = strided
            gated_mlp.FUSED_DH_LORA = fused_dh
            if fused:
                lk.blocks.sync(model)
            lk.blocks.SHARED_INPUT, lk.blocks.SHARED_QKV = widen, qkv
            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            walls, gpus = [], []
            for _ in range(args.steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                step()
                b.record()
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - t0)
                gpus.append(a.elapsed_time(b) / 1e3)
            res[name].append((statistics.median(walls), statistics.median(gpus)))
    tokens = args.batch * args.seq
    print(f"{args.shape}, {args.batch}x{args.seq}, {torch.cuda.get_device_name()}, PAD_TO {args.pad_to}: "
          "tokens/s per round (wall)")
    for name, rounds in res.items():
        walls = " ".join(f"{tokens / w / 1e3:6.1f}k" for w, _ in rounds)
        print(f"| {name:20s} | {walls} | step ms wall/events: "
              + " ".join(f"{w * 1e3:.1f}/{g * 1e3:.1f}" for w, g in rounds) + " |")
    if gemm_choice.chosen:
        print("GEMM orders measured (lorakit.kernels.gemm_choice):\n" + gemm_choice.report())


if __name__ == "__main__":
    main()
