"""Load (or build) the model and tokenizer a run needs and turn it into what the method trains.

This is the only train module that knows Hugging Face conventions: config.json ``architectures`` for the
task, ``max_position_embeddings`` for the length limit, the classifier head's name for modules_to_save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LoraError
from ..kernels.lora_linear import checkpoint_kwargs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_NAMES = ("classifier", "score", "classification_head")
"""Child modules that hold a sequence classifier's output head (BERT-likes, Llama/GPT-2-likes, RoBERTa)."""

# Random-weight shapes for benchmarks and tests: {name: (family, config kwargs)}.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("llama", {  # Llama-3.2-1B's shape: 1.24B parameters
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
    "smollm2-135m": ("llama", {  # SmolLM2-135M's shape: 135M parameters
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "tie_word_embeddings": True}),
    "llama-tiny": ("llama", {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}),
    "gpt2-tiny": ("gpt2", {"vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}),
    "bert-tiny": ("bert", {
        "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 512, "num_labels": 2}),
}


@dataclass
class Loaded:
    """A model ready for a method, with what the data and loop need to know about it."""

    model: nn.Module
    tokenizer: Any | None
    task: str
    head: str | None = None
    notes: tuple[str, ...] = ()
    quantized: bool = False
    """True when the Linear layers were loaded straight into 4 bits (QLoRA from a causal-LM folder)."""


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available (use --device cpu)")
    return device


def read_model_config(model_dir: str) -> dict[str, Any]:
    path = Path(model_dir)
    if not path.exists():
        raise ConfigError(f"model directory {model_dir!r} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{model_dir!r} is not a Hugging Face model folder: no config.json in it")
    try:
        return json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{model_dir}/config.json is not valid JSON: {err}") from None


def infer_task(requested: str, config: dict[str, Any], where: str) -> str:
    """'causal-lm' or 'classification', from --task or the config's architectures."""
    if requested != "auto":
        return requested
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    raise ConfigError(f"cannot tell the task of {where} from its architectures {archs}; "
                      "pass --task causal-lm or --task classification")


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no limit recorded)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"no usable tokenizer in {directory!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer in {directory!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def preset_config(name: str, task: str, num_labels: int | None = None):
    """A transformers config object for a named preset shape."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if name not in PRESETS:
        raise ConfigError(f"unknown --model-config {name!r}; presets: {', '.join(PRESETS)}")
    family, kwargs = PRESETS[name]
    kwargs = dict(kwargs)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    cls = {"llama": LlamaConfig, "gpt2": GPT2Config, "bert": BertConfig}[family]
    config = cls(**kwargs)
    if task == "auto":
        task = "classification" if family == "bert" else "causal-lm"
    return config, task


def load_model(cfg, task: str, tokenizer=None, num_labels: int | None = None,
               label_names: list[str] | None = None, device: torch.device | None = None) -> Loaded:
    """The model (from --model or --model-config) on ``device`` in cfg.dtype.

    Seeded from cfg.seed first, so a fresh classifier head or a random preset is the same on every rerun.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch_dtype(cfg.dtype)
    notes = []
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    torch.manual_seed(cfg.seed)
    if cfg.model_config:
        config, _ = preset_config(cfg.model_config, task, num_labels)
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {n: i for i, n in enumerate(label_names)}
        with torch.device(device or "cpu"):
            model = auto.from_config(config, dtype=dtype)
        notes.append(f"random weights: preset {cfg.model_config}")
    elif cfg.method == "qlora" and task == "causal-lm":
        # stream the checkpoint into 4 (8) bits: the full-precision model never exists, on the CPU or the GPU
        try:
            model = import_quant().load_quantized_named(cfg.model, cfg.quant_type, dtype, device or "cpu",
                                                        cfg.double_quant)
        except LoraError as err:
            bits = 8 if cfg.quant_type == "int8" else 4
            raise ConfigError(f"cannot load {cfg.model!r} in {bits} bits: {err}") from None
        return _finish(model, tokenizer, task, notes, quantized=True)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if task == "classification" and num_labels is not None:
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
            if label_names:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
        try:
            model = auto.from_pretrained(cfg.model, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"cannot load a {task} model from {cfg.model!r}: {first}") from None
        if device is not None and cfg.method != "qlora":  # qlora: quantize_model moves it layer by layer
            model.to(device)
    return _finish(model, tokenizer, task, notes)


def _finish(model, tokenizer, task: str, notes: list[str], quantized: bool = False) -> Loaded:
    if tokenizer is not None:
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ConfigError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}"
            )
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    head = None
    if task == "classification":
        head = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
        model.config.problem_type = "single_label_classification"
    return Loaded(model=model, tokenizer=tokenizer, task=task, head=head, notes=tuple(notes),
                  quantized=quantized)


