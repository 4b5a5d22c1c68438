"""QLoRA side by side: PEFT + bitsandbytes against lorakit, in one process, plus 4-bit kernel throughput.

Training: a Llama-3-8B-shaped model with random weights from a config (no download), NF4 + double
quantization (block 64), bf16 compute, SDPA, batch 2 x 2048, gradient checkpointing (non-reentrant),
r=16 / alpha=32 on q,k,v,o,gate,up,down, AdamW over the adapters. For each setup: median tokens/s over the
timed steps after warm-up, and peak allocated GPU memory during training (setup excluded).

Kernels (4096 x 14336 weight, bf16 out): dequantization, lorakit's Triton kernel against bitsandbytes'
dequantize_4bit (with and without double quantization; outputs compared bit for bit), and a one-token
GEMV (fused dequant + matmul) against bitsandbytes' inference path.

    python bench/qlora.py                     # on a GPU, with bitsandbytes and peft installed
    python bench/qlora.py --tiny --device cpu # smoke test of this script (tiny model, no timings worth reading)
    python bench/qlora.py --check             # numerics: merged vs unmerged vs reference path, 50-step losses
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import warnings

import torch
from common import build_llama

warnings.filterwarnings("ignore")

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "head_dim": 128,
                  "rope_theta": 500000.0},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "head_dim": 32},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, device: str):
    model = build_llama(SHAPES[shape], device, tie_word_embeddings=False)
    model.config.use_cache = False
    return model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(model, batch, steps, warmup, device, graphed: bool = False) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda", capturable=graphed)
    losses = []

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if graphed:  # the whole step as one CUDA graph after warm-up (bench/graphed_step.py)
        from graphed_step import GraphedTrainStep

        graphed_step = GraphedTrainStep(lambda b: model(input_ids=b["ids"], labels=b["ids"]).loss, opt,
                                        warmup=max(1, warmup - 1))
        step = lambda: losses.append(graphed_step({"ids": batch}).clone())

    free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    trainable = sum(p.numel() for p in params)
    return {"tok_s": batch.numel() / statistics.median(times), "peak_gib": peak, "step_s": statistics.median(times),
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]), "trainable": trainable,
            "adapter_dtype": str(params[0].dtype).removeprefix("torch.")}


# ------------------------------------------------------------------------------------------ setups
def bnb_quantize(model, device, bits: int = 4):
    """What transformers' BitsAndBytesConfig builds: load_in_4bit (nf4, double quant, bf16 compute), or
    load_in_8bit (Linear8bitLt, int8 weights, no outlier threshold as PEFT's docs use for training)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and child_name != "lm_head":
                if bits == 8:
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=0.0, device="meta")
                    q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False,
                                                 has_fp16_weights=False).to(device)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, blocksize=64).to(device)
                setattr(module, child_name, q)
    if bits == 8:
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return model


def setup_peft(model, device, recipe: bool, bits: int = 4):
    import peft

    bnb_quantize(model, device, bits)
    if recipe:  # PEFT's documented QLoRA recipe: upcasts all non-4-bit params to fp32, fp32 adapters
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        kwargs = {}
    else:  # the fastest PEFT setting: bf16 everywhere, bf16 adapters
        model.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        kwargs = {"autocast_adapter_dtype": False}
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg, **kwargs)
    if not recipe:  # over a uint8 4-bit weight PEFT keeps fp32 adapters whatever the flag: cast them
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    return model


def setup_peft_liger(model, device):
    """PEFT + bitsandbytes with the same liger kernels lorakit.fast applies: where the fused loss comes from."""
    import lorakit.fast

    lorakit.fast.speed_up_base(model)
    return setup_peft(model, device, recipe=False)


