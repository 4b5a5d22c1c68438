"""What a run reports: memory readings, metrics as JSON lines, the loss-curve PNG.

matplotlib is optional: without it ``plot_losses`` returns a note instead of a file.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

MB = 1024 * 1024


# ------------------------------------------------------------------------------------------ memory
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: CUDA tensors allocated on a GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> float:
    """Peak since the last reset: torch.cuda.max_memory_allocated on a GPU, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    kb = _proc_status_kb("VmHWM")
    return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak window. On Linux CPU this resets VmHWM through /proc/self/clear_refs; returns False
    where the platform cannot reset (the peak then covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    _malloc_trim()  # hand freed heap (e.g. fp32 weights replaced by 4-bit ones) back before the new window
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak may include memory freed before training


# ------------------------------------------------------------------------------------------ metrics
class MetricsLog:
    """metrics.jsonl: one JSON object per logged step or evaluation, flushed as written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is gone too
        return out

    def truncate_after(self, step: int) -> list[dict]:
        """Keep the records of steps <= ``step`` (a resume replays the rest); returns them."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def reset(self) -> None:
        atomic_write_text(self.path, "")

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dir_size_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ plots
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_losses(records: Iterable[dict], path: str | Path, title: str = "") -> str:
    """Train (and eval) loss against step as a PNG. Returns a one-line note of what happened."""
    records = list(records)
    if not have_matplotlib():
        return "loss plot skipped: matplotlib is not installed (pip install matplotlib)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "lorakit train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)
    return f"loss curve: {path}"


def _save_figure(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_bars(rows: list[dict], metrics: list[tuple[str, str]], path: str | Path, title: str,
              log_scale: tuple[str, ...] = ()) -> str:
    """One bar panel per (key, label) metric present in some row, one bar per row["method"]; the keys in
    ``log_scale`` get a logarithmic axis. Returns a note."""
    if not have_matplotlib():
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in metrics if any(isinstance(r.get(k), (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        names = [r["method"] for r in rows if isinstance(r.get(key), (int, float))]
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        if key in log_scale:
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)
    return f"chart: {path}"


__all__ = ["MetricsLog", "atomic_write_text", "current_memory_mb", "dir_size_bytes", "peak_memory_mb",
           "plot_bars", "plot_losses", "reset_peak_memory"]
