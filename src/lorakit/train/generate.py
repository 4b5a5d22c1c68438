"""``lorakit generate``: one base model in memory, several adapters, switched between prompts in place.

Adapters are loaded once under their own names; each generation only changes which adapter is active
(``lorakit.set_active_adapters``) or disables them all (``lorakit.disable_adapters``) — the base weights are
never reloaded or copied.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from .export import adapter_task, base_quantization, check_adapter_dir
from .modeling import DTYPES, infer_task, load_tokenizer, read_model_config, resolve_device


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """``[NAME=]DIR`` specs -> unique (name, folder); the name defaults to the folder's name."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or not name:
            name, path = "", spec
        folder = check_adapter_dir(path)
        if not name:
            name = folder.name if folder.name != "adapter" else folder.resolve().parent.name
        name = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "adapter"
        base, k = name, 2
        while any(name == n for n, _ in out):
            name, k = f"{base}_{k}", k + 1
        out.append((name, folder))
    return out


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts file {args.prompts_file!r} does not exist")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def generate_one(model, tokenizer, prompt: str, args) -> tuple[str, int, float]:
    """(completion text, new tokens, seconds) for one prompt with whatever adapters are active."""
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: the tokenizer has no chat_template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    sample = args.temperature > 0
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
        torch.manual_seed(args.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()), seconds


def generate_command(args) -> int:
    from transformers import AutoModelForCausalLM

    import lorakit

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompts = read_prompts(args)
    adapters = parse_adapters(args.adapter)
    raw = read_model_config(args.model)
    task = (
        infer_task("auto", raw, args.model) if not adapters else adapter_task(args.model, adapters[0][1])[0]
    )
    if task != "causal-lm":
        raise ConfigError(f"generate needs a causal language model; {args.model!r} is a {task} model")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    quantize, double_quant = base_quantization(getattr(args, "quantize", "none"),
                                               adapters[0][1] if adapters else None)
    dtype = DTYPES[args.dtype]
    try:
        if quantize == "none":
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        else:  # the base streamed into 4/8 bits, as QLoRA trained on it
            from ..quant_loading import load_quantized_named

            model = load_quantized_named(args.model, quantize, dtype, device, double_quant)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"cannot load a causal LM from {args.model!r}: {str(err).splitlines()[0]}"
        ) from None
    model.eval()
    for name, folder in adapters:
        lorakit.load_adapter(model, folder, name=name)

    runs: list[tuple[str, object]] = []
    if not adapters or args.base:
        runs.append(("base", None))
    runs += [(name, name) for name, _ in adapters]
    if args.combine and len(adapters) > 1:
        runs.append(("+".join(n for n, _ in adapters), [n for n, _ in adapters]))

    for i, prompt in enumerate(prompts, 1):
        for label, active in runs:
            if active is None:
                ctx = lorakit.disable_adapters(model) if adapters else contextlib.nullcontext()
            else:
                lorakit.set_active_adapters(model, active)
                ctx = contextlib.nullcontext()
            with ctx:
                text, n_new, seconds = generate_one(model, tokenizer, prompt, args)
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "adapter": label,
                            "base": quantize,
                            "completion": text,
                            "new_tokens": n_new,
                            "seconds": round(seconds, 4),
                        }
                    ),
                    flush=True,
                )
            else:
                print(
                    f"=== prompt {i} | {label} | {n_new} tokens, {n_new / max(seconds, 1e-9):.1f} tok/s\n"
                    f"{prompt}\n--> {text}\n",
                    flush=True,
                )
    return 0


__all__ = ["generate_command", "generate_one", "parse_adapters", "read_prompts"]
