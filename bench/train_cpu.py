"""LoRA training step on the CPU against the frozen floor and PEFT, in one process.

GPT-2-124M shape (random weights from a config), fp32, batch 4 x 256, LoRA r=16 on c_attn, c_proj, c_fc,
fused AdamW (as lorakit's trainer; every row alike, since 2026-12-04). The floor is the frozen base's forward +
backward to the inputs with no optimizer. Providers run in turn, step after step, so that drift on a shared
machine hits all alike; figures are medians, and the "paired" ratio is the median of each round's floor step
over the row's step in the same round.

    python bench/train_cpu.py [--steps 6 --batch 4 --seq 256 --layers 12]
    python bench/train_cpu.py --family llama --layers 8   # Llama's MLP: lorakit's fused block, A/B

``--family llama``: a Llama shape of GPT-2-124M's width (hidden 768, intermediate 2048, 12 heads, 4 KV heads,
vocab 32000), r=16 on all seven projections; adds an A/B row without lorakit's fused MLP block.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--ab-db", action="store_true",
                        help="add a row with dB formed directly (lora_linear.CPU_TRANSPOSED_GRAD_B off)")
    parser.add_argument("--malloc", choices=["default", "tuned"], default="tuned",
                        help="tuned: what lorakit train does on the CPU (lorakit/_malloc.py); default: glibc's")
    args = parser.parse_args()
    tuned = False
    if args.malloc == "tuned":
        from lorakit._malloc import tune_for_training

        tuned = tune_for_training()

    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    import lorakit as lk

    torch.manual_seed(0)
    if args.family == "gpt2":
        cfg = GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        base = GPT2LMHeadModel(cfg).train()
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        from common import build_llama

        base = build_llama(dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=args.layers,
                                num_attention_heads=12, num_key_value_heads=4, vocab_size=32000, head_dim=64),
                           "cpu", torch.float32).train()
        base.config.use_cache = False
        cfg = base.config
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    floor = copy.deepcopy(base).requires_grad_(False)
    floor.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=16, alpha=32, target_modules=targets))
    reference = copy.deepcopy(ours)
    for _, layer in lk.lora_layers(reference):
        layer.use_fused_kernel = False
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))

    from lorakit.kernels import lora_linear

    def step_fn(model, optimize: bool, fuse_blocks: bool = True, shared: bool = True, transposed_db: bool = True):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if optimize else None

        def step():
            lk.blocks.ENABLED, lk.blocks.SHARED_INPUT = fuse_blocks, shared
            lora_linear.CPU_TRANSPOSED_GRAD_B = transposed_db
            model(input_ids=x, labels=x).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    providers = {
        "frozen base fwd+bwd (floor)": step_fn(floor, False),
        "PEFT": step_fn(theirs, True),
        "lorakit (fused kernel)": step_fn(ours, True),
        "lorakit (reference path)": step_fn(reference, True),
    }
    if args.ab_db:
        providers["lorakit, dB = s G^T @ XA"] = step_fn(copy.deepcopy(ours), True, transposed_db=False)
    if args.family == "llama":
        providers["lorakit, no shared-input ops"] = step_fn(copy.deepcopy(ours), True, shared=False)
        providers["lorakit, MLP block not fused"] = step_fn(copy.deepcopy(ours), True, fuse_blocks=False)
    for fn in providers.values():
        fn()
    times = {k: [] for k in providers}
    for _ in range(args.steps):
        for k, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_t, peft_t = med["frozen base fwd+bwd (floor)"], med["PEFT"]
    shape = "GPT-2-124M shape" if args.family == "gpt2" else "Llama shape 768/2048"
    print(f"{shape} ({args.layers} layers), fp32, batch {args.batch} x {args.seq}, r=16 on {targets}, "
          f"fused AdamW; torch {torch.__version__} ({torch.get_num_threads()} threads), peft {peft.__version__}; "
          f"{os.cpu_count()} cores {platform.machine()}; {time.strftime('%Y-%m-%d')}; median of {args.steps}; "
          f"malloc {'tuned' if tuned else 'default'}")
    floor_steps = times["frozen base fwd+bwd (floor)"]
    print(f"| {'setup':<30} | {'s/step':>7} | {'tokens/s':>8} | {'/ floor':>7} | {'/ floor, paired':>15} | "
          f"{'/ PEFT':>6} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 17}|{'-' * 8}|")
    for k, t in med.items():
        # paired: the median over rounds of (that round's floor step) / (this row's step in the same round), so
        # that a slow stretch of the shared machine hits both sides of each ratio
        paired = statistics.median(f / s for f, s in zip(floor_steps, times[k]))
        print(f"| {k:<30} | {t:>7.3f} | {x.numel() / t:>8.0f} | {floor_t / t:>7.3f} | {paired:>15.3f} | "
              f"{peft_t / t:>6.3f} |")


if __name__ == "__main__":
    main()