def setup_lorakit(model, device, adapter_dtype, fast: bool, bits: int = 4, keep: bool = True):
    import lorakit as lk

    lk.quantize_model(model, bits=bits, compute_dtype=torch.bfloat16)
    lk.prepare_for_kbit_training(model)  # checkpointing with lk.checkpoint_kwargs(): recomputation keeps weights
    if not keep:  # A/B: plain non-reentrant checkpointing, every weight dequantized three times per step
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fast:
        import lorakit.fast

        lorakit.fast.speed_up_base(model)
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS, dtype=adapter_dtype))
    return model


# ------------------------------------------------------------------------------------------ kernels
def kernel_bench(device, out_rows: list, results: dict) -> None:
    import bitsandbytes.functional as F
    import triton.testing

    from lorakit.quant import nf4
    from lorakit.quant import triton_kernels as tk

    def ms(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    torch.manual_seed(0)
    w = (torch.randn(4096, 14336, device=device) * 0.02).to(torch.bfloat16)
    n = w.numel()
    for nested in (True, False):
        pb, sb = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        pl, sl = nf4.quantize_4bit(w, 64, "nf4", nested)
        same_codes = torch.equal(pb, pl) and torch.equal(sb.absmax, sl.absmax)
        ref = F.dequantize_4bit(pb, sb)
        ours = tk.dequantize_4bit_triton(pl, sl, torch.bfloat16)
        identical = torch.equal(ref.view(torch.int16), ours.view(torch.int16))
        out = torch.empty_like(ref)
        t_bnb = ms(lambda pb=pb, sb=sb: F.dequantize_4bit(pb, sb))
        t_lk = ms(lambda pl=pl, sl=sl, out=out: tk.dequantize_4bit_triton(pl, sl, torch.bfloat16, out=out))
        t_ref = ms(lambda pl=pl, sl=sl: nf4.dequantize_4bit(pl, sl, torch.bfloat16))
        moved = n / 2 + n * 2 + sl.nbytes  # packed codes read, bf16 written, state read
        sweep = {"default": t_lk}
        for rows in ((8, 32, 64) if nested else ()):
            for warps in (4, 8):
                sweep[f"rows{rows}_w{warps}"] = ms(lambda pl=pl, sl=sl, out=out, rows=rows, warps=warps: (
                    tk.dequantize_4bit_triton(pl, sl, torch.bfloat16, out=out, rows=rows, num_warps=warps)))
        best = min(sweep, key=sweep.get)
        tag = "double quant" if nested else "no double quant"
        results[f"dequant_{tag}"] = {"bnb_ms": t_bnb, "lorakit_ms": t_lk, "torch_reference_ms": t_ref,
                                     "bit_identical_to_bnb": identical, "same_packed_state_as_bnb": same_codes,
                                     "sweep_ms": sweep, "best": best}
        out_rows.append((f"dequant 4096x14336 nf4, {tag}", f"{t_bnb * 1e3:.1f} us", f"{t_lk * 1e3:.1f} us",
                         f"{t_bnb / t_lk:.2f}x", (f"{moved / t_lk / 1e6:.0f} GB/s; bits equal: {identical}; "
                                                  f"best tile {best} {sweep[best] * 1e3:.1f} us")))
    # dequantization plus the rank-16 update in one pass (the merged QLoRA path) against dequantization alone
    pl, sl = nf4.quantize_4bit(w, 64, "nf4", True)
    A = (torch.randn(16, 14336, device=device) * 0.01).to(torch.bfloat16)
    B = (torch.randn(4096, 16, device=device) * 0.01).to(torch.bfloat16)
    t_plain = ms(lambda: tk.dequantize_4bit_triton(pl, sl, torch.bfloat16))
    t_two = ms(lambda: torch.addmm(tk.dequantize_4bit_triton(pl, sl, torch.bfloat16), B, A, alpha=2.0))
    sweep = {}
    for bn in (16, 32, 64):
        for bk in (64, 128, 256):
            for warps in (2, 4):
                sweep[f"n{bn}_k{bk}_w{warps}"] = ms(lambda bn=bn, bk=bk, warps=warps: (
                    tk.dequantize_4bit_lowrank_triton(pl, sl, A, B, 2.0, torch.bfloat16, block_n=bn, tile_k=bk,
                                                      num_warps=warps)))
    t_low = ms(lambda: tk.dequantize_4bit_lowrank_triton(pl, sl, A, B, 2.0, torch.bfloat16))
    best = min(sweep, key=sweep.get)
    ref = nf4.dequantize_4bit_lowrank(pl, sl, A, B, 2.0, torch.bfloat16)
    ulps = int((tk.dequantize_4bit_lowrank_triton(pl, sl, A, B, 2.0, torch.bfloat16).view(torch.int16).int()
                - ref.view(torch.int16).int()).abs().max())
    results["dequant_lowrank"] = {"lorakit_ms": t_low, "dequant_only_ms": t_plain, "dequant_then_addmm_ms": t_two,
                                  "sweep_ms": sweep, "best": best, "max_ulps_vs_reference": ulps}
    out_rows.append(("dequant + s*B@A (r=16), 4096x14336", f"{t_two * 1e3:.1f} us", f"{t_low * 1e3:.1f} us",
                     f"{t_two / t_low:.2f}x", (f"bnb column: lorakit dequant then addmm; dequant alone "
                                              f"{t_plain * 1e3:.1f} us; max {ulps} ulp vs reference; best tile "
                                              f"{best} {sweep[best] * 1e3:.1f} us")))
    # one-token GEMV: y = x @ W.T with W (4096, 14336) in 4 bits
    import bitsandbytes as bnb

    pb, sb = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    pl, sl = nf4.quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(1, 14336, device=device).to(torch.bfloat16)
    t_bnb = ms(lambda: bnb.matmul_4bit(x, pb.t(), quant_state=sb))
    t_lk = ms(lambda: tk.gemv_4bit_triton(x, pl, sl))
    t_deq = ms(lambda: torch.nn.functional.linear(x, tk.dequantize_4bit_triton(pl, sl, torch.bfloat16)))
    exact = x.double() @ nf4.dequantize_4bit(pl, sl, torch.bfloat16).double().T
    err = float((tk.gemv_4bit_triton(x, pl, sl).double() - exact).norm() / exact.norm())
    err_bnb = float((bnb.matmul_4bit(x, pb.t(), quant_state=sb).double() - exact).norm() / exact.norm())
    results["gemv_1x14336x4096"] = {"bnb_ms": t_bnb, "lorakit_ms": t_lk, "lorakit_dequant_then_matmul_ms": t_deq,
                                    "rel_err_lorakit": err, "rel_err_bnb": err_bnb}
    out_rows.append(("GEMV 1 token, 4096x14336 nf4", f"{t_bnb * 1e3:.1f} us", f"{t_lk * 1e3:.1f} us",
                     f"{t_bnb / t_lk:.2f}x", (f"dequant+matmul {t_deq * 1e3:.1f} us; rel err {err:.1e} "
                                              f"(bnb {err_bnb:.1e})")))


def _codes_with_absmax_one(values, quant_type, quantize):
    """4-bit codes of ``values`` (fp32, |v| <= 1), each block led by a 1.0 so that absmax is exactly 1."""
    from lorakit.quant import nf4

    n = values.numel()
    pad = -n % 63
    v = torch.cat([values, values.new_zeros(pad)]).view(-1, 63)
    blocks = torch.cat([torch.ones(v.shape[0], 1, device=v.device), v], 1).reshape(-1)
    packed = quantize(blocks, quant_type)
    return nf4.unpack_nibbles(packed).view(-1, 64)[:, 1:].reshape(-1)[:n]


def format_probe(device, results: dict) -> None:
    """Find bitsandbytes' exact decision boundaries (to the last float) and compare lorakit's codes with them."""
    import bitsandbytes.functional as F

    from lorakit.quant import nf4

    def bnb(x, qt):
        return F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=False)[0]

    def ours(x, qt):
        return nf4.quantize_4bit(x, 64, qt, False)[0]

    for qt in ("nf4", "fp4"):
        grid = torch.linspace(-1, 1, 63 * 8192, device=device)
        cb = _codes_with_absmax_one(grid, qt, bnb)
        change = (cb[1:] != cb[:-1]).nonzero().flatten()
        bounds = []
        for i in change.tolist():
            lo, hi = grid[i], grid[i + 1]
            if lo * hi <= 0:
                bounds.append({"between": [float(lo), float(hi)], "codes": [int(cb[i]), int(cb[i + 1])]})
                continue
            a, b = lo.abs().view(torch.int32), hi.abs().view(torch.int32)
            start, stop = int(torch.minimum(a, b)), int(torch.maximum(a, b))
            mags = torch.arange(start, stop + 1, device=device, dtype=torch.int32).view(torch.float32)
            cand = mags if lo > 0 else -mags.flip(0)
            cc = _codes_with_absmax_one(cand, qt, bnb)
            j = int((cc[1:] != cc[:-1]).nonzero().flatten()[0])
            bounds.append({"last_lower": repr(float(cand[j])), "first_upper": repr(float(cand[j + 1])),
                           "codes": [int(cc[j]), int(cc[j + 1])]})
        rng = torch.randn(1 << 22, generator=torch.Generator().manual_seed(5)).clamp(-1, 1).to(device)
        fine = torch.cat([grid, rng])
        mismatch = _codes_with_absmax_one(fine, qt, bnb) != _codes_with_absmax_one(fine, qt, ours)
        bad = fine[mismatch][:8]
        examples = [] if not bad.numel() else [(repr(float(v)), int(a), int(b)) for v, a, b in zip(
            bad, _codes_with_absmax_one(bad, qt, bnb), _codes_with_absmax_one(bad, qt, ours))]
        results[f"probe_{qt}"] = {"bnb_boundaries": bounds, "mismatches": int(mismatch.sum()),
                                  "of": fine.numel(), "examples (value, bnb, lorakit)": examples}
        print(f"probe {qt}: {int(mismatch.sum())} of {fine.numel()} codes differ from bitsandbytes; examples "
              f"{examples[:4]}; bnb boundaries {bounds}", flush=True)


