"""Where a training step's GPU waits: one traced step of the floor and of lorakit, its GPU idle time, and the
CPU ops that launched the kernel each idle gap waited for.

The profiler's kernel total of one lorakit step is lower than the step's wall time by more than the floor's
(Llama-1B 4x2048 on an H200, 2026-12-02: kernels 132 ms, wall ~145-152 ms; floor 123 / 129 ms): the GPU
waited on the CPU. This names the waits: every gap between consecutive kernels, attributed to the innermost
CPU op around the launch of the kernel that ends it, summed by op and by phase (forward / backward /
optimizer). ``--trace-dir`` also writes the chrome traces (gzip).

    python bench/step_gaps.py --shape llama-1b [--grad-ckpt --batch 2] [--trace-dir DIR]
    python bench/step_gaps.py --analyze DIR/lorakit.json.gz      # a trace written before
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import os
import tempfile

import torch

PHASES = ("step: forward", "step: backward", "step: optimizer")


def gaps(trace: dict, min_us: float = 5.0, top: int = 18) -> str:
    """A table of the GPU's idle time in one traced step by the CPU op that launched the kernel it waited
    for, and by phase."""
    events = trace["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                     key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e),
                 key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    phases = sorted((e for e in ops if e["name"] in PHASES), key=lambda e: e["ts"])

    def enclosing(ts: float, tid) -> tuple[str, str]:
        """(innermost op, phase) around CPU time ts on thread tid."""
        inner, best = "?", None
        i = bisect.bisect_right(starts, ts)
        for e in reversed(ops[max(0, i - 400):i]):
            if e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"] and e["name"] not in PHASES:
                if best is None or e["dur"] < best:
                    inner, best = e["name"], e["dur"]
        phase = next((p["name"][6:] for p in phases if p["ts"] <= ts <= p["ts"] + p["dur"]), "backward (engine)")
        return inner, phase

    busy = sum(k["dur"] for k in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"] if kernels else 0.0
    by_op: collections.Counter = collections.Counter()
    by_phase: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    end = kernels[0]["ts"] + kernels[0]["dur"] if kernels else 0.0
    for k in kernels[1:]:
        idle = k["ts"] - end
        end = max(end, k["ts"] + k["dur"])
        if idle < min_us:
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        op, phase = enclosing(launch["ts"], launch["tid"]) if launch else ("?", "?")
        by_op[op] += idle
        by_phase[phase] += idle
        count[op] += 1
    idle_total = sum(by_op.values())
    lines = [f"GPU span {span / 1e3:.2f} ms, kernels {busy / 1e3:.2f} ms, idle gaps >= {min_us:.0f} us "
             f"{idle_total / 1e3:.2f} ms",
             "idle by phase: " + ", ".join(f"{p} {t / 1e3:.2f} ms" for p, t in by_phase.most_common()),
             "| CPU op launching the kernel after a gap | gaps | idle ms |", "|---|---|---|"]
    lines += [f"| {op[:80]} | {count[op]} | {t / 1e3:.2f} |" for op, t in by_op.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--trace-dir", default="")
    p.add_argument("--sync-debug", action="store_true", help="also one step under torch.cuda.set_sync_debug_mode")
    p.add_argument("--analyze", default="", help="only print the gaps of this trace file")
    args = p.parse_args()
    if args.analyze:
        with (gzip.open if args.analyze.endswith(".gz") else open)(args.analyze, "rt") as f:
            print(gaps(json.load(f)))
        return

    from torch.profiler import ProfilerActivity, profile, record_function
    from train_gpu import TARGETS, build_for_training

    import lorakit as lk

    model = build_for_training(args.shape, "cuda", args.grad_ckpt)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")

    def traced(name: str, step) -> None:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        path = os.path.join(args.trace_dir or tempfile.mkdtemp(), f"{name}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        if args.trace_dir:
            with gzip.open(path + ".gz", "wt") as f:
                json.dump(trace, f)
        os.remove(path)
        print(f"\n{name}, {args.shape}, {args.batch}x{args.seq}, grad ckpt {args.grad_ckpt}, "
              f"{torch.cuda.get_device_name()}:\n{gaps(trace)}", flush=True)

    def make_step(opt):
        def step():
            with record_function("step: forward"):
                loss = model(input_ids=batch, labels=batch).loss
            with record_function("step: backward"):
                loss.backward()
            if opt is not None:
                with record_function("step: optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        return step

    model.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda mod, i, o: o.requires_grad_(True))
    traced("floor", make_step(None))
    handle.remove()
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
    step = make_step(opt)
    traced("lorakit", step)
    if args.sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)


if __name__ == "__main__":
    main()
