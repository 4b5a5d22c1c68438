"""The CPU cost of a training step, apart from the GPU's work: the 1B and 8B Llama layer counts with tiny
widths (hidden 64, 8 x 16 tokens), so every kernel is trivially short and a step's wall time is the host's
dispatch - Python, autograd, op dispatch and kernel launches. The floor, PEFT (bf16 adapters) and lorakit, in
one process, with and without the optimizer step, and with gradient checkpointing (8B recomputes the forward).

Why: on an H200 (2026-12-02, bench/step_gaps.py) a traced lorakit step of the Llama-3-8B shape left the GPU
idle for ~100 ms of 515, against 9 ms for the floor: where the CPU needs longer than the GPU for a stretch of
kernels, the GPU waits.

    python bench/dispatch_cost.py [--device cuda] [--layers 16,32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import build_llama
from train_gpu import TARGETS

import lorakit as lk


def timed_ms(step, device: str, steps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", default="16,32")
    args = p.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(1)
    print(f"host dispatch per step, ms (tiny widths: the GPU's work is negligible); {device}, "
          f"torch {torch.__version__}")
    print("| layers | grad ckpt | floor | PEFT bf16 fwd+bwd | lorakit fwd+bwd | PEFT + AdamW | lorakit + AdamW "
          "| lorakit extra per projection call, us |")
    print("|---|---|---|---|---|---|---|---|")
    import peft

    for layers in map(int, args.layers.split(",")):
        for ckpt in (False, True):
            shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, head_dim=16)
            model = build_llama(shape, device, dtype=dtype)
            model.config.use_cache = False
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            batch = torch.randint(0, 256, (8, 16), device=device)
            model.requires_grad_(False)
            handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

            def fwd_bwd(m):
                return lambda: m(input_ids=batch, labels=batch).loss.backward()

            def with_opt(m):
                opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4,
                                        fused=device == "cuda", foreach=None if device == "cuda" else True)

                def step():
                    m(input_ids=batch, labels=batch).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                return step

            floor = timed_ms(fwd_bwd(model), device)
            handle.remove()
            pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
                                     autocast_adapter_dtype=False)
            peft_fb, peft_opt = timed_ms(fwd_bwd(pm), device), timed_ms(with_opt(pm), device)
            model = pm.unload()
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
            lk_fb, lk_opt = timed_ms(fwd_bwd(model), device), timed_ms(with_opt(model), device)
            calls = layers * len(TARGETS) * (2 if ckpt else 1)  # forwards (recomputed ones too)
            print(f"| {layers} | {ckpt} | {floor:.1f} | {peft_fb:.1f} | {lk_fb:.1f} | {peft_opt:.1f} | {lk_opt:.1f} "
                  f"| {(lk_fb - floor) / calls * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
