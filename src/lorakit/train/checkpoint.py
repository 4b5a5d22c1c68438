"""Resumable checkpoints: everything that decides the rest of the loss curve, written atomically.

A checkpoint folder ``checkpoints/step-000120/`` holds
    trainable.safetensors  the trainable parameters (the adapter, or every weight for full fine-tuning)
    optimizer.pt           AdamW's state (moments, step counts)
    trainer.pt             RNG states (torch, CUDA, Python, NumPy) and the fp16 GradScaler, if any
    state.json             step, data-sampler position, tokens seen, time spent, the run's fingerprint
It is built in a hidden temp folder and renamed into place, so a folder named step-* is always complete.
The frozen base is not stored: it is reloaded from the model folder (or rebuilt from the seed).
``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu", copy=True).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # only once CUDA is in use (a CPU run on a GPU machine must not start CUDA for this)
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs restores the devices this one has
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer, state: dict, scaler=None, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; prune to the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(
            {"rng": rng_state(), "scaler": scaler.state_dict() if scaler is not None else None},
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again after a resume: swap, then drop the old one
            old = root / f".old-step-{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def start_fresh(root: Path) -> int:
    """Before a run without --resume: drop the checkpoints of an earlier *finished* run in ``root`` (returns
    how many), but refuse (ConfigError) to bury an unfinished one, which only --resume can continue."""
    found = list_checkpoints(root)
    if not found:
        return 0
    state = json.loads((found[-1] / "state.json").read_text())
    if state["step"] < state.get("total_steps", float("inf")):
        raise ConfigError(
            f"{root} holds {found[-1].name} of an unfinished run; continue it with --resume, or choose "
            "another --output-dir (or delete that folder) to start over"
        )
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """'latest' -> the newest checkpoint under output_dir/checkpoints; otherwise ``resume`` is the folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        if not found:
            raise ConfigError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"--resume {resume!r} is not a checkpoint folder (no state.json in it)")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer, fingerprint: dict, scaler=None) -> dict:
    """Restore parameters, optimizer, RNG and scaler from ``path``; return its state.json.

    Refuses (ConfigError) a checkpoint written by a run with other settings or other data, since
    continuing it would not reproduce the uninterrupted run.
    """
    state = json.loads((path / "state.json").read_text())
    saved = state.get("fingerprint", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v
    ]
    if diffs:
        raise ConfigError(
            f"checkpoint {path} was written by a different run ({'; '.join(diffs[:4])}); "
            "resume with the same settings or start a new output_dir"
        )
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        raise ConfigError(f"checkpoint {path} does not fit the model (missing {missing})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    extra = torch.load(path / "trainer.pt", weights_only=True)
    if scaler is not None and extra.get("scaler") is not None:
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])
    return state


__all__ = ["find_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint", "start_fresh", "trainable_state"]
