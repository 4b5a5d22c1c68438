"""lorakit core versus Hugging Face PEFT on the CPU, side by side in one process.

GPT-2-124M shape (random weights from a config), fp32, LoRA r=16 on c_attn, c_proj, c_fc (all of GPT-2's
Conv1D projections). Rows: injection time, a training step (forward + backward + AdamW) relative to the
frozen base's forward + backward (the floor for any LoRA step), unmerged inference overhead, merge and
unmerge time, adapter switch time, adapter file size. Runs alternate between the providers so that drift on
a shared machine hits both alike; each figure is a median.

    python bench/core_cpu.py [--batch 4 --seq 256 --steps 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import timed

warnings.filterwarnings("ignore")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per provider (median)")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()

    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    import lorakit as lk

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).eval()
    targets = ["c_attn", "c_proj", "c_fc"]
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    # --- injection
    def inject_lk():
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        lk.inject(m, lk.LoraConfig(r=16, alpha=32, target_modules=targets))
        return time.perf_counter() - t0, m

    def inject_peft():
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        p = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        return time.perf_counter() - t0, p

    inj = {"lorakit": [], "peft": []}
    for _ in range(3):
        inj["lorakit"].append(inject_lk()[0])
        inj["peft"].append(inject_peft()[0])
    _, ours = inject_lk()
    _, theirs = inject_peft()
    for model in (ours, theirs):  # same non-zero adapter weights in both, so the work is identical
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # bench-only: name-based, to treat PEFT's module the same way
                    p.normal_(0, 0.01)

    # --- training step versus the frozen floor
    floor = copy.deepcopy(base)
    floor.requires_grad_(False)
    floor.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def floor_step():
        out = floor(input_ids=x, labels=x)
        out.loss.backward()

    def make_step(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model.train()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    providers = {"floor": floor_step, "lorakit": make_step(ours), "peft": make_step(theirs)}
    for fn in providers.values():
        fn()  # warm-up
    step_times = {k: [] for k in providers}
    for _ in range(args.steps):
        for k, fn in providers.items():
            step_times[k].append(timed(fn, 1))
    step = {k: statistics.median(v) for k, v in step_times.items()}

    # --- inference, unmerged, versus the plain base
    def infer(model):
        model.eval()
        with torch.no_grad():
            model(input_ids=x)

    inf = {"base": [], "lorakit": [], "peft": []}
    for _ in range(args.steps):
        inf["base"].append(timed(lambda: infer(base), 1))
        inf["lorakit"].append(timed(lambda: infer(ours), 1))
        inf["peft"].append(timed(lambda: infer(theirs), 1))
    inf = {k: statistics.median(v) for k, v in inf.items()}

    # --- merge / unmerge
    def lk_merge():
        lk.merge(ours)
        lk.unmerge(ours)

    def peft_merge():
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    merge_t = {"lorakit": timed(lk_merge, 5), "peft": timed(peft_merge, 5)}

    # --- switching between two adapters
    lk.inject(ours, lk.LoraConfig(r=16, alpha=32, target_modules=targets), "other")
    theirs.add_adapter("other", peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))

    def lk_switch():
        lk.set_active_adapters(ours, "other")
        lk.set_active_adapters(ours, "default")

    def peft_switch():
        theirs.set_adapter("other")
        theirs.set_adapter("default")

    switch_t = {"lorakit": timed(lk_switch, 20) / 2, "peft": timed(peft_switch, 20) / 2}

    # --- files
    with tempfile.TemporaryDirectory() as tmp:
        lk.save_adapter(ours, Path(tmp) / "lk")
        theirs.save_pretrained(Path(tmp) / "peft", selected_adapters=["default"])
        size = {"lorakit": folder_bytes(Path(tmp) / "lk"), "peft": folder_bytes(Path(tmp) / "peft")}
        fresh = copy.deepcopy(base)
        load_lk = timed(lambda: (lk.load_adapter(fresh, Path(tmp) / "lk"), lk.delete_adapter(fresh, "default")), 3)
        load_peft = timed(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "peft"), 3)

    trainable = lk.summary(ours).trainable // 2  # two adapters of equal size are on the model now
    rows = [
        ("inject LoRA (s)", statistics.median(inj["lorakit"]), statistics.median(inj["peft"]), "lower"),
        ("train step (s)", step["lorakit"], step["peft"], "lower"),
        ("train step / frozen floor (x)", step["floor"] / step["lorakit"], step["floor"] / step["peft"], "higher"),
        ("inference unmerged / base (x)", inf["lorakit"] / inf["base"], inf["peft"] / inf["base"], "lower"),
        ("merge + unmerge (s)", merge_t["lorakit"], merge_t["peft"], "lower"),
        ("switch adapter (ms)", switch_t["lorakit"] * 1e3, switch_t["peft"] * 1e3, "lower"),
        ("load adapter (s, excl. base copy)", load_lk, load_peft, "lower"),
        ("adapter file (MB)", size["lorakit"] / 1e6, size["peft"] / 1e6, "lower"),
    ]
    print(f"GPT-2-124M shape ({args.layers} layers), fp32, batch {args.batch} x {args.seq}, r=16 on {targets}, "
          f"{trainable:,} trainable; torch {torch.__version__}, peft {peft.__version__}, "
          f"{os.cpu_count()} CPU cores, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"frozen floor (forward + backward to the inputs): {step['floor']:.3f} s/step; "
          f"base inference {inf['base']:.3f} s")
    print()
    print(f"| {'measure':<34} | {'lorakit':>9} | {'PEFT':>9} | lorakit vs PEFT |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 17}|")
    for label, ours_v, theirs_v, better in rows:
        ratio = theirs_v / ours_v if better == "lower" else ours_v / theirs_v
        print(f"| {label:<34} | {ours_v:>9.4g} | {theirs_v:>9.4g} | {ratio:>13.2f}x |")
    print("\n(last column: how many times better lorakit is; > 1 means lorakit wins)")


if __name__ == "__main__":
    main()
