"""Where a LoRA step's extra time goes on the CPU: torch.profiler self time by op, lorakit's step against the
frozen floor's, both in steady state (three unprofiled steps of the same model before each profiled one).

GPT-2-124M shape, fp32, batch 4 x 256, r=16 on c_attn, c_proj, c_fc, AdamW (as bench/train_cpu.py). Prints the
unprofiled step times (the first one after switching models pays page faults) and the ops whose self time
differs most.

    python bench/cpu_step_profile.py
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

warnings.filterwarnings("ignore")


def main() -> None:
    from lorakit._malloc import tune_for_training

    tune_for_training()
    from transformers import GPT2Config, GPT2LMHeadModel

    import lorakit as lk

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (4, 256))
    floor = copy.deepcopy(base).requires_grad_(False)
    floor.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=16, alpha=32, target_modules=["c_attn", "c_proj", "c_fc"]))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)

    def floor_step():
        floor(input_ids=x, labels=x).loss.backward()

    def lora_step():
        ours(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    self_ms = {}
    for name, step in (("floor", floor_step), ("lorakit", lora_step)):
        unprofiled = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            unprofiled.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            profiled = time.perf_counter() - t0
        self_ms[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        print(f"{name}: unprofiled steps " + ", ".join(f"{t:.3f}" for t in unprofiled) + f" s; profiled {profiled:.3f} s")
    keys = set(self_ms["floor"]) | set(self_ms["lorakit"])
    diffs = sorted(((self_ms["lorakit"].get(k, 0.0) - self_ms["floor"].get(k, 0.0), k) for k in keys), reverse=True)
    gemms = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
    gemm_diff = sum(d for d, k in diffs if k in gemms)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; "
          f"GEMM self time, lorakit - floor: {gemm_diff:+.1f} ms")
    print("| op | lorakit - floor, ms | floor, ms |")
    print("|---|---|---|")
    for d, k in diffs[:12] + diffs[-4:]:
        print(f"| {k} | {d:+.1f} | {self_ms['floor'].get(k, 0.0):.1f} |")


if __name__ == "__main__":
    main()
