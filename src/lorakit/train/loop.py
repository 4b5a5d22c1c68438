"""The training loop: plain code you can read top to bottom, with hooks instead of subclasses.

One optimizer step = ``grad_accum`` micro-batches. The loss of a step is the sum of token losses over all
its micro-batches divided by the number of target tokens in all of them (examples, for a classifier), so
accumulating gradients gives exactly the gradient of the big batch. The learning rate follows a linear
warm-up and a cosine decay computed from the step number alone, so a resumed run needs no scheduler state.

Hooks are any objects with some of these methods (all optional), called in this order each step:
    on_train_start(state)          after setup (and after a resume restored the state)
    on_step_end(state, record)     after the step's metrics, evaluation and checkpoint are written
    on_eval(state, record)         after an evaluation
    on_train_end(state, result)
``state`` is the live LoopState (with .model and .optimizer). A hook that raises stops training (tests use
this to simulate a kill).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TrainingError
from .checkpoint import find_checkpoint
from .data import IGNORE_INDEX, DataBundle, EpochSampler, collate
from .distributed import unwrap
from .losses import fused_head_loss, fused_head_supported, shifted_cross_entropy_sum
from .report import MetricsLog, current_memory_mb, peak_memory_mb, reset_peak_memory

# Settings that shape the loss curve: a resume with any of them changed is refused.
TRAJECTORY_FIELDS = (
    "model", "model_config", "tokenizer", "task", "method", "data", "eval_fraction", "seq_len", "packing",
    "text_column", "prompt_column", "completion_column", "messages_column", "label_column", "chat_loss",
    "r", "alpha", "dropout", "target_modules", "use_rslora",
    "use_dora", "init", "loraplus_ratio", "num_virtual_tokens", "prefix_projection", "quant_type", "double_quant",
    "lr",
    "weight_decay", "batch_size", "grad_accum", "max_steps", "epochs", "warmup_steps", "min_lr_ratio",
    "max_grad_norm", "seed", "dtype", "autocast", "gradient_checkpointing",
)


@dataclass
class LoopState:
    """What the loop knows at any moment; hooks read it."""

    step: int = 0
    total_steps: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------ pieces
def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """(sum of per-target cross-entropies in fp32, number of targets). Causal LM shifts by one token and goes
    through chunks of the logits (``losses``: no full-vocabulary fp32 copy)."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), _targets(labels, task)
    return shifted_cross_entropy_sum(logits, labels, IGNORE_INDEX), _targets(labels, task)


def autocast_context(mode: str, device: torch.device) -> tuple[contextlib.AbstractContextManager, str]:
    """(context for the forward pass, the mode actually used). 'auto' is bf16 on GPUs that support it."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if mode == "none":
        return contextlib.nullcontext(), mode
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    if device.type == "cpu" and mode == "fp16":
        raise ConfigError("--autocast fp16 needs a GPU; use bf16 or none on CPU")
    if device.type == "cuda" and mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--autocast bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or none")
    return torch.autocast(device.type, dtype=dtype), mode


def optimizer_for(model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float = 0.0) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (biases, norms) do not. With LoRA+ (ratio > 0)
    B gets lr * ratio through groups that carry their ``lr_scale``. Fused (one kernel over all tensors) where
    torch has it for these parameters (``fused_adamw_applies``)."""
    if loraplus_ratio > 0:
        from ..optim import loraplus_param_groups

        groups = loraplus_param_groups(model, lr, loraplus_ratio, weight_decay)
        return torch.optim.AdamW(groups, lr=lr, fused=fused_adamw_applies(p for g in groups for p in g["params"]))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter (check --target-modules)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused_adamw_applies(params))


def fused_adamw_applies(params) -> bool:
    """Whether torch's fused AdamW takes these parameters: plain (not sharded DTensor) floating-point tensors,
    all on one CPU or CUDA device. Why: over a LoRA model's hundreds of small tensors the default (foreach)
    step launches several ops per group of tensors; fused is one pass (2-core CPU, GPT-2's 96 adapter tensors:
    1.1 ms a step against 4.8; on CUDA it also drops the host's per-op launches)."""
    params = list(params)
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params))


def data_fingerprint(data: DataBundle) -> str:
    """sha256 of the tokenized training set (ids and labels): a resume on other data is refused."""
    h = hashlib.sha256()
    for ex in data.train:
        h.update(array("q", ex.input_ids).tobytes())
        h.update(array("q", [ex.labels] if isinstance(ex.labels, int) else ex.labels).tobytes())
    return h.hexdigest()[:16]


