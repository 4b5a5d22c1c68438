"""``lorakit compare``: full fine-tuning vs LoRA vs QLoRA (and PEFT's LoRA) on one model, data and step count.

Each method is an ordinary ``lorakit train`` run (same loop, same data order, same seed) in a fresh Python
process, so that peak memory is that method's own: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the
peak resident set (VmHWM, reset when training starts) minus the resident set before the model was built.
Time per step is the mean over all steps but the first (which pays for allocation and warm-up); on CPU the
table adds the process CPU seconds per step, which other jobs on a shared machine disturb far less than wall
time (run with OMP_NUM_THREADS=1 for it to equal the compute spent).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .config import METHODS, TrainConfig
from .report import atomic_write_text, plot_bars

COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_percent", "trainable %", "{:.3f}"),
    ("seconds_per_step", "s/step", "{:.3f}"),
    ("cpu_seconds_per_step", "CPU s/step", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("model_mb", "weights MB", "{:,.0f}"),
    ("peak_memory_mb", "peak mem MB", "{:,.0f}"),
    ("saved_mb", "saved MB", "{:,.2f}"),
    ("checkpoint_mb", "ckpt MB", "{:,.2f}"),
    ("final_loss", "train loss", "{:.4f}"),
    ("final_eval_loss", "eval loss", "{:.4f}"),
    ("final_eval_ppl", "eval ppl", "{:.2f}"),
    ("final_eval_accuracy", "eval acc", "{:.3f}"),
]


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(torch.device(device))}; " + text
    return text


def method_config(base: TrainConfig, method: str, out: Path, full_lr: float | None) -> TrainConfig:
    lr = (full_lr if full_lr is not None else base.lr / 10) if method == "full" else base.lr
    return dataclasses.replace(base, method=method, output_dir=str(out / method), lr=lr, checkpoints=False,
                               resume="", progress=False, plot=False)


def row_from_summary(method: str, s: dict[str, Any]) -> dict[str, Any]:
    cpu = not str(s.get("device", "cpu")).startswith("cuda")
    peak = s["peak_memory_mb"] - (s.get("memory_before_model_mb", 0.0) if cpu else 0.0)
    row = {
        "method": method,
        "trainable_params": s["trainable_params"],
        "trainable_percent": s["trainable_percent"],
        "seconds_per_step": s["seconds_per_step"],
        **({"cpu_seconds_per_step": s["cpu_seconds_per_step"]} if cpu else {}),
        "tokens_per_s": s["tokens_per_s"],
        "model_mb": s["model_bytes"] / 1e6,
        "peak_memory_mb": peak,
        "saved_mb": s["saved_bytes"] / 1e6,
        "checkpoint_mb": s["checkpoint_bytes"] / 1e6,
        "final_loss": s["final_loss"],
        "steps": s["steps"],
    }
    for key in ("final_eval_loss", "final_eval_ppl", "final_eval_accuracy"):
        if s.get(key) is not None:
            row[key] = s[key]
    return row


def run_isolated(cfg: TrainConfig, workdir: Path) -> dict[str, Any]:
    """Run one method in a child process; returns its summary or {"error": one line}."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = workdir / "compare_config.json", workdir / "compare_result.json"
    result_path.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit.train.compare", "--worker", str(cfg_path), str(result_path)],
        capture_output=True,
        check=False,
        text=True,
    )
    if result_path.is_file():
        return json.loads(result_path.read_text())
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return {"error": lines[-1] if lines else f"worker exited with status {proc.returncode}"}


