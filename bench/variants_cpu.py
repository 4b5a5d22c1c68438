"""LoRA variants on the CPU: DoRA step cost against plain LoRA and PEFT's DoRA, PiSSA init time (full versus
randomized SVD), and prefix-tuning parameter counts against LoRA for real model shapes (from configs only).

DoRA rows: GPT-2-124M shape (random weights from a config), fp32, r=16 on c_attn, c_proj, c_fc; a training step
(forward + backward + AdamW) as a median over alternating runs. PiSSA rows: one (out, in) fp32 weight, rank r.

    python bench/variants_cpu.py [--batch 2 --seq 128 --steps 5 --svd 2048x2048 --rank 16]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings

import torch
from common import timed

warnings.filterwarnings("ignore")


def dora_rows(args) -> list[tuple[str, float]]:
    import peft
    import transformers

    import lorakit as lk

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config()).train()
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    targets = ["c_attn", "c_proj", "c_fc"]
    ids = torch.randint(0, 50257, (args.batch, args.seq))
    models = {}
    for name, dora in (("lorakit LoRA", False), ("lorakit DoRA", True)):
        m = copy.deepcopy(base)
        lk.inject(m, lk.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets, use_dora=dora))
        models[name] = m
    models["PEFT DoRA"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, use_dora=True, fan_in_fan_out=True))
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        steps[name] = step
    times = {name: [] for name in steps}
    for _ in range(args.steps):  # alternate, so drift on a shared machine hits all alike
        for name, step in steps.items():
            times[name].append(timed(step, 1))
    return [(f"train step, {name}", statistics.median(t)) for name, t in times.items()]


def pissa_rows(args) -> list[tuple[str, float]]:
    from lorakit.layers.pissa import principal_factors

    out, inp = (int(v) for v in args.svd.split("x"))
    W = torch.randn(out, inp)
    rows = []
    for label, niter in (("full SVD (init='pissa')", None), ("randomized, niter=4 (init='pissa_niter_4')", 4),
                         ("randomized, niter=16", 16)):
        seconds = timed(lambda niter=niter: principal_factors(W, args.rank, 1.0, niter), 3 if niter else 1)
        A, B = principal_factors(W, args.rank, 1.0, niter)
        err = torch.linalg.matrix_norm(W - B @ A).item()
        rows.append((f"PiSSA {args.svd} r={args.rank}: {label} (residual norm {err:.2f})", seconds))
    return rows


def prefix_rows() -> list[str]:
    import transformers

    from lorakit.prefix import PrefixConfig, geometry

    lines = []
    shapes = {
        "GPT-2 124M": (transformers.GPT2Config(), 768 + 3 * 768),  # c_attn: 768 -> 2304
        "Llama-2-7B shape": (transformers.LlamaConfig(), None),
    }
    for name, (cfg, _) in shapes.items():
        geo = geometry(cfg)
        prefix = geo.param_count(PrefixConfig(num_virtual_tokens=20))
        if name.startswith("GPT-2"):
            lora = cfg.n_layer * 8 * (768 + 2304)  # r=8 on c_attn (q, k, v fused)
            what = "LoRA r=8 on c_attn"
        else:
            lora = cfg.num_hidden_layers * 2 * 8 * (cfg.hidden_size + cfg.hidden_size)  # r=8 on q_proj, v_proj
            what = "LoRA r=8 on q_proj, v_proj"
        lines.append(f"{name}: prefix 20 virtual tokens {prefix:,} trainable; {what} {lora:,}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--svd", default="2048x2048")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for label, seconds in dora_rows(args) + pissa_rows(args):
        print(f"{label:<80} {seconds * 1000:10.1f} ms")
    for line in prefix_rows():
        print(line)


if __name__ == "__main__":
    main()
