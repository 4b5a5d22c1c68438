"""Where graphed decoder layers' memory goes: the live blocks of one LoRA step, eager against graphed.

For each mode, after warm-up steps: the allocated memory between steps, right after the forward (loss computed,
backward not yet run) and the step's peak; then the live blocks at the after-forward point grouped by size and
by pool (the graphs' private pool or the caching allocator's general one), so that what graphs add shows up as
a size class with more blocks. A graph's temporaries are free blocks of its pool after the capture, so they
show up in the reserved figure only (the last column).

    python bench/graph_memory.py --shape llama-8b --batch 2 --grad-ckpt
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc

import torch
from train_gpu import TARGETS, build_for_training

import lorakit as lk

GIB = 2**30


def pool_kind(segment: dict) -> str:
    """'graph pool' for a segment of a CUDA graph's private pool, else 'general' (the caching allocator's)."""
    return "graph pool" if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0) else "general"


def live_blocks(labels: dict[int, str]) -> collections.Counter:
    """(pool kind, block MiB, label) -> count of the active blocks now; the label is that of the tensor whose
    storage starts at the block (``labels``: address -> what), or "?" and the stream of its segment (a block
    of a side stream's segment is, e.g., that stream's cuBLAS workspace)."""
    where: collections.Counter = collections.Counter()
    for seg in torch.cuda.memory._snapshot()["segments"]:
        kind = pool_kind(seg)
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                what = labels.get(b["address"], f"? (stream {seg.get('stream', '?')})")
                where[(kind, round(b["size"] / 2**20, 1), what)] += 1
    return where


def by_size(where: collections.Counter) -> collections.Counter:
    """(pool kind, block MiB) -> count: live_blocks' counts summed over the labels."""
    blocks: collections.Counter = collections.Counter()
    for (kind, size, _), n in where.items():
        blocks[(kind, size)] += n
    return blocks


def _labels(model, saved: dict[int, str]) -> dict[int, str]:
    """Block address -> what lives there: parameters, buffers, the graphed layers' static tensors, and the
    tensors autograd saved in the forward (``saved``)."""
    labels = dict(saved)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        labels[t.untyped_storage().data_ptr()] = "parameter " + name.split(".")[-1]
    for layer in model.model.layers:
        cap = getattr(layer.__dict__.get("forward"), "captured", None)
        if cap is None:
            continue
        for what, t in (("graph static input", cap.inputs[0]), ("graph static output", cap.output),
                        ("graph input-grad buffer", cap.grad_output), ("graph cos", cap.inputs[1]),
                        ("graph sin", cap.inputs[2])):
            labels[t.untyped_storage().data_ptr()] = what
        for g in cap.grads:
            if g is not None:
                labels.setdefault(g.untyped_storage().data_ptr(), "graph param-grad buffer")
    return labels


