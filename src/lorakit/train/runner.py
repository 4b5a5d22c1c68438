"""One training run end to end: config -> model + data -> loop -> files in output_dir.

output_dir after a run:
    train_config.toml   the resolved settings (``lorakit train --config`` reads it back)
    adapter/            PEFT-compatible adapter (lora, qlora) + lorakit_train.json (task, labels, base model)
    model/              the whole fine-tuned model, safetensors (full)
    metrics.jsonl       one line per logged step / evaluation
    loss.png            loss curve (when matplotlib is installed)
    summary.json        final numbers, data statistics, trainable parameters
    checkpoints/        resumable state (see checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..graphs import eager_calls, graph_layers, graphed_replays
from . import distributed
from .checkpoint import start_fresh
from .config import TrainConfig
from .data import DataBundle, build_data, synthetic_data
from .export import TRAIN_INFO
from .loop import train_loop
from .modeling import (
    apply_method,
    enable_gradient_checkpointing,
    infer_task,
    load_model,
    load_tokenizer,
    max_positions,
    preset_config,
    read_model_config,
    resolve_device,
)
from .report import atomic_write_text, current_memory_mb, dir_size_bytes, plot_losses

DEFAULT_SEQ_LEN = 2048
"""seq_len when none is given and the model allows more."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_task(cfg: TrainConfig) -> tuple[str, Any, dict | None]:
    """(task, a transformers config object, the raw config.json or None). Sets seq_len when it is 0 and
    checks it against the model's position limit."""
    from transformers import AutoConfig

    if cfg.model_config:
        hf, task = preset_config(cfg.model_config, cfg.task)
        raw = None
    else:
        raw = read_model_config(cfg.model)
        task = infer_task(cfg.task, raw, cfg.model)
        try:
            hf = AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"cannot read {cfg.model}/config.json: {str(err).splitlines()[0]}") from None
    limit = max_positions(hf)
    if cfg.seq_len == 0:
        cfg.seq_len = min(limit or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if limit is not None and cfg.seq_len > limit:
        raise ConfigError(f"seq_len {cfg.seq_len} is over the model's limit of {limit} positions "
                          "(max_position_embeddings in config.json); lower --seq-len")
    return task, hf, raw


def _model_label2id(raw: dict | None) -> dict[str, int] | None:
    if not raw or not raw.get("label2id"):
        return None
    mapping = {str(k): int(v) for k, v in raw["label2id"].items()}
    return None if all(k.startswith("LABEL_") for k in mapping) else mapping


def prepare_data(cfg: TrainConfig, tokenizer, task: str, hf_config, raw: dict | None) -> DataBundle:
    if not cfg.data:
        if not cfg.model_config or task != "causal-lm":
            raise ConfigError("no training data: give --data FILE")
        steps = cfg.max_steps or 1
        rows = cfg.batch_size * cfg.grad_accum * steps
        return synthetic_data(hf_config.vocab_size, cfg.seq_len, rows, 2 * cfg.batch_size, cfg.seed)
    if tokenizer is None:
        raise ConfigError(
            "--model-config builds a model without a tokenizer: give --tokenizer DIR to read --data"
        )
    return build_data(cfg, tokenizer, task, _model_label2id(raw))


def check_fast(task: str, device: torch.device) -> None:
    """--fast's preconditions, checked before any work: a causal LM, a CUDA device, liger-kernel installed."""
    import importlib.util

    if task != "causal-lm":
        raise ConfigError(f"--fast fuses a causal LM's output layer with its loss; this is a {task} run")
    if device.type != "cuda":
        raise ConfigError(f"--fast runs liger-kernel's Triton kernels: it needs a CUDA GPU (this run is on {device})")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("--fast needs liger-kernel: pip install liger-kernel")


def check_cuda_graphs(cfg: TrainConfig, task: str, device: torch.device, session) -> None:
    """--cuda-graphs' preconditions, checked before any work: where graphed layers are tested, LoRA on a causal
    LM in one CUDA process (DDP's and FSDP's hooks would run inside the backward a graph replays)."""
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs replays CUDA graphs: it needs a CUDA GPU (this run is on {device})")
    if cfg.method != "lora" or task != "causal-lm":
        raise ConfigError(f"--cuda-graphs is for --method lora on a causal LM (this run: {cfg.method}, {task})")
    if session.enabled:
        raise ConfigError(f"--cuda-graphs runs in one process; this run has {session.world_size}")


def fast_base(model) -> str:
    """--fast: liger-kernel's fused kernels on the (unwrapped) base model; returns its model_type. The training
    loop then takes the loss from the model (labels passed in), where the fused linear + cross-entropy lives."""
    from ..fast import speed_up_base

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model (peft-lora)
    return speed_up_base(base)


def run(cfg: TrainConfig, hooks: Sequence[Any] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as ``cfg`` says and write everything into cfg.output_dir; returns summary.json's content.

    ``cfg`` itself is not changed: the run works on a validated copy (with seq_len resolved).
    """
    cfg = dataclasses.replace(cfg).validate()
    session = distributed.start(cfg)
    log = session.log(log)
    device = session.device(resolve_device(cfg.device))
    task, hf_config, raw = resolve_task(cfg)
    if cfg.fast:
        check_fast(task, device)
    if cfg.cuda_graphs:
        check_cuda_graphs(cfg, task, device, session)
    if cfg.method == "qlora":
        from .modeling import import_quant

        import_quant()  # fail before any work when QLoRA is unavailable
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    data = prepare_data(cfg, tokenizer, task, hf_config, raw)
    for stats in data.stats:
        log(stats.describe())
        for note in stats.notes:
            log(f"note: {note}")

    out = Path(cfg.output_dir)
    if session.is_main and cfg.checkpoints and not cfg.resume and start_fresh(out / "checkpoints"):
        log(f"note: removed the checkpoints of an earlier finished run in {out / 'checkpoints'}")
    out.mkdir(parents=True, exist_ok=True)
    # the saved config reruns this job from scratch (resume is a way to run it, not part of the job)
    atomic_write_text(out / "train_config.toml", dataclasses.replace(cfg, resume="").to_toml())
    session.barrier()

    seed_everything(cfg.seed)
    memory_before_model = current_memory_mb(device)
    labels = data.label_names
    loaded = load_model(
        cfg, task, tokenizer, num_labels=len(labels) if labels else None, label_names=labels, device=device
    )
    base_params = _count_params(loaded.model)
    info = apply_method(loaded, cfg, device)
    if cfg.fast:
        log(f"fast: liger-kernel's fused kernels on the {fast_base(loaded.model)} base")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    if cfg.cuda_graphs:  # after checkpointing, which graph_layers reads when it is called
        log(f"cuda graphs: {graph_layers(loaded.model)} decoder layers graphed")
    total_params = base_params if cfg.method == "full" else base_params + info.trainable
    log(f"{cfg.method}: trainable params: {info.trainable:,} || all params: {total_params:,} || "
        f"trainable%: {100 * info.trainable / total_params:.4f}")
    seed_everything(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0

    trained = session.wrap(loaded.model, cfg)
    result = train_loop(
        trained, data, cfg, task=task, device=device, output_dir=out, pad_id=pad_id, hooks=hooks,
        dist=session,
    )

    graphs = ({"graphed_layer_calls": graphed_replays(loaded.model), "eager_layer_calls": eager_calls(loaded.model)}
              if cfg.cuda_graphs else {})
    if graphs:
        eager = ", ".join(f"{n} ({why})" for why, n in graphs["eager_layer_calls"].items()) or "none"
        log(f"cuda graphs: {graphs['graphed_layer_calls']} decoder-layer calls replayed; eager calls: {eager}")
    with distributed.gathered(loaded.model):  # full adapter tensors under FSDP (every rank joins)
        saved = save_outputs(loaded, cfg, task, labels, out) if session.is_main else out / "adapter"
    session.barrier()
    if not session.is_main:
        return {"steps": result["steps"], "final_loss": result["final_loss"], "rank": session.rank}
    plot_note = (
        plot_losses(
            _read_history(out), out / "loss.png", f"{cfg.method} on {Path(cfg.data).name or 'synthetic'}"
        )
        if cfg.plot
        else "loss plot skipped (--no-plot)"
    )
    log(plot_note)
    summary = {
        "method": cfg.method,
        "task": task,
        "device": str(device),
        "dtype": cfg.dtype,
        "trainable_params": info.trainable,
        "total_params": total_params,
        "trainable_percent": 100 * info.trainable / total_params,
        "saved_to": str(saved),
        "saved_bytes": dir_size_bytes(saved),
        "model_bytes": _tensor_bytes(loaded.model),
        "memory_before_model_mb": memory_before_model,
        "data": [vars(s) for s in data.stats],
        "label_names": labels,
        "plot": plot_note,
        **graphs,
        **result,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _count_params(model) -> int:
    """Parameters of the model, each shared tensor once; a 4/8-bit Linear counts its out x in weight values
    (they are stored in a buffer, not a parameter)."""
    from ..layers import FrozenPackedLinear

    unique = {id(p): p.numel() for p in model.parameters()}
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, FrozenPackedLinear))
    return sum(unique.values()) + packed


def _tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once (4-bit weights at their packed size)."""
    storages: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 shards are DTensors: count this rank's share
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _read_history(out: Path) -> list[dict]:
    from .report import MetricsLog

    return MetricsLog(out / "metrics.jsonl").read()


def save_outputs(loaded, cfg: TrainConfig, task: str, labels: list[str] | None, out: Path) -> Path:
    """The adapter folder (lora/qlora) or the full model folder (full); returns its path."""
    import lorakit

    info = {
        "task": task,
        "label_names": labels,
        "base_model": cfg.model or None,
        "model_config": cfg.model_config or None,
        "method": cfg.method,
        # how the base was stored while training (generate --quantize auto restores it)
        "quantization": cfg.quant_type if cfg.method == "qlora" else None,
        "double_quant": cfg.double_quant if cfg.method == "qlora" else None,
    }
    if cfg.method == "full":
        target = out / "model"
        _replace_dir(target, lambda tmp: _save_full(loaded, tmp, info))
        return target
    target = out / "adapter"
    base = str(Path(cfg.model).resolve()) if cfg.model else cfg.model_config
    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"

    def write(tmp: Path) -> None:
        if cfg.method == "peft-lora":
            loaded.model.save_pretrained(tmp)
        else:
            lorakit.save_adapter(loaded.model, tmp, base_model_name_or_path=base, task_type=task_type)
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2))

    _replace_dir(target, write)
    return target


def _save_full(loaded, tmp: Path, info: dict) -> None:
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(tmp)
    (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2))


def _replace_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Build a folder next to ``target`` and swap it in, so ``target`` is never half-written."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["TRAIN_INFO", "resolve_task", "run", "save_outputs", "seed_everything"]