def run_inline(cfg: TrainConfig) -> dict[str, Any]:
    from .runner import run

    try:
        return run(cfg, log=lambda _line: None)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except ConfigError as err:
        return {"error": str(err)}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worker(cfg_path: str, result_path: str) -> int:
    """Child-process entry: train one method, write its summary as JSON."""
    from ..errors import LoraError
    from .runner import run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    cfg = TrainConfig(**json.loads(Path(cfg_path).read_text())).validate()
    try:
        summary = run(cfg, log=lambda _line: None)
    except torch.OutOfMemoryError:
        summary = {"error": "out of memory"}
    except LoraError as err:
        summary = {"error": " ".join(str(err).split())}
    atomic_write_text(result_path, json.dumps(summary, default=str))
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table; columns with no value in any row are left out."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | " + f"not run: {r['error']}" + " |" * (len(cols) - 1))
            continue
        cells = [fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    base: TrainConfig,
    methods: list[str],
    full_lr: float | None = None,
    isolate: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run each method and return {"rows": [...], "header": str, "table": str}; writes compare.* files."""
    from .modeling import qlora_available, resolve_device

    out = Path(base.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        cfg = method_config(base, method, out, full_lr)
        if method == "qlora" and not qlora_available():
            rows.append({"method": method, "error": "lorakit.qlora is not available in this install"})
            log(f"{method}: skipped (lorakit.qlora is not available)")
            continue
        log(f"{method}: training {cfg.max_steps} steps (lr {cfg.lr:g}) ...")
        summary = run_isolated(cfg, out / method) if isolate else run_inline(cfg)
        if "error" in summary:
            rows.append({"method": method, "error": summary["error"]})
            log(f"{method}: not run: {summary['error']}")
        else:
            rows.append(row_from_summary(method, summary))
            row = rows[-1]
            log(f"{method}: {row['seconds_per_step']:.3f} s/step, peak {row['peak_memory_mb']:,.0f} MB")
    model = base.model or f"preset {base.model_config} (random weights)"
    short_name = _short_name(base)
    device_name = str(resolve_device(base.device))
    lr_full = full_lr if full_lr is not None else base.lr / 10
    header = (
        f"lorakit compare: {model}; data {base.data or 'synthetic copy task'}; {base.max_steps} steps of "
        f"{base.batch_size}x{base.seq_len} (grad_accum {base.grad_accum}); dtype {base.dtype}, autocast "
        f"{base.autocast}; device {base.device}; r={base.r}, alpha={base.alpha:g}, targets "
        f"{base.target_modules}; lr {base.lr:g} (full: {lr_full:g}); "
        f"{datetime.date.today().isoformat()}; {machine_description(device_name)}"
    )
    peak_note = (
        "weights MB: the model's parameters and buffers (4-bit weights packed); peak mem: "
        + ("torch.cuda.max_memory_allocated during training" if device_name.startswith("cuda") else
           "peak RSS during training minus RSS before the model was built (includes what the C allocator "
           "keeps of freed buffers)")
    )
    table = format_table(rows)
    text = f"{header}\n{peak_note}\n\n{table}\n"
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps({"header": header, "rows": rows}, indent=2))
    ok_rows = [r for r in rows if "error" not in r]
    chart = (
        plot_bars(
            ok_rows,
            [
                ("seconds_per_step", "s / step"),
                ("peak_memory_mb", "peak memory (MB)"),
                ("trainable_params", "trainable params"),
                ("saved_mb", "saved size (MB)"),
                ("final_eval_loss", "final eval loss"),
                ("final_eval_accuracy", "final eval accuracy"),
            ],
            out / "compare.png",
            f"{short_name}: {base.max_steps} steps of {base.batch_size}x{base.seq_len} on {device_name}",
            log_scale=("trainable_params",),
        )
        if ok_rows
        else "no chart"
    )
    return {"rows": rows, "header": header, "table": table, "text": text, "chart": chart}


def _short_name(cfg: TrainConfig) -> str:
    if cfg.model_config:
        return cfg.model_config
    path = Path(cfg.model).resolve()
    return path.parent.name if path.name in ("model", "models", "hf") else path.name


def compare_command(args, make_config) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(
            f"--methods: unknown method {bad[0] if bad else '(none)'!r}; choose from {', '.join(METHODS)}"
        )
    forced = {"method": "lora"}
    if args.steps is not None:
        forced["max_steps"] = args.steps
    if "output_dir" not in vars(args) and not args.config:
        forced["output_dir"] = "lorakit-compare"
    base = make_config(args, **forced)
    if base.max_steps == 0:
        base = dataclasses.replace(base, max_steps=20)
    if args.full_lr is not None and not args.full_lr > 0:
        raise ConfigError(f"--full-lr must be a positive number, got {args.full_lr}")
    result = compare(base, methods, args.full_lr, args.isolate, log=lambda s: print(s, file=sys.stderr))
    print(result["text"])
    print(result["chart"])
    return 0 if any("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m lorakit.train.compare --worker CONFIG.json RESULT.json")
