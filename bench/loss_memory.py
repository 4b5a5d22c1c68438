"""Memory and time of the causal-LM loss step (output layer + cross-entropy, forward and backward) three ways:

* plain:   logits = head(h); F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ...)   (the usual code)
* chunked: logits = head(h); lorakit.train.losses.shifted_cross_entropy_sum  (no fp32 copies of the logits)
* fused:   lorakit.train.losses.shifted_linear_cross_entropy_sum(h, W, ...)  (no logits at all; the trainer's
           default for Llama/Mistral/Qwen/Phi-3/GPT-2 heads)

Each variant runs in a fresh subprocess; peak memory above what the inputs hold: CUDA max_memory_allocated, or
on the CPU the process's peak RSS (ru_maxrss) growth.

    python bench/loss_memory.py                               # SmolLM2-135M head, 4 x 512 tokens, CPU
    python bench/loss_memory.py --device cuda --vocab 128256 --hidden 4096 --batch 2 --seq 2048 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("plain", "chunked", "fused")


def one(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from lorakit.train.losses import shifted_cross_entropy_sum, shifted_linear_cross_entropy_sum

    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype, generator=gen) * args.hidden**-0.5
    hidden0 = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dtype, generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen)

    def step() -> float:
        hidden = hidden0.clone().requires_grad_(True)
        if args.variant == "fused":
            loss = shifted_linear_cross_entropy_sum(hidden, weight, None, labels)
        else:
            logits = F.linear(hidden, weight)
            if args.variant == "chunked":
                loss = shifted_cross_entropy_sum(logits, labels)
            else:
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab).float(),
                                       labels[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        return float(loss)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # inputs only
    step()  # warm-up (allocator, kernels); on the CPU its RSS peak is the step's
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_before
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        value = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:  # the RSS high-water mark over the steps, above the inputs (the allocator may keep pages)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": args.variant, "loss": value, "seconds": min(times), "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    rows = []
    for variant in VARIANTS:
        argv = [*sys.argv[1:], "--variant", variant]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{args.batch} x {args.seq} tokens, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}, "
          f"{args.device}; {time.strftime('%Y-%m-%d')}")
    print("| variant | loss | step s | extra peak MiB | vs plain |\n|---|---|---|---|---|")
    plain = rows[0]
    for r in rows:
        print(f"| {r['variant']} | {r['loss']:.4f} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / max(plain['peak_mib'], 1e-9):.2f}x memory, "
              f"{plain['seconds'] / r['seconds']:.2f}x speed |")


if __name__ == "__main__":
    main()
