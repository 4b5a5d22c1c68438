"""Decoder layers replayed as CUDA graphs (lorakit.graph_layers) against the same steps run eagerly.

The frozen floor and lorakit's LoRA step, each eager and with its decoder layers graphed, in interleaved
rounds in ONE process (drift hits all rows alike); median tokens/s per row and peak memory. Also checks that
the graphed step computes what the eager one does: the loss and the LoRA gradients of one batch, graphed
against eager, from the same weights.

    python bench/graphed_layers.py --shape llama-1b [--only floor,lorakit,lorakit-opt]
    python bench/graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch
from train_gpu import TARGETS, build_for_training, measure

import lorakit as lk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--liger", action="store_true",
                        help="every row on the lowered floor: liger-kernel's fused linear + cross-entropy, RMSNorm, "
                        "RoPE and SwiGLU (lorakit.fast.speed_up_base)")
    parser.add_argument("--only", default="floor,lorakit")
    parser.add_argument("--variants", default="",
                        help="comma list of extra graphed lorakit rows with an off-by-default path on: " +
                        ", ".join(VARIANTS))
    parser.add_argument("--eager-variants", action="store_true",
                        help="also run each of --variants eagerly (an eager row per variant, in the same rounds)")
    parser.add_argument("--silu-tile", help="swiglu_triton._TILE for the fused dH rows: BLOCK_M,BLOCK_N,ROW_STEPS,"
                        "num_warps (bench/silu_lora_tiles.py --best-out)")
    parser.add_argument("--silu-tile-da", help="swiglu_triton._TILE_DA, the same for the rows with dA folded in")
    args = parser.parse_args()
    if args.silu_tile:
        from lorakit.kernels import swiglu_triton
        swiglu_triton._TILE = tuple(int(v) for v in args.silu_tile.split(","))
        print(f"silu_backward_lora tile {swiglu_triton._TILE}")
    if args.silu_tile_da:
        from lorakit.kernels import swiglu_triton
        swiglu_triton._TILE_DA = tuple(int(v) for v in args.silu_tile_da.split(","))
        print(f"silu_backward_lora_da tile {swiglu_triton._TILE_DA}")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    device = "cuda"
    model = build_for_training(args.shape, device, args.grad_ckpt)
    if args.liger:
        import lorakit.fast
        lorakit.fast.speed_up_base(model)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    only = set(args.only.split(","))
    runs: dict[str, list[dict]] = {}

    def floor(graphed: bool):
        model.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(lambda mod, i, o: o.requires_grad_(True))
        if graphed:
            lk.graph_layers(model)

        def step():
            model(input_ids=batch, labels=batch).loss.backward()

        runs.setdefault("floor, graphed layers" if graphed else "floor (eager)", []).append(
            measure(model, step, batch, args.steps, args.warmup, device))
        if graphed:
            print(f"  floor replays: {lk.graphed_replays(model)}", flush=True)
            lk.ungraph_layers(model)
        handle.remove()

    def lora(graphed: bool, graphed_opt: bool = False, variant: str = ""):
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=graphed_opt)
        if graphed:
            lk.graph_layers(model)
        opt_step = OptimizerGraph(opt, params) if graphed_opt else None

        def step():
            model(input_ids=batch, labels=batch).loss.backward()
            if opt_step is not None:
                opt_step()
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)

        label = "lorakit, graphed layers + AdamW step" if graphed_opt else (
            "lorakit, graphed layers" if graphed else "lorakit (eager)")
        if variant:
            label += f" + {variant}"
        runs.setdefault(label, []).append(measure(model, step, batch, args.steps, args.warmup, device))
        if graphed:
            print(f"  lorakit replays: {lk.graphed_replays(model)}", flush=True)
            lk.ungraph_layers(model)
        del opt
        lk.unload(model, merge_adapters=False)
        gc.collect()

    check(model, batch)
    for _ in range(args.rounds):
        for graphed in (False, True):
            if "floor" in only:
                floor(graphed)
            if "lorakit" in only:
                lora(graphed)
        for v in variants:
            with VARIANTS[v]():
                if args.eager_variants:
                    lora(False, variant=v)
                lora(True, variant=v)
        if "lorakit-opt" in only:  # the optimizer step graphed as well
            lora(True, graphed_opt=True)

    print(f"\n{args.shape}, batch {args.batch} x {args.seq}, grad ckpt {args.grad_ckpt}, bf16, r=16 on 7 projections"
          f"{', liger kernels (lowered floor)' if args.liger else ''}; "
          f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    floor_tok = statistics.median(r["tok_s"] for r in runs.get("floor (eager)", [{"tok_s": float("nan")}]))
    print("| setup | tokens/s (median of rounds) | rounds | peak GiB | timed steps' peak GiB | timed steps' reserved "
          "GiB | / eager floor |")
    print("|---|---|---|---|---|---|---|")
    for label, rs in runs.items():
        tok = statistics.median(r["tok_s"] for r in rs)
        rounds = " ".join(f"{r['tok_s'] / 1e3:.1f}k" for r in rs)
        peak, steady = max(r["peak_gib"] for r in rs), max(r["steady_peak_gib"] for r in rs)
        reserved = max(r["reserved_gib"] for r in rs)
        print(f"| {label} | {tok / 1e3:.1f}k | {rounds} | {peak:.2f} | {steady:.2f} | {reserved:.2f} | "
              f"{tok / floor_tok:.3f} |")


@contextlib.contextmanager
def _flags(**flags):
    """Module flags (module.NAME) set for the duration of one row, then restored."""
    from lorakit import blocks, graphs
    from lorakit.kernels import gated_mlp, shared_input
    modules = {"STRIDED_GRAD_X": shared_input, "FUSED_DH_LORA": gated_mlp, "FUSED_DA_LORA": gated_mlp,
               "SHARED_QKV": blocks, "FOLD_FINAL_NORM": graphs, "WORKSPACE_IN_POOL": graphs,
               "CHECKPOINT_FINAL_NORM": graphs, "IN_PLACE_BACKWARD": gated_mlp, "WIDE_NORM": blocks}
    old = {name: getattr(modules[name], name) for name in flags}
    for name, value in flags.items():
        setattr(modules[name], name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(modules[name], name, value)


VARIANTS = {
    "contiguous dX": lambda: _flags(STRIDED_GRAD_X=False),  # the default before 2026-12-02
    "strided dX": lambda: _flags(STRIDED_GRAD_X=True),
    "fused dH": lambda: _flags(FUSED_DH_LORA=True),
    "strided dX + fused dH": lambda: _flags(STRIDED_GRAD_X=True, FUSED_DH_LORA=True),
    "fused dH + dA": lambda: _flags(FUSED_DH_LORA=True, FUSED_DA_LORA=True),
    "strided dX + fused dH + dA": lambda: _flags(STRIDED_GRAD_X=True, FUSED_DH_LORA=True, FUSED_DA_LORA=True),
    # q/k/v as one shared-input op (blocks.SHARED_QKV); graphed first on 2026-12-02 (session 20): +1.1% on 1B,
    # +1.4% on 8B over gate/up alone
    "shared q/k/v": lambda: _flags(SHARED_QKV=True),
    "gate/up only": lambda: _flags(SHARED_QKV=False),
    # session 21: the final norm folded into a checkpointed last layer's graphs (graphs.FOLD_FINAL_NORM)
    "norm not folded": lambda: _flags(FOLD_FINAL_NORM=False),
    # session 25: the final norm checkpointed on the last replay's output (graphs.CHECKPOINT_FINAL_NORM) or not
    "norm not checkpointed": lambda: _flags(CHECKPOINT_FINAL_NORM=False),
    # session 27: the SiLU backward writes dGate/dUp/H over gate/up/dH (gated_mlp.IN_PLACE_BACKWARD) or not
    "fresh SiLU grads": lambda: _flags(IN_PLACE_BACKWARD=False),
    # session 30: the norms before q/k/v and gate/up write into the shared-input ops' widened inputs
    # (blocks.WIDE_NORM) or the ops copy X there
    "norm copied": lambda: _flags(WIDE_NORM=False),
}


class OptimizerGraph:
    """``opt.step()`` then zeroed gradients, replayed as one CUDA graph after two eager calls (an experiment:
    AdamW's host prologue over hundreds of tensors, ~2 ms a 1B step, is what it removes). Gradients keep their
    storage (zeroed, not set to None), the optimizer is built with capturable=True.

    Measured on the H200 (2026-12-02, ``--only floor,lorakit,lorakit-opt``): no gain on top of graphed layers,
    1B 59.5k against 60.0k, 8B 10.2k against 10.2k (capturable AdamW does more work per step). Kept as that
    answer; the library has no such helper."""

    def __init__(self, opt, params):
        self.opt, self.params, self.calls, self.graph = opt, params, 0, None

    def __call__(self):
        self.calls += 1
        if self.calls <= 2:
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.opt.step()
                torch._foreach_zero_([p.grad for p in self.params])
        self.graph.replay()


def check(model, batch) -> None:
    """Loss and LoRA gradients of two batches, eager against graphed, from the same weights (no optimizer step);
    the second graphed step accumulates onto the first's gradients (micro-batches)."""
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    with torch.no_grad():  # B = 0 at init: give it values so the LoRA term (and dA) are not zero
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    other = torch.roll(batch, 1, dims=1)

    def accumulate():
        out = []
        for b in (batch, other):
            loss = model(input_ids=b, labels=b).loss
            loss.backward()
            out.append(loss.item())
        grads = {n: p.grad.float().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        return out, grads

    for _ in range(3):  # widen the fused blocks' weights, warm up
        accumulate()
    eager_loss, eager_grads = accumulate()
    _, again = accumulate()  # eager twice: the run-to-run noise (SDPA's backward accumulates in any order)
    lk.graph_layers(model)
    for _ in range(3):  # 2 eager warm-up calls per layer, then the capture
        accumulate()
    replays = lk.graphed_replays(model)
    graph_loss, graph_grads = accumulate()
    replayed = lk.graphed_replays(model) - replays
    def worst(grads):
        return max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in eager_grads.items())

    print(f"check: losses eager {eager_loss} graphed {graph_loss}; {replayed} layer calls replayed; max |grad diff| "
          f"/ max |grad| over {len(eager_grads)} LoRA tensors: graphed vs eager {worst(graph_grads):.2e}, eager vs "
          f"eager {worst(again):.2e}", flush=True)
    lk.ungraph_layers(model)
    lk.unload(model, merge_adapters=False)
    gc.collect()


if __name__ == "__main__":
    main()