def gemv_sweep(device, results: dict) -> None:
    import triton.testing

    from lorakit.quant import nf4
    from lorakit.quant import triton_kernels as tk

    w = (torch.randn(4096, 14336, device=device) * 0.02).to(torch.bfloat16)
    pl, sl = nf4.quantize_4bit(w, 64, "nf4", True)
    x = torch.randn(1, 14336, device=device).to(torch.bfloat16)
    sweep = {}
    for bn, bk, nw in [(4, 512, 4), (8, 256, 4), (2, 1024, 4), (8, 512, 8), (16, 256, 4), (1, 2048, 4)]:
        sweep[f"n{bn}_k{bk}_w{nw}"] = triton.testing.do_bench(
            lambda bn=bn, bk=bk, nw=nw: tk.gemv_4bit_triton(x, pl, sl, block_n=bn, block_k=bk, num_warps=nw),
            warmup=25, rep=100,
            return_mode="median")
    results["gemv_sweep_ms"] = sweep
    print("gemv sweep (ms):", sweep, flush=True)


# ------------------------------------------------------------------------------------------ main
def numerics_check(device: str, shape: str, steps: int = 50) -> None:
    """The merged packed path against the unmerged fused op and against the reference path (base(x) + s*B(A(x))
    through autograd), from the same weights, adapter init and batches: loss curves over ``steps`` AdamW steps
    (lr 1e-3, so the adapters move well away from B = 0). The unmerged-vs-reference gap is the yardstick of bf16
    noise between two exact formulations."""
    import lorakit as lk
    from lorakit.kernels import lora_linear as lora_kernel

    small = {**SHAPES[shape], "num_hidden_layers": min(4, SHAPES[shape]["num_hidden_layers"])}
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, small["vocab_size"], (2, 512 if device == "cuda" else 32), generator=g).to(device)
               for _ in range(4)]
    curves = {}
    for mode in ("merged", "unmerged", "reference"):
        model = build_llama(small, device, tie_word_embeddings=False)
        model.config.use_cache = False
        lk.quantize_model(model, compute_dtype=torch.bfloat16)
        lk.prepare_for_kbit_training(model)
        torch.manual_seed(1)
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, target_modules=TARGETS, dtype=torch.bfloat16))
        for _, layer in lk.lora_layers(model):
            layer.use_fused_kernel = mode != "reference"
        lora_kernel.MERGE_PACKED = mode == "merged"
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for i in range(steps):
            batch = batches[i % len(batches)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        curves[mode] = losses
        model = None
        free(device)
    lora_kernel.MERGE_PACKED = True
    gap = lambda a, b: max(abs(x - y) for x, y in zip(curves[a], curves[b]))
    print(f"numerics check: {small['num_hidden_layers']}-layer {shape} shape, NF4, bf16, {steps} steps, lr 1e-3")
    for mode, losses in curves.items():
        print(f"  {mode:<9}", " ".join(f"{x:.4f}" for x in losses[::10] + [losses[-1]]))
    print(f"  max |loss merged - unmerged| {gap('merged', 'unmerged'):.2e}; "
          f"max |loss unmerged - reference| {gap('unmerged', 'reference'):.2e} (bf16 noise between exact forms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="", help="comma list: probe,kernels,peft_recipe,peft_bf16,lorakit,"
                        "lorakit_unmerged,lorakit_nokeep,lorakit_fp32,lorakit_fast,peft_liger,peft_bf16_graph,lorakit_graph,peft_int8,lorakit_int8")
    parser.add_argument("--check", action="store_true", help="only the numerics check (merged vs unmerged vs "
                        "reference loss curves over 50 steps)")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "qlora_bench.json"))
    args = parser.parse_args()
    device, shape = args.device, "tiny" if args.tiny else "llama3-8b"
    seq = 64 if args.tiny else args.seq
    only = set(filter(None, args.only.split(",")))
    want = lambda k: not only or k in only
    if args.check:
        numerics_check(device, shape)
        return

    import bitsandbytes
    import peft
    import transformers

    import lorakit
    from lorakit.kernels import lora_linear as lora_kernel

    results: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda"
                     else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "shape": shape,
                     "batch": [args.batch, seq]}
    kernel_rows: list = []
    if device == "cuda" and want("probe"):
        for fn in (format_probe, gemv_sweep):
            try:
                fn(device, results)
            except Exception as exc:  # noqa: BLE001
                results[f"{fn.__name__}_error"] = repr(exc)
                print(fn.__name__, "failed:", repr(exc), flush=True)
    if device == "cuda" and want("kernels"):
        try:
            kernel_bench(device, kernel_rows, results)
        except Exception as exc:  # keep the training rows even if a kernel row breaks  # noqa: BLE001
            results["kernel_error"] = repr(exc)
            print("kernel bench failed:", repr(exc), flush=True)
        free(device)

    setups = [
        ("peft_recipe", "PEFT + bnb, prepare_model_for_kbit_training (fp32 adapters)",
         lambda m: setup_peft(m, device, recipe=True)),
        ("peft_bf16", "PEFT + bnb, bf16 adapters", lambda m: setup_peft(m, device, recipe=False)),
        ("lorakit", "lorakit QLoRA, bf16 adapters", lambda m: setup_lorakit(m, device, torch.bfloat16, False)),
        ("lorakit_unmerged", "lorakit QLoRA, bf16 adapters, update kept apart (A/B)",
         lambda m: setup_lorakit(m, device, torch.bfloat16, False)),
        ("lorakit_nokeep", "lorakit QLoRA, bf16 adapters, plain checkpointing (A/B)",
         lambda m: setup_lorakit(m, device, torch.bfloat16, False, keep=False)),
        ("lorakit_fp32", "lorakit QLoRA, fp32 adapters", lambda m: setup_lorakit(m, device, None, False)),
        ("lorakit_fast", "lorakit QLoRA, bf16 adapters + lorakit.fast (liger)",
         lambda m: setup_lorakit(m, device, torch.bfloat16, True)),
        ("peft_liger", "PEFT + bnb, bf16 adapters + the same liger kernels", lambda m: setup_peft_liger(m, device)),
        ("peft_bf16_graph", "PEFT + bnb, bf16 adapters, CUDA graph", lambda m: setup_peft(m, device, recipe=False)),
        ("lorakit_graph", "lorakit QLoRA, bf16 adapters, CUDA graph",
         lambda m: setup_lorakit(m, device, torch.bfloat16, False)),
        ("peft_int8", "PEFT + bnb 8-bit base (Linear8bitLt), bf16 adapters",
         lambda m: setup_peft(m, device, recipe=False, bits=8)),
        ("lorakit_int8", "lorakit 8-bit base (Linear8bit), bf16 adapters",
         lambda m: setup_lorakit(m, device, torch.bfloat16, False, bits=8)),
    ]
    train: dict = {}
    batch = None
    for key, label, setup in setups:
        if not want(key) or (key in ("lorakit_fast", "peft_liger") or key.endswith("_graph")) and device != "cuda":
            continue
        try:
            model = build(shape, device)
            if batch is None:
                g = torch.Generator().manual_seed(1)
                batch = torch.randint(0, model.config.vocab_size, (args.batch, seq), generator=g).to(device)
            model = setup(model)
            lora_kernel.MERGE_PACKED = key != "lorakit_unmerged"
            train[label] = measure(model, batch, args.steps, args.warmup, device, graphed=key.endswith("_graph"))
            if key.startswith("lorakit"):
                train[label]["memory_report_mib"] = {
                    k: v / 2**20 for k, v in vars(lorakit.memory_report(model)).items() if isinstance(v, int)}
            print(label, train[label], flush=True)
        except Exception as exc:  # noqa: BLE001
            train[label] = {"error": repr(exc)}
            print(label, "failed:", repr(exc), flush=True)
        model = None
        free(device)
    results["train"] = train
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

    print(f"\n{shape} shape, NF4 + double quant, bf16 compute, batch {args.batch} x {seq}, gradient checkpointing, "
          f"r=16 on 7 projections; {results['device']}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; "
          f"{results['date']}")
    ok = {k: v for k, v in train.items() if "tok_s" in v}
    best_peft = max((v["tok_s"] for k, v in ok.items() if k.startswith("PEFT") and "liger" not in k
                     and "8-bit" not in k and "graph" not in k), default=None)
    print(f"| {'setup':<58} | {'tokens/s':>8} | {'peak GiB':>8} | {'/ PEFT+bnb':>11} | {'loss first -> last':>18} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 20}|")
    for label, r in train.items():
        if "tok_s" not in r:
            print(f"| {label:<58} | failed: {r['error'][:60]}")
            continue
        ratio = f"{r['tok_s'] / best_peft:.2f}x" if best_peft else "-"
        print(f"| {label:<58} | {r['tok_s'] / 1e3:>7.2f}k | {r['peak_gib']:>8.2f} | {ratio:>11} | "
              f"{r['loss_first']:>8.3f} -> {r['loss_last']:.3f} |")
    if kernel_rows:
        print(f"\n| {'kernel':<34} | {'bitsandbytes':>12} | {'lorakit':>9} | {'speed-up':>8} | notes")
        print(f"|{'-' * 36}|{'-' * 14}|{'-' * 11}|{'-' * 10}|------")
        for row in kernel_rows:
            print(f"| {row[0]:<34} | {row[1]:>12} | {row[2]:>9} | {row[3]:>8} | {row[4]}")


if __name__ == "__main__":
    main()