def _call(hooks: Sequence[Any], event: str, *args) -> None:
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(*args)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples,
    task: str,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    autocast_mode: str = "none",
    max_batches: int = 0,
    fused_loss: bool = True,
) -> dict[str, float]:
    """Mean eval loss over targets, with perplexity (causal LM) or accuracy (classification)."""
    was_training = model.training
    model.eval()
    ctx, _ = autocast_context(autocast_mode, device)
    total, count, correct = 0.0, 0, 0
    head_loss = task == "causal-lm" and fused_loss and fused_head_supported(unwrap(model))
    for b, start in enumerate(range(0, len(examples), batch_size)):
        if max_batches and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        if head_loss:  # the summed loss straight from the fused head: no (tokens x vocab) logits
            with ctx, fused_head_loss(unwrap(model), IGNORE_INDEX):
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
            total, count = total + float(loss), count + _targets(batch["labels"], task)
            continue
        with ctx:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n = loss_sum(logits, batch["labels"], task)
        total, count = total + float(loss), count + n
        if task == "classification":
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    if task == "classification":
        return {"eval_loss": mean, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


# ------------------------------------------------------------------------------------------ the loop
def train_loop(
    model: nn.Module,
    data: DataBundle,
    cfg,
    *,
    task: str,
    device: torch.device,
    output_dir: Path,
    pad_id: int,
    hooks: Sequence[Any] = (),
    dist=None,
) -> dict[str, Any]:
    """Train ``model`` (already on ``device``, trainable parameters marked) on ``data`` as ``cfg`` says.

    Writes metrics.jsonl and checkpoints under ``output_dir``; returns the final numbers.
    Raises TrainingError on a non-finite loss or gradient, before the bad update touches the weights.
    ``dist`` (a lorakit.train.distributed.Session) runs the same trajectory on several processes.
    """
    if dist is None:
        from .distributed import Session

        dist = Session()
    optimizer = optimizer_for(model, cfg.lr, cfg.weight_decay, cfg.loraplus_ratio)
    # --fast: the loss comes from the model, whose fused linear + cross-entropy never stores the logits
    model_loss = bool(getattr(cfg, "fast", False)) and task == "causal-lm"
    # otherwise, for the usual causal LMs, lorakit's own fused head + loss (the logits never exist either)
    head_loss = (not model_loss and task == "causal-lm" and getattr(cfg, "fused_loss", True)
                 and fused_head_supported(unwrap(model)))
    # a training step has no use for a KV cache (it would store every layer's keys and values, and graphed
    # layers run eagerly with one)
    no_cache = {"use_cache": False} if task == "causal-lm" else {}
    sampler = EpochSampler(len(data.train), cfg.batch_size, cfg.seed)
    total = cfg.max_steps or cfg.epochs * -(-sampler.batches_per_epoch() // cfg.grad_accum)
    ctx, amp = autocast_context(cfg.autocast, device)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    fingerprint = {k: getattr(cfg, k) for k in TRAJECTORY_FIELDS} | {
        "train_data_sha256": data_fingerprint(data)
    }
    metrics = dist.metrics_log(MetricsLog(output_dir / "metrics.jsonl"))
    state = LoopState(total_steps=total, model=model, optimizer=optimizer)

    if cfg.resume:
        path = find_checkpoint(output_dir, cfg.resume)
        saved = dist.load_checkpoint(path, model, optimizer, fingerprint, scaler)
        sampler.load_state_dict(saved["sampler"])
        state.step, state.tokens, state.elapsed = saved["step"], saved["tokens"], saved["elapsed"]
        state.history = metrics.truncate_after(state.step)
        state.resumed_from = str(path)
    else:
        metrics.reset()

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    reset_peak_memory(device)
    _call(hooks, "on_train_start", state)
    bar = _progress(cfg, total, state.step)
    session_tokens, session_start = 0, time.perf_counter()
    last_eval: dict[str, float] = {}
    step_times: list[float] = []
    step_token_counts: list[int] = []
    cpu_times: list[float] = []  # process CPU seconds: a fairer cost than wall time on a shared CPU
    try:
        while state.step < total:
            t0, c0 = time.perf_counter(), time.process_time()
            micro = [
                collate([data.train[i] for i in sampler.next_batch()], pad_id) for _ in range(cfg.grad_accum)
            ]
            targets = sum(_targets(b["labels"], task) for b in micro)
            step_loss = torch.zeros((), device=device, dtype=torch.float32)
            step_tokens = 0
            for batch in micro:
                dist.grad_sync(model, batch is micro[-1])
                batch = dist.shard(batch)
                # no padding (packed rows): no mask, which is the same attention and lets graphed layers replay
                padded = not bool(batch["attention_mask"].all())
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                mask = batch["attention_mask"] if padded else None
                with ctx:
                    if model_loss:  # the model sums the shifted token losses itself (num_items_in_batch=1)
                        loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"],
                                     num_items_in_batch=1, **no_cache).loss.float()
                    elif head_loss:
                        with fused_head_loss(unwrap(model), IGNORE_INDEX):
                            loss = model(input_ids=batch["input_ids"], attention_mask=mask,
                                         labels=batch["labels"], **no_cache).loss
                    else:
                        logits = model(input_ids=batch["input_ids"], attention_mask=mask, **no_cache).logits
                if not (model_loss or head_loss):
                    loss, _ = loss_sum(logits, batch["labels"], task)
                scaled = loss * dist.grad_scale / max(targets, 1)
                (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += loss.detach()
                step_tokens += int(batch["attention_mask"].sum())
            step_loss, step_tokens = dist.reduce_step(step_loss, step_tokens)
            mean_loss = float(step_loss) / max(targets, 1)
            if not math.isfinite(mean_loss):
                raise TrainingError(_nan_message("loss", mean_loss, state, cfg, output_dir))
            if scaler:
                scaler.unscale_(optimizer)
            limit = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            if not math.isfinite(grad_norm) and scaler is None:
                raise TrainingError(_nan_message("gradient norm", grad_norm, state, cfg, output_dir))
            lr = lr_at(state.step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            step_token_counts.append(step_tokens)
            cpu_times.append(time.process_time() - c0)
            state.step += 1
            state.tokens += step_tokens
            state.elapsed += dt
            session_tokens += step_tokens
            record = {
                "step": state.step,
                "epoch": sampler.epoch,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                "step_time_s": dt,
                "tokens_per_s": session_tokens / max(time.perf_counter() - session_start, 1e-9),
                "memory_mb": round(current_memory_mb(device), 1),
            }
            last = state.step == total
            if state.step % cfg.log_every == 0 or last:
                metrics.append(record)
                state.history.append(record)
            if data.eval and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                last_eval = evaluate(
                    model, data.eval, task, cfg.batch_size, device, pad_id, amp, cfg.eval_batches,
                    fused_loss=getattr(cfg, "fused_loss", True),
                )
                eval_record = {"step": state.step, **last_eval}
                metrics.append(eval_record)
                state.history.append(eval_record)
                _call(hooks, "on_eval", state, eval_record)
            if cfg.checkpoints and ((cfg.save_every and state.step % cfg.save_every == 0) or last):
                run_state = {
                    "step": state.step,
                    "total_steps": total,
                    "tokens": state.tokens,
                    "elapsed": state.elapsed,
                    "sampler": sampler.state_dict(),
                    "fingerprint": fingerprint,
                }
                dist.save_checkpoint(
                    output_dir / "checkpoints",
                    state.step,
                    model,
                    optimizer,
                    run_state,
                    scaler,
                    keep=cfg.keep_checkpoints,
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(_postfix(record, last_eval, device), refresh=False)
            _call(hooks, "on_step_end", state, record)
    finally:
        if bar is not None:
            bar.close()

    timed = step_times[1:] or step_times
    result = {
        "steps": state.step,
        "total_steps": total,
        "final_loss": next((r["loss"] for r in reversed(state.history) if "loss" in r), None),
        **{f"final_{k}": v for k, v in last_eval.items()},
        "tokens": state.tokens,
        "train_seconds": state.elapsed,
        "seconds_per_step": sum(timed) / len(timed) if timed else None,
        "cpu_seconds_per_step": sum(cpu_times[1:] or cpu_times) / len(cpu_times[1:] or cpu_times)
        if cpu_times else None,
        # like seconds_per_step, over every step but the first (allocation, autotuning, kernel compiles)
        "tokens_per_s": sum(step_token_counts[1:] or step_token_counts) / max(sum(timed), 1e-9)
        if step_times else None,
        "peak_memory_mb": peak_memory_mb(device),
        "autocast": amp,
        "resumed_from": state.resumed_from,
        "checkpoint_bytes": _checkpoint_bytes(model, optimizer),
    }
    _call(hooks, "on_train_end", state, result)
    return result


def _targets(labels: torch.Tensor, task: str) -> int:
    return labels.numel() if task == "classification" else int((labels[:, 1:] != IGNORE_INDEX).sum())


def _checkpoint_bytes(model: nn.Module, optimizer) -> int:
    """Bytes of the tensors a checkpoint stores: trainable parameters plus optimizer state."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for per_param in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in per_param.values() if isinstance(t, torch.Tensor))
    return total


def _nan_message(what: str, value: float, state: LoopState, cfg, output_dir: Path) -> str:
    last = next((r["loss"] for r in reversed(state.history) if "loss" in r), None)
    hint = "lower --lr" + (", use --autocast bf16 or none instead of fp16" if cfg.autocast == "fp16" else "")
    where = f"; the last good checkpoint is under {output_dir / 'checkpoints'}" if state.step else ""
    return (
        f"training stopped: the {what} became {value} at step {state.step + 1} "
        f"(last finite loss: {last if last is not None else 'none'}){where}. Try: {hint}, "
        "a smaller --max-grad-norm, or check the data"
    )


def _progress(cfg, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def _postfix(record: dict, last_eval: dict, device: torch.device) -> str:
    mem = f"{record['memory_mb'] / 1024:.2f}GB" + (" gpu" if device.type == "cuda" else " rss")
    text = f"loss={record['loss']:.4f} tok/s={record['tokens_per_s']:,.0f} mem={mem}"
    if "eval_loss" in last_eval:
        text += f" eval={last_eval['eval_loss']:.4f}"
    return text


__all__ = ["LoopState", "autocast_context", "evaluate", "fused_adamw_applies", "loss_sum", "lr_at", "optimizer_for",
           "train_loop"]