def apply_method(loaded: Loaded, cfg, device: torch.device):
    """Make the model trainable the way cfg.method says (in place; ``loaded.model`` is replaced for
    peft-lora, whose wrapper is a new module). Returns a lorakit Summary of trainable parameters."""
    import lorakit

    model = loaded.model
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return lorakit.summary(model)
    if cfg.method == "peft-lora":
        return _apply_peft(loaded, cfg)
    if cfg.method == "prefix":
        if loaded.task != "causal-lm":
            raise ConfigError("--method prefix works with causal language models only")
        torch.manual_seed(cfg.seed + 1)
        return lorakit.add_prefix(model, lorakit.PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                                              projection=cfg.prefix_projection))
    if cfg.method == "qlora":
        qlora = import_quant()
        compute = torch.float32 if cfg.dtype == "fp32" else torch_dtype(cfg.dtype)
        if not loaded.quantized and cfg.quant_type == "int8":
            qlora.quantize_model(model, bits=8, compute_dtype=compute, device=device)
        elif not loaded.quantized:
            qlora.quantize_model(model, bits=4, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                                 compute_dtype=compute, device=device)
        # gradient checkpointing stays the user's choice (--gradient-checkpointing), as for lora and full,
        # so that compare measures the same recipe for every method
        qlora.prepare_for_kbit_training(model, gradient_checkpointing=cfg.gradient_checkpointing)
    lora = lorakit.LoraConfig(
        r=cfg.r,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=cfg.targets(),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init=cfg.init,
        modules_to_save=(loaded.head,) if loaded.head else (),
        dtype=torch.float32,
    )
    torch.manual_seed(cfg.seed + 1)
    return lorakit.inject(model, lora)


def _apply_peft(loaded: Loaded, cfg):
    """The same adapter through Hugging Face PEFT: the reference ``lorakit compare`` measures against."""
    import lorakit

    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("--method peft-lora needs the peft package (pip install peft)") from None
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets(),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init == "kaiming" else cfg.init,
        modules_to_save=[loaded.head] if loaded.head else None,
        task_type="SEQ_CLS" if loaded.task == "classification" else "CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed + 1)
    loaded.model = get_peft_model(loaded.model, peft_cfg)
    return lorakit.summary(loaded.model)


def import_quant() -> SimpleNamespace:
    """lorakit's QLoRA functions (quantize_model, prepare_for_kbit_training, load_quantized_named), or a
    ConfigError saying QLoRA is unavailable in this install."""
    try:
        from ..qlora import prepare_for_kbit_training, quantize_model
        from ..quant_loading import load_quantized_named
    except ImportError as err:
        raise ConfigError(f"--method qlora needs lorakit.qlora, which is not available here ({err})") from None
    return SimpleNamespace(quantize_model=quantize_model, prepare_for_kbit_training=prepare_for_kbit_training,
                           load_quantized_named=load_quantized_named)


def qlora_available() -> bool:
    try:
        import_quant()
        return True
    except ConfigError:
        return False


def enable_gradient_checkpointing(model: nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(
            "--gradient-checkpointing needs a Hugging Face model (gradient_checkpointing_enable)"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs())
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


__all__ = [
    "PRESETS",
    "Loaded",
    "apply_method",
    "infer_task",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "preset_config",
    "qlora_available",
    "resolve_device",
    "torch_dtype",
]