def run(model, batch, graphed: bool, warmup: int, labels_on: bool) -> dict:
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    if graphed:
        lk.graph_layers(model)
    gc.collect()
    torch.cuda.empty_cache()
    for _ in range(warmup):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    between = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    saved: dict[int, str] = {}  # address -> label, filled by the hooks below (--labels)

    def pack(t):  # what autograd saves outside the checkpointed layers (inside, checkpoint's own hooks apply)
        saved.setdefault(t.untyped_storage().data_ptr(), f"saved {tuple(t.shape)}")
        return t

    def label(what):  # a module's output (and the norm's input) by storage, for the live-block labels
        def hook(module, args, output):
            for name, t in (("output", output), ("input", args[0] if args else None)):
                if isinstance(t, torch.Tensor) and (name == "output" or what == "final norm"):
                    saved.setdefault(t.untyped_storage().data_ptr(), f"{what} {name}")
        return hook

    handles = []
    if labels_on:
        handles = [model.model.embed_tokens.register_forward_hook(label("embedding")),
                   model.model.norm.register_forward_hook(label("final norm"))]
        handles += [layer.register_forward_hook(label(f"layer {i}")) for i, layer in enumerate(model.model.layers)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if labels_on else contextlib.nullcontext():
        out = model(input_ids=batch, labels=batch)
    for h in handles:
        h.remove()
    loss = out.loss
    if out.logits is not None:  # liger's fused linear + cross-entropy returns none
        saved[out.logits.untyped_storage().data_ptr()] = "logits"
    del out
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated() / GIB
    where = live_blocks(_labels(model, saved) if labels_on else {})
    loss.backward()
    del loss
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    held: collections.Counter = collections.Counter()  # reserved bytes by pool kind now (segments are kept)
    active: collections.Counter = collections.Counter()  # of which allocated (a graph pool's rest: temporaries)
    for seg in torch.cuda.memory._snapshot()["segments"]:
        held[pool_kind(seg)] += seg["total_size"]
        active[pool_kind(seg)] += seg.get("allocated_size", 0)
    out = {"held": {k: v / GIB for k, v in held.items()}, "active": {k: v / GIB for k, v in active.items()},
           "between": between, "after_forward": after_forward,
           "peak": torch.cuda.max_memory_allocated() / GIB, "reserved": torch.cuda.max_memory_reserved() / GIB,
           "where": where}
    if graphed:
        lk.ungraph_layers(model)
    del opt
    lk.unload(model, merge_adapters=False)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--liger", action="store_true", help="liger-kernel's fused kernels (lorakit.fast)")
    parser.add_argument("--no-fold", action="store_true", help="graphs.FOLD_FINAL_NORM off")
    parser.add_argument("--labels", action="store_true",
                        help="label the live blocks (parameters, graph statics, saved tensors) and print those of "
                        "the sizes that differ, by label")
    args = parser.parse_args()
    if args.no_fold:
        from lorakit import graphs
        graphs.FOLD_FINAL_NORM = False
    model = build_for_training(args.shape, "cuda", args.grad_ckpt)
    if args.liger:
        import lorakit.fast
        lorakit.fast.speed_up_base(model)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    results = {name: run(model, batch, graphed, args.warmup, args.labels) for name, graphed in (("eager", False),
                                                                                  ("graphed", True))}
    print(f"\n{args.shape}, batch {args.batch} x {args.seq}, grad ckpt {args.grad_ckpt}; GiB allocated")
    print("| mode | between steps | after forward | step peak | step reserved peak |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['between']:.3f} | {r['after_forward']:.3f} | {r['peak']:.3f} | {r['reserved']:.3f} |")
    for name, r in results.items():
        print(f"{name}: reserved after the step by pool (GiB): "
              + ", ".join(f"{k} {v:.3f} ({r['active'].get(k, 0.0):.3f} allocated)"
                          for k, v in sorted(r["held"].items())))
    eager, graphed = (by_size(results[name]["where"]) for name in ("eager", "graphed"))
    sizes = sorted({s for _, s in eager} | {s for _, s in graphed}, reverse=True)
    print("\nlive blocks after the forward, by size (MiB): count eager general / graphed general / graphed pool; "
          "the MiB graphs add")
    total = 0.0
    differ = set()  # the sizes of >= 1 MiB whose counts differ
    for s in sizes:
        e = eager[("general", s)] + eager[("graph pool", s)]
        g, p = graphed[("general", s)], graphed[("graph pool", s)]
        if e != g + p:
            total += (g + p - e) * s
            if s >= 1:
                differ.add(s)
            print(f"  {s:9.1f} MiB: {e:4d} / {g:4d} / {p:4d}   {(g + p - e) * s:+9.1f}")
    print(f"  sum of the differences: {total:+.1f} MiB")
    if args.labels:
        for name, r in results.items():
            print(f"\n{name}: live blocks of those sizes, by what they hold")
            for (kind, size, place), n in sorted(r["where"].items(), key=lambda kv: (-kv[0][1], kv[0][2])):
                if size in differ:
                    print(f"  {size:7.1f} MiB x {n:3d}  {kind:10s}  {place}")


if __name__ == "__main__":
    main()
