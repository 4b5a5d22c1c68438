"""PiSSA adapters on a model: convert a trained PiSSA adapter into a plain LoRA for the original base weights.

A PiSSA adapter only makes sense on top of its residual W_res = W0 - s * B0 @ A0 (``lorakit.layers.pissa``).
After training, W_res + s * B @ A = W0 + s * (B @ A - B0 @ A0), and the bracket is a LoRA of rank 2r:

    A' = [A; A0]   (2r, in)        B' = [B, -B0]   (out, 2r)

which applies to the untouched original model and mixes freely with other adapters. This is exactly PEFT's
``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` (r and alpha doubled, or alpha times
sqrt(2) with rsLoRA, so the scale is unchanged), except that lorakit keeps (A0, B0) in memory (also after
``load_adapter`` of a PiSSA adapter, which re-derives them from the original weights), so no separate
"initial adapter" folder is needed.

Two ways to keep a PiSSA adapter, both readable by PEFT:
    save_adapter(model, dir)       the adapter itself, ``init_lora_weights="pissa"``: loading it (lorakit or
                                   PEFT) onto the ORIGINAL base takes the residual out again (SVD at load time).
    save_pissa_as_lora(model, dir) the rank-2r plain LoRA above: loads onto the original base like any LoRA.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, ConfigError
from .io import PREFIX, _lorakit_json, _peft_json, adapter_state_dict, base_model_name, write_adapter_folder
from .model import configs, lora_layers


def _pissa_layers(model: nn.Module, name: str):
    if name not in configs(model):
        raise AdapterError(f"no adapter named {name!r}; the model has {sorted(configs(model))}")
    config = configs(model)[name]
    if not config.init.startswith("pissa"):
        raise ConfigError(f"adapter {name!r} was not initialized with PiSSA (init={config.init!r})")
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.specs]
    for path, layer in layers:
        if "pissa_init" not in layer._modules or name not in layer.pissa_init:
            raise ConfigError(f"layer {path!r} holds no PiSSA initialization for adapter {name!r}")
    return config, layers


def pissa_to_lora_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter as a plain rank-2r LoRA on the original weights, under PEFT's keys (scale unchanged)."""
    _, layers = _pissa_layers(model, name)
    state = adapter_state_dict(model, name)
    for path, layer in layers:
        init = layer.pissa_init[name]
        scale = layer.scale(name)
        scale = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
        A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        B0 = init.B.to(torch.float32) * (init.scale / scale)  # B0 was taken out with the scale at init time
        key = f"{PREFIX}{path}."
        state[key + "lora_A.weight"] = torch.cat([A, init.A.to(A.dtype)], dim=0)
        state[key + "lora_B.weight"] = torch.cat([B, (-B0).to(B.dtype)], dim=1)
    return state


def save_pissa_as_lora(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write PiSSA adapter ``name`` as a plain LoRA (rank 2r) for the original base model; returns the folder.

    The model itself is not changed. PEFT and lorakit load the folder onto the unmodified base model.
    """
    config, _ = _pissa_layers(model, name)
    kit = _lorakit_json(model, name, config)
    peft = _peft_json(model, name, config, kit, base_model_name(model, base_model_name_or_path), task_type)
    factor = math.sqrt(2.0) if config.use_rslora else 2.0  # alpha' / f(2r) == alpha / f(r)
    for d, (r_key, alpha_key) in ((kit, ("r", "alpha")), (peft, ("r", "lora_alpha"))):
        d[r_key] *= 2
        d[alpha_key] *= factor
        d["rank_pattern"] = {k: 2 * v for k, v in d["rank_pattern"].items()}
        d["alpha_pattern"] = {k: factor * v for k, v in d["alpha_pattern"].items()}
    kit["init"], peft["init_lora_weights"] = "kaiming", True
    kit["learnable_scale"] = False  # the learned scale is in alpha (see io._layer_overrides)
    kit["converted_from"] = "pissa"
    return write_adapter_folder(directory, pissa_to_lora_state(model, name), peft, kit)


__all__ = ["pissa_to_lora_state", "save_pissa_as_lora"]
