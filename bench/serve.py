"""Serving many adapters: Hugging Face generate (base, merged, PEFT unmerged, PEFT mixed batch) vs lorakit serve.

One process, one model shape with random bf16 weights built from a config (no download), 64 requests of a
128-token random prompt, 128 generated tokens each, greedy, end of sequence ignored (every request makes
exactly 128 tokens). For each setup: output tokens/s (64 x 128 over the wall time of the whole batch, prefill
included) and p99 request latency (submission of all 64 at t=0 to each request's last token).

    HF base          model.generate on the plain model
    HF merged        one adapter folded into the weights (lorakit.merge): the ceiling for one adapter
    PEFT unmerged    PeftModel with one active adapter
    PEFT mixed       PeftModel, 32 adapters, adapter_names=[row i -> adapter i % 32]; measured over
                     --peft-mixed-tokens tokens only (it is ~50x slower); tokens/s of that shorter run
    lorakit base     lorakit.serve.Engine (own decode loop, static KV cache, CUDA graphs), no adapter
    lorakit 1        every request on the same adapter
    lorakit 32 mixed row i on adapter i % 32 (Triton BGMV); and the same with the torch gather path

The 32 adapters are saved by PEFT (save_pretrained) and served by lorakit from those folders. A parity line
compares lorakit's prefill logits with PEFT's mixed-batch forward for 8 rows on 8 adapters.

    python bench/serve.py                       # llama-1b shape on CUDA
    python bench/serve.py --shape tiny --device cpu --requests 8 --prompt 16 --gen 8 --adapters 4  # smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import build_llama

warnings.filterwarnings("ignore")

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, head_dim=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, device: str, dtype: torch.dtype):
    return build_llama(SHAPES[shape], device, dtype, eos_token_id=2, bos_token_id=1, pad_token_id=0).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hf_run(model, prompts: torch.Tensor, gen: int, device: str, **kwargs) -> dict:
    """One batched generate call: every request finishes when the batch does."""
    args = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, temperature=None, top_p=None,
                top_k=None, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    with torch.no_grad():
        model.generate(prompts, **args, **kwargs)  # warm-up: the same call (a short one left HF base cold)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(prompts, **args, **kwargs)
        sync(device)
    seconds = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + gen
    n = prompts.shape[0]
    return {"tok_s": n * gen / seconds, "p99": seconds, "p50": seconds, "gen": gen}


def engine_run(engine, prompts: list[list[int]], gen: int, adapters: list[str | None], device: str) -> dict:
    from lorakit.serve import SamplingParams

    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    engine.generate(prompts, params, adapters)  # warm-up: loads adapters, captures the CUDA graphs
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, adapters)
    seconds = time.perf_counter() - t0
    assert all(o.completion_tokens == gen for o in outs)
    lat = sorted(o.seconds for o in outs)
    return {"tok_s": len(prompts) * gen / seconds, "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "p50": statistics.median(lat), "gen": gen}


class _Printing(dict):
    """Prints each row as it is measured (a run cut short still shows what it got)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"  {key}: {value['tok_s']:.0f} tokens/s, p99 {value['p99']:.2f} s", flush=True)


