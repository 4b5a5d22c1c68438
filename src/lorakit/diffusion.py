"""LoRA for diffusion models: a diffusers UNet2DConditionModel (Stable Diffusion's UNet), saved as diffusers reads it.

``lorakit.inject`` already adapts a UNet (its attention projections are nn.Linear, its resnet and sampler
convolutions nn.Conv2d); this module adds the two things a diffusion user needs on top:

* ``unet_lora_config``: the usual targets (attention projections, optionally the convolutions: "LoCon").
* ``save_unet_lora`` / ``load_unet_lora``: the file diffusers' ``pipeline.load_lora_weights(dir)`` loads,
  ``pytorch_lora_weights.safetensors`` with keys ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and
  ``.lora_magnitude_vector`` for DoRA) and the adapter config as safetensors metadata
  (``lora_adapter_metadata``). Each layer's scale alpha / r is folded into its B and the metadata says
  alpha = r, so every reader computes the same update: diffusers with or without the metadata, and tools that
  read PEFT-format keys and assume alpha = r.

diffusers itself is not imported here: the UNet is a plain nn.Module to lorakit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig
from .errors import AdapterLoadError, LoraError
from .io import PREFIX, _atomic_write, _copy_into
from .model import Summary, configs, delete_adapter, inject, lora_layers, summary

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections diffusers' own LoRA training scripts adapt."""
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
"""Resnet and down/up-sampler convolutions (LoRA on convolutions, "LoCon")."""


def unet_lora_config(r: int = 4, alpha: float | None = None, convs: bool = True, **kwargs) -> LoraConfig:
    """A LoraConfig for a diffusers UNet: attention projections, plus the convolutions when ``convs``.

    alpha defaults to r (scale 1), the diffusers convention. Other LoraConfig fields pass through.
    """
    targets = list(ATTENTION_TARGETS) + (list(CONV_TARGETS) if convs else [])
    return LoraConfig(r=r, alpha=float(r if alpha is None else alpha), target_modules=targets, **kwargs)


def unet_lora_state_dict(unet: nn.Module, name: str = "default", prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """The adapter under diffusers' keys ``<prefix>.<path>.lora_A.weight`` ..., each B multiplied by its layer's
    scale (so that alpha = r reproduces the adapter)."""
    state = {}
    for path, layer in lora_layers(unet):
        if name not in layer.specs:
            continue
        scale = layer.scale(name)
        scale = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
        for key, tensor in layer.peft_state(name).items():
            tensor = tensor.detach()
            if key == layer.peft_B_key:
                tensor = (tensor.to(torch.float32) * scale).to(tensor.dtype)
            state[f"{prefix}.{path}.{key}"] = tensor.contiguous()
    if not state:
        raise LoraError(f"the model has no LoRA layers for adapter {name!r}")
    return state


def _metadata(unet: nn.Module, name: str) -> dict:
    """PEFT LoraConfig fields diffusers builds the adapter from (alpha = r everywhere: scales are folded)."""
    ranks = {path: layer.peft_rank_alpha(name)[0] for path, layer in lora_layers(unet) if name in layer.specs}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {path: rank for path, rank in ranks.items() if rank != r}
    config = configs(unet)[name]
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_dora": config.use_dora,
        "use_rslora": False,
        "lora_dropout": config.dropout,
        "bias": "none",
        "init_lora_weights": True,
    }


def save_unet_lora(
    unet: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    prefix: str = UNET_PREFIX,
    weight_name: str = WEIGHT_NAME,
) -> Path:
    """Write adapter ``name`` of ``unet`` where ``pipeline.load_lora_weights(directory)`` finds it (atomically).

    Returns the file written. ``prefix`` is the pipeline component ("unet" for Stable Diffusion pipelines).
    """
    if name not in configs(unet):
        raise LoraError(f"the model has no adapter named {name!r}; it has {sorted(configs(unet))}")
    state = unet_lora_state_dict(unet, name, prefix)
    metadata = {f"{prefix}.{k}": v for k, v in _metadata(unet, name).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / weight_name
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    _atomic_write(path, lambda f: save_file(state, f, metadata=header))
    return path


def load_unet_lora(
    unet: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    prefix: str = UNET_PREFIX,
    is_trainable: bool = False,
) -> Summary:
    """Add a diffusers-format UNet LoRA (a file, or a folder holding ``pytorch_lora_weights.safetensors``).

    Reads PEFT-format keys (``<prefix>.<path>.lora_A.weight``); the config comes from the file's metadata when it
    has some, otherwise alpha = r (the diffusers convention). Kohya/A1111 keys (``lora_unet_...``) are not read.
    On any error the UNet is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterLoadError(f"{str(path)!r} is truncated or not a safetensors file: {err}") from None
    lead = f"{prefix}."
    ours = {k[len(lead):]: v for k, v in tensors.items() if k.startswith(lead)}
    if not ours:
        raise AdapterLoadError(f"{str(path)!r} has no keys starting with {lead!r} (found e.g. {next(iter(tensors), None)!r})")
    meta = {}
    if METADATA_KEY in header:
        try:
            raw = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as err:
            raise AdapterLoadError(f"{str(path)!r}: metadata {METADATA_KEY!r} is not valid JSON: {err}") from None
        meta = {k[len(lead):]: v for k, v in raw.items() if k.startswith(lead)}
    ranks = {k.rsplit(".lora_B.", 1)[0]: v.shape[1] for k, v in ours.items() if ".lora_B." in k}
    if not ranks:
        raise AdapterLoadError(f"{str(path)!r} holds no lora_B tensors under {lead!r}")
    r = int(meta.get("r") or max(set(ranks.values()), key=list(ranks.values()).count))
    rank_pattern = {_exact(p): int(v) for p, v in ranks.items() if v != r}
    alpha = float(meta.get("lora_alpha") or r)
    alpha_pattern = {_exact(k): float(v) for k, v in (meta.get("alpha_pattern") or {}).items()}
    if not meta:
        alpha_pattern = {k: float(v) for k, v in rank_pattern.items()}  # scale 1 everywhere
    try:
        config = LoraConfig(
            r=r, alpha=alpha, target_modules="|".join(_exact(p) for p in sorted(ranks)),
            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            use_dora=bool(meta.get("use_dora", any(k.endswith("lora_magnitude_vector") for k in ours))),
            use_rslora=bool(meta.get("use_rslora", False)), dtype=next(iter(ours.values())).dtype,
        )
    except LoraError as err:
        raise AdapterLoadError(f"{str(path)!r}: adapter config is invalid: {err}") from None
    trainable = {id(p): p.requires_grad for p in unet.parameters()}
    try:
        inject(unet, config, name)
    except LoraError as err:
        raise AdapterLoadError(f"adapter in {str(path)!r} does not fit this UNet: {err}") from None
    try:
        _copy_into(unet, name, {PREFIX + k: v for k, v in ours.items()})
    except BaseException:
        delete_adapter(unet, name)
        for p in unet.parameters():
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        raise
    if not is_trainable:
        for _, layer in lora_layers(unet):
            if name in layer.specs:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(False)
    return summary(unet, name)


def _exact(path: str) -> str:
    """A regex matching exactly this module path (full match, and PEFT's suffix rule for patterns)."""
    return re.escape(path)


__all__ = ["ATTENTION_TARGETS", "CONV_TARGETS", "load_unet_lora", "save_unet_lora", "unet_lora_config",
           "unet_lora_state_dict"]
