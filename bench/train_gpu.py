"""LoRA training step on a GPU: the frozen floor, PEFT (three settings) and lorakit, in ONE process.

Llama-shaped models with random weights built from a config (no download), bf16, SDPA attention, r=16 on
q,k,v,o,gate,up,down, fused AdamW. For each setup: median tokens/s over >= 8 steps after warm-up, and peak
memory. The floor is the frozen base's forward + backward to the inputs with no optimizer: no LoRA step
can be faster. Also prints a torch.profiler summary of one lorakit step and, with --check, the loss curves
of lorakit's fused path against its reference path over 50 steps.

    python bench/train_gpu.py --shape llama-1b            # batch 4 x 2048
    python bench/train_gpu.py --shape llama-8b --grad-ckpt --batch 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
from common import build_llama

warnings.filterwarnings("ignore")

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, head_dim=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, device: str):
    return build_llama(SHAPES[shape], device)


def build_for_training(shape: str, device: str, grad_ckpt: bool):
    """The model of ``shape`` set up for training steps: no KV cache, and (``grad_ckpt``) non-reentrant
    gradient checkpointing with inputs that require grad, as the benches here run it."""
    model = build(shape, device)
    model.config.use_cache = False
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, step_fn, batch, steps: int, warmup: int, device: str) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step_fn()
    sync(device)
    warm_peak = 0.0
    if device == "cuda":  # the warm-up's peak (first calls, CUDA graph captures) apart from the timed steps'
        warm_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    steady = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    # a CUDA graph's temporaries are blocks of its pool, free (not allocated) after the capture although every
    # replay writes them: only the reserved peak counts them
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else float("nan")
    return {"tok_s": batch.numel() / statistics.median(times), "peak_gib": max(warm_peak, steady),
            "steady_peak_gib": steady, "reserved_gib": reserved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--only", default="", help="comma list of setups to run (default: all)")
    parser.add_argument("--check", action="store_true", help="50-step loss curves: fused vs reference path")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times in turn and report the median (rows drift run to run)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-shapes", action="store_true",
                        help="with --profile: also the GEMMs (aten mm/addmm) of one step by input shapes")
    parser.add_argument("--liger", action="store_true", help="also lower the floor with lorakit.fast (liger-kernel)")
    parser.add_argument("--liger-variants", action="store_true",
                        help="with --liger, also the A/B rows without the fused MLP block and without shared-input ops")
    parser.add_argument("--graphs", action="store_true",
                        help="also time the floor, PEFT bf16 and lorakit as whole-step CUDA graphs (GraphedTrainStep)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the floor, PEFT bf16 and lorakit under torch.compile (inductor, whole model)")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test this script)")
    args = parser.parse_args()

    import peft
    import transformers

    import lorakit as lk
    import lorakit.fast

    device = args.device
    model = build_for_training(args.shape, device, args.grad_ckpt)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=None)

    def train_step_factory(m, params, autocast: bool, graphed: bool = False, compiled: bool = False):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda", capturable=graphed) if params else None
        if compiled:  # inductor on the whole model (fresh caches per row); the optimizer stays eager
            torch._dynamo.reset()
            m = torch.compile(m)
        if graphed:  # graphed_step.py: warm-up steps eagerly, then one CUDA graph replayed per step
            from graphed_step import GraphedTrainStep

            def loss_fn(b):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                    return m(input_ids=b["input_ids"], labels=b["input_ids"]).loss

            graphed_step = GraphedTrainStep(loss_fn, opt, warmup=2)
            return lambda: graphed_step({"input_ids": batch})

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = m(input_ids=batch, labels=batch).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    runs: dict[str, list[dict]] = {}
    profiles: dict[str, dict[str, tuple[float, int]]] = {}
    only = set(filter(None, args.only.split(",")))

    def guarded(label, run):
        """A failing row (e.g. a step that cannot be captured as a CUDA graph) is reported, not fatal."""
        try:
            runs.setdefault(label, []).append(run())
        except Exception as exc:  # noqa: BLE001
            print(f"{label} failed: {exc!r}"[:400], flush=True)
            gc.collect()

    def want(name):
        return not only or name in only

    def floor(label, graphed=False, compiled=False):
        """The floor: frozen base, forward + backward to the inputs, no optimizer."""
        model.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(lambda mod, i, o: o.requires_grad_(True))
        step = train_step_factory(model, [], False, graphed, compiled)
        guarded(label, lambda: measure(model, step, batch, args.steps, args.warmup, device))
        if args.profile and label == "frozen base fwd+bwd (floor)" and "floor" not in profiles:
            profiles["floor"] = profile(step, "the floor", args.profile_shapes)
        if args.profile and label == "floor + liger kernels (new floor)" and "liger floor" not in profiles:
            profiles["liger floor"] = profile(step, "the new floor", args.profile_shapes)
        handle.remove()

    def lorakit_row(label, dtype=None, autocast=False, fused=True, graphed=False, compiled=False, block=True,
                    widen=True):
        lk.blocks.SHARED_INPUT = widen  # A/B: q/k/v and gate/up as their own LoRA layers
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS, dtype=dtype))
        if not block:  # A/B: the MLP as three LoRA layers, storing the down projection's input
            lk.blocks.unfuse(model)
        for _, layer in lk.lora_layers(model):
            layer.use_fused_kernel = fused
        params = [p for p in model.parameters() if p.requires_grad]
        step = train_step_factory(model, params, autocast, graphed, compiled)
        guarded(label, lambda: measure(model, step, batch, args.steps, args.warmup, device))
        if args.profile and label == "lorakit bf16 adapters" and "lorakit" not in profiles:
            profiles["lorakit"] = profile(step, "one lorakit step", args.profile_shapes)
        if args.profile and label == "lorakit bf16 adapters + liger kernels" and "liger lorakit" not in profiles:
            profiles["liger lorakit"] = profile(step, "one lorakit step on the new floor", args.profile_shapes)
        lk.unload(model, merge_adapters=False)
        lk.blocks.SHARED_INPUT = True
        gc.collect()

    for _ in range(args.rounds):  # every row in turn, so drift over the run hits all alike
        if want("floor"):
            floor("frozen base fwd+bwd (floor)")
            if args.graphs:
                floor("floor, CUDA graph", graphed=True)
            if args.compile:
                floor("floor, torch.compile", compiled=True)

        # --- PEFT, three settings
        peft_rows = [
            ("PEFT default (fp32 adapters)", False, {}, False),
            ("PEFT under autocast(bf16)", True, {}, False),
            ("PEFT bf16 adapters", False, {"autocast_adapter_dtype": False}, False),
        ]
        if args.graphs:
            peft_rows.append(("PEFT bf16 adapters, CUDA graph", False, {"autocast_adapter_dtype": False}, True))
        if args.compile:
            peft_rows.append(("PEFT bf16 adapters, torch.compile", False, {"autocast_adapter_dtype": False}, "compile"))
        for label, autocast, kwargs, graphed in peft_rows:
            if only and "peft" not in only:
                continue
            cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
            pm = peft.get_peft_model(model, cfg, **kwargs)
            params = [p for p in pm.parameters() if p.requires_grad]
            step = train_step_factory(pm, params, autocast, graphed is True, graphed == "compile")
            guarded(label, lambda pm=pm, step=step: measure(pm, step, batch, args.steps, args.warmup, device))
            model = pm.unload()
            del pm, params
            gc.collect()

        # --- lorakit
        if not only or "lorakit" in only:
            lorakit_row("lorakit bf16 adapters")
            lorakit_row("lorakit fp32 adapters + autocast", dtype=torch.float32, autocast=True)
            lorakit_row("lorakit bf16, no shared-input ops", widen=False)
            lorakit_row("lorakit bf16, MLP block not fused", block=False)
            lorakit_row("lorakit reference path (no fused kernel)", fused=False)
            if args.graphs:
                lorakit_row("lorakit bf16 adapters, CUDA graph", graphed=True)
            if args.compile:
                lorakit_row("lorakit bf16 adapters, torch.compile", compiled=True)
    if args.liger:  # last: liger patches transformers' Llama module globally
        lk.fast.speed_up_base(model)
        for _ in range(args.rounds):
            floor("floor + liger kernels (new floor)")
            lorakit_row("lorakit bf16 adapters + liger kernels")
            if args.liger_variants:
                lorakit_row("lorakit + liger, MLP block not fused", block=False)
                lorakit_row("lorakit + liger, no shared-input ops", widen=False)

    results = {label: {"tok_s": statistics.median(r["tok_s"] for r in rs), "all": [r["tok_s"] for r in rs],
                       "peak_gib": max(r["peak_gib"] for r in rs)} for label, rs in runs.items()}
    floor_tok = results.get("frozen base fwd+bwd (floor)", {}).get("tok_s")
    new_floor = results.get("floor + liger kernels (new floor)", {}).get("tok_s")
    graphed_floor = results.get("floor, CUDA graph", {}).get("tok_s")
    compiled_floor = results.get("floor, torch.compile", {}).get("tok_s")
    peft_best = max((v["tok_s"] for k, v in results.items()
                     if k.startswith("PEFT") and "graph" not in k and "compile" not in k),
                    default=None)
    peft_default = results.get("PEFT default (fp32 adapters)", {}).get("tok_s")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{args.shape} shape, bf16, SDPA, batch {args.batch} x {args.seq}, grad ckpt {args.grad_ckpt}, "
          f"r=16 on 7 projections, fused AdamW; {gpu}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}; {time.strftime('%Y-%m-%d')}")
    refs = [("/ floor", floor_tok), ("/ floor graphed", graphed_floor),
            ("/ floor compiled", compiled_floor), ("/ new floor", new_floor), ("/ PEFT best", peft_best),
            ("/ PEFT default", peft_default)]
    refs = [(k, v) for k, v in refs if v]
    print(f"| {'setup':<42} | {'tokens/s':>9} | {'peak GiB':>8} | " + " | ".join(f"{k:>14}" for k, _ in refs) + " |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 10}|" + "|".join("-" * 16 for _ in refs) + "|")
    for label, r in results.items():
        cells = " | ".join(f"{r['tok_s'] / v:>14.3f}" for _, v in refs)
        rounds = " (rounds: " + " ".join(f"{t / 1e3:.1f}k" for t in r["all"]) + ")" if args.rounds > 1 else ""
        print(f"| {label:<42} | {r['tok_s'] / 1e3:>8.1f}k | {r['peak_gib']:>8.1f} | {cells} |{rounds}")
    if "floor" in profiles and "lorakit" in profiles:
        print_profile_diff(profiles["floor"], profiles["lorakit"])
    if "liger floor" in profiles and "liger lorakit" in profiles:
        print("\nwith liger kernels (--liger):")
        print_profile_diff(profiles["liger floor"], profiles["liger lorakit"])
    if args.check:
        check_numerics("tiny", device)


def print_profile_diff(floor: dict, lora: dict, rows: int = 25) -> None:
    """Where the LoRA step's extra GPU time goes: per kernel name, lorakit minus floor (ms, calls)."""
    names = set(floor) | set(lora)
    diff = sorted(names, key=lambda n: lora.get(n, (0, 0))[0] - floor.get(n, (0, 0))[0], reverse=True)
    total_f = sum(v[0] for v in floor.values())
    total_l = sum(v[0] for v in lora.values())
    print(f"\nGPU time of one step: floor {total_f:.2f} ms, lorakit {total_l:.2f} ms (+{total_l - total_f:.2f} ms)")
    print(f"| {'kernel':<90} | floor ms (calls) | lorakit ms (calls) | extra ms |")
    print(f"|{'-' * 92}|------------------|--------------------|----------|")
    # the largest increases, then the largest decreases (a GEMM that adds the LoRA term in its epilogue
    # runs under another kernel name than the floor's: it shows as one row up and one row down)
    shown = diff[:rows] + [n for n in diff[-(rows // 3):] if n not in diff[:rows]]
    for n in shown:
        f, l = floor.get(n, (0.0, 0)), lora.get(n, (0.0, 0))
        print(f"| {n[:90]:<90} | {f[0]:>8.2f} ({f[1]:>4}) | {l[0]:>10.2f} ({l[1]:>4}) | {l[0] - f[0]:>8.2f} |")


def profile(step, what: str, shapes: bool = False) -> dict[str, tuple[float, int]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    print(f"\ntop CUDA kernels of {what} (the profiled step took {wall_ms:.1f} ms of wall time):")
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))
    if shapes:  # a step of its own: with CPU ops recorded, their device time would count twice in the diff
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as by_shape:
            step()
            torch.cuda.synchronize()
        print_gemm_shapes(by_shape, what)
    attr = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    return {e.key: (getattr(e, attr) / 1e3, e.count) for e in averages if getattr(e, attr) > 0}


def print_gemm_shapes(prof, what: str) -> None:
    """GPU time of one step's GEMMs by op and input shapes (which GEMM each kernel row of the diff is)."""
    gemms = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in gemms]
    attr = "device_time_total" if hasattr(rows[0], "device_time_total") else "cuda_time_total"
    rows.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in rows) / 1e3
    print(f"\nGEMMs of {what} by input shapes: {total:.2f} ms in all")
    print("| op | input shapes | calls | ms | us/call |")
    for e in rows[:40]:
        t = getattr(e, attr) / 1e3
        print(f"| {e.key} | {str(e.input_shapes)[:110]} | {e.count} | {t:.2f} | {t / e.count * 1e3:.1f} |")


def check_numerics(shape: str, device: str) -> None:
    """50 bf16 training steps, fused kernel versus reference path, same seed and data; with dropout 0.1
    (per-layer fused op) and without (where the fused MLP block runs too)."""
    import lorakit as lk

    for dropout in (0.1, 0.0):
        curves = {}
        for fused in (True, False):
            model = build(shape, device)
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS, dropout=dropout))
            for _, layer in lk.lora_layers(model):
                layer.use_fused_kernel = fused
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            gen = torch.Generator(device=device).manual_seed(0)
            torch.manual_seed(0)
            losses = []
            for _ in range(50):
                ids = torch.randint(0, model.config.vocab_size, (4, 256), device=device, generator=gen)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            curves[fused] = losses
        diff = max(abs(a - b) for a, b in zip(curves[True], curves[False]))
        print(f"\nnumerics ({shape}, bf16, dropout {dropout}, 50 steps): loss {curves[True][0]:.4f} -> "
              f"{curves[True][-1]:.4f} fused, {curves[False][0]:.4f} -> {curves[False][-1]:.4f} reference; "
              f"max |diff| {diff:.4f}")

if __name__ == "__main__":
    main()