def randomize_adapters(peft_model, names: list[str], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                std = p.shape[1] ** -0.5 if "lora_A" in name else 0.02  # A: unit-variance outputs; B: small
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--peft-mixed-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default="", help="comma list: hf,peft,lorakit,nf4 (default: all)")
    args = parser.parse_args()

    import peft
    import transformers

    import lorakit
    from lorakit.serve import Engine, EngineConfig, bgmv

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    only = set(filter(None, args.only.split(",")))
    base = build(args.shape, device, dtype)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (args.requests, args.prompt), generator=g)
    prompt_lists = prompts.tolist()
    prompts = prompts.to(device)
    names = [f"a{i}" for i in range(args.adapters)]
    rows = [names[i % args.adapters] for i in range(args.requests)]
    results: dict[str, dict] = _Printing()
    tmp = Path(tempfile.mkdtemp(prefix="lorakit_bench_serve_"))

    # ---- 32 adapters made and saved by PEFT (the folders lorakit serves)
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    randomize_adapters(pm, names)
    pm.save_pretrained(tmp / "adapters")
    pm.eval()
    t_setup = time.perf_counter()

    parity = None
    if not only or "lorakit" in only:
        config = EngineConfig(max_batch=args.requests, max_model_len=args.prompt + args.gen,
                              max_prefill_tokens=args.requests * args.prompt, max_adapters_gpu=args.adapters,
                              max_adapters_cpu=args.adapters, max_lora_rank=args.rank)
        triton_on = device == "cuda" and bgmv.triton_available()
        label = f"lorakit serve, {args.adapters} adapters mixed"
        with Engine(copy.deepcopy(base), None, tmp / "adapters", config, base_name="base") as engine:
            parity = check_parity(engine, pm, prompt_lists, names, device)
            print(f"parity, lorakit prefill vs PEFT mixed forward ({parity['rows']} rows, {parity['rows']} "
                  f"adapters): max |logit diff| {parity['max_diff']:.4f} (the adapters move logits by up to "
                  f"{parity['effect']:.3f}), same argmax {parity['argmax']}/{parity['rows']}", flush=True)
            results["lorakit serve, base model"] = engine_run(engine, prompt_lists, args.gen,
                                                              [None] * args.requests, device)
            results["lorakit serve, 1 adapter"] = engine_run(engine, prompt_lists, args.gen,
                                                             [names[0]] * args.requests, device)
            results[label + (" (Triton BGMV)" if triton_on else "")] = engine_run(engine, prompt_lists, args.gen,
                                                                                  rows, device)
        if triton_on:  # the same with the torch gather path, in a fresh engine (its own CUDA graphs)
            original = bgmv._use_triton
            bgmv._use_triton = lambda x: False
            try:
                with Engine(copy.deepcopy(base), None, tmp / "adapters", config, base_name="base") as engine:
                    results[label + " (torch gather + bmm)"] = engine_run(engine, prompt_lists, args.gen, rows,
                                                                          device)
            finally:
                bgmv._use_triton = original
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    if not only or "nf4" in only:  # QLoRA serving: the same adapters over the base in NF4 + double quant
        config = EngineConfig(max_batch=args.requests, max_model_len=args.prompt + args.gen,
                              max_prefill_tokens=args.requests * args.prompt, max_adapters_gpu=args.adapters,
                              max_adapters_cpu=args.adapters, max_lora_rank=args.rank)
        packed = copy.deepcopy(base)
        lorakit.quantize_model(packed, compute_dtype=dtype)  # in place (returns a report)
        with Engine(packed, None, tmp / "adapters", config, base_name="base") as engine:
            results["lorakit serve, NF4 base"] = engine_run(engine, prompt_lists, args.gen, [None] * args.requests,
                                                            device)
            results[f"lorakit serve, NF4 base, {args.adapters} adapters mixed"] = engine_run(
                engine, prompt_lists, args.gen, rows, device)
        del packed
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    if not only or "hf" in only:
        results["HF generate, base model"] = hf_run(base, prompts, args.gen, device)
        merged = copy.deepcopy(base)
        lorakit.load_adapter(merged, tmp / "adapters" / names[0])
        lorakit.merge(merged)
        results["HF generate, 1 adapter merged (ceiling)"] = hf_run(merged, prompts, args.gen, device)
        del merged
        gc.collect()
    if not only or "peft" in only:
        pm.set_adapter(names[0])
        results["PEFT, 1 adapter unmerged"] = hf_run(pm, prompts, args.gen, device)
        results[f"PEFT mixed batch, {args.adapters} adapters"] = hf_run(
            pm, prompts, args.peft_mixed_tokens, device, adapter_names=rows)

    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{args.shape} shape, {str(dtype).removeprefix('torch.')}, random weights, {args.requests} requests x "
          f"{args.prompt} prompt + {args.gen} generated tokens, greedy, r={args.rank} on 7 projections; {gpu}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{time.strftime('%Y-%m-%d')}")
    merged = results.get("HF generate, 1 adapter merged (ceiling)", {}).get("tok_s")
    mixed = results.get(f"PEFT mixed batch, {args.adapters} adapters", {}).get("tok_s")
    print(f"| {'setup':<52} | {'tokens/s':>9} | {'p50 s':>7} | {'p99 s':>7} | {'/ merged':>8} | {'/ PEFT mixed':>12} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 14}|")
    for label, r in results.items():
        note = f" ({r['gen']} tok)" if r["gen"] != args.gen else ""
        rel_m = f"{r['tok_s'] / merged:.2f}x" if merged else "-"
        rel_p = f"{r['tok_s'] / mixed:.1f}x" if mixed else "-"
        print(f"| {(label + note):<52} | {r['tok_s']:>9.0f} | {r['p50']:>7.2f} | {r['p99']:>7.2f} | {rel_m:>8} | "
              f"{rel_p:>12} |")
    print(f"(setup before timing: {time.perf_counter() - t_setup:.0f} s of runs after adapter creation)")


def check_parity(engine, pm, prompts: list[list[int]], names: list[str], device: str) -> dict:
    """lorakit's prefill logits vs PEFT's adapter_names forward, same prompts, one adapter per row."""
    k = min(8, len(names), len(prompts))
    slots = []
    for n in names[:k]:
        slot = None
        for _ in range(2000):
            slot = engine.adapters.acquire(n)
            if slot is not None:
                break
            engine.adapters.want(n)
            engine.adapters.unwant(n)
            time.sleep(0.005)
        slots.append(slot)
    # the scheduler is idle (no requests): using the decoder from this thread is safe here
    ours = engine.decoder.prefill(prompts[:k], list(range(k)), slots)
    for s in slots:
        engine.adapters.release(s)
    with torch.no_grad():
        ids = torch.tensor(prompts[:k], device=device)
        theirs = pm(input_ids=ids, adapter_names=names[:k]).logits[:, -1].float()
        with pm.disable_adapter():
            plain = pm(input_ids=ids).logits[:, -1].float()
    diff = (ours - theirs).abs().max().item()
    return {"rows": k, "max_diff": diff, "effect": (theirs - plain).abs().max().item(),
            "argmax": int((ours.argmax(-1) == theirs.argmax(-1)).sum())}


if __name__ == "__main__":
    main()
