"""``lorakit merge``: a plain Hugging Face model folder with an adapter folded into its weights.

The result is an ordinary ``save_pretrained`` folder (config.json, model.safetensors, tokenizer files):
transformers loads it with no lorakit installed, and it computes what base + adapter computed (the merge
adds scale * B @ A in fp32 and rounds once to the saved dtype).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .config import QUANT_TYPES
from .modeling import DTYPES, infer_task, load_tokenizer, read_model_config

TRAIN_INFO = "lorakit_train.json"


def check_adapter_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"adapter folder {path!r} does not exist")
    if not (p / "adapter_config.json").is_file():
        raise ConfigError(f"{path!r} is not an adapter folder: no adapter_config.json in it")
    return p


def read_train_info(adapter_dir: Path) -> dict[str, Any]:
    """lorakit_train.json (task, label names) if the adapter was written by lorakit train, else {}."""
    path = adapter_dir / TRAIN_INFO
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


QUANTIZE_CHOICES = ("auto", "none", *QUANT_TYPES)


def base_quantization(choice: str, adapter_dir: Path | None) -> tuple[str, bool]:
    """(none | nf4 | fp4 | int8, double quantization) for the base an adapter runs on. "auto": what the base
    was stored in while ``lorakit train`` trained the adapter (lorakit_train.json: qlora -> its quant type),
    else none."""
    if choice not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {choice!r}")
    info = read_train_info(adapter_dir) if adapter_dir is not None else {}
    double_quant = info.get("double_quant")
    double_quant = True if double_quant is None else bool(double_quant)
    if choice != "auto":
        return choice, double_quant
    if info.get("method") != "qlora":
        return "none", double_quant
    return info.get("quantization") or "nf4", double_quant


def adapter_task(model_dir: str, adapter_dir: Path) -> tuple[str, list[str] | None]:
    """(task, label names) for the base model an adapter needs."""
    info = read_train_info(adapter_dir)
    raw = read_model_config(model_dir)
    if info.get("task"):
        return info["task"], info.get("label_names")
    peft_task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    if peft_task == "SEQ_CLS":
        return "classification", None
    if peft_task == "CAUSAL_LM":
        return "causal-lm", None
    return infer_task("auto", raw, model_dir), None


def load_base(model_dir: str, task: str, label_names: list[str] | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype}
    if task == "classification":
        auto = AutoModelForSequenceClassification
        if label_names:
            kwargs.update(num_labels=len(label_names), ignore_mismatched_sizes=True,
                          id2label=dict(enumerate(label_names)),
                          label2id={n: i for i, n in enumerate(label_names)})
    else:
        auto = AutoModelForCausalLM
    try:
        return auto.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"cannot load a {task} model from {model_dir!r}: {str(err).splitlines()[0]}"
        ) from None


def merged_model(model_dir: str, adapter_dir: str, dtype: str = "fp32", quantize: str = "none"):
    """(model with the adapter folded in and no lorakit module left, its task). Merges in fp32.

    With a packed base (``quantize`` nf4/fp4/int8, or "auto" for a QLoRA adapter of lorakit train) the adapter
    is folded into the *dequantized* weights, D(Q(W0)) + s·B·A: the 16-bit model then computes what the adapter
    was trained on, not W0 + s·B·A."""
    import lorakit

    adapter = check_adapter_dir(adapter_dir)
    if _peft_type(adapter) == "PREFIX_TUNING":
        raise ConfigError("a prefix-tuning adapter lives in the attention cache, not in the weights: it cannot be "
                          "merged; use it with `lorakit generate --adapter`")
    task, labels = adapter_task(model_dir, adapter)
    storage, double_quant = base_quantization(quantize, adapter)
    if storage != "none" and task != "causal-lm":
        if quantize != "auto":
            raise ConfigError(f"--quantize {quantize} merges causal LMs; this adapter is for a {task} model")
        storage = "none"
    if storage == "none":
        model = load_base(model_dir, task, labels, torch.float32)
        lorakit.load_adapter(model, adapter, dtype=torch.float32)
        lorakit.unload(model, merge_adapters=True)
    else:
        from ..quant_loading import load_quantized_named

        model = load_quantized_named(model_dir, storage, torch.float32, "cpu", double_quant)
        lorakit.load_adapter(model, adapter, dtype=torch.float32)
        lorakit.merge_to_dense(model, torch.float32)
        model.lorakit_merged_over = storage  # for the merge command's message
    model.to(DTYPES[dtype])
    model.eval()
    return model, task


def merge_command(args) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ConfigError(f"--out {args.out!r} exists and is not empty; pick another folder or pass --force")
    model, task = merged_model(args.model, args.adapter, args.dtype, getattr(args, "quantize", "none"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            load_tokenizer(args.model).save_pretrained(tmp)
        except ConfigError:
            pass  # a model folder without a tokenizer: the merged folder has none either
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"merged {args.adapter} into {args.model}{_over(model)} ({task}, {args.dtype}): {out} "
        f"({size / 1e6:.1f} MB safetensors; loads with transformers alone)"
    )
    return 0


__all__ = [
    "QUANTIZE_CHOICES",
    "adapter_task",
    "base_quantization",
    "check_adapter_dir",
    "load_base",
    "merge_command",
    "merged_model",
    "read_train_info",
]


def _over(model) -> str:
    storage = getattr(model, "lorakit_merged_over", None)
    return f" (its {storage} weights, dequantized, as the adapter was trained on)" if storage else ""


def _peft_type(adapter: Path) -> str | None:
    """peft_type of an adapter folder's adapter_config.json (None when it cannot be read)."""
    try:
        data = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("peft_type") if isinstance(data, dict) else None
