"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A, through optimizer parameter groups.

With the usual init (B = 0, A random) both matrices see the same learning rate in plain LoRA, which the
LoRA+ analysis shows is inefficient for wide layers: B should move ``ratio`` times faster (the paper uses
ratios around 16). The groups are read from lorakit's LoRA layers themselves (which tensor is A, which is B),
never from parameter-name substrings:

    "lora_A"         every A (lora_A, lora_embedding_A)                    lr,          weight_decay
    "lora_B"         every B (lora_B, lora_embedding_B)                    lr * ratio,  weight_decay
    "embedding"      A and B of embedding layers, only if lr_embedding     lr_embedding, weight_decay
    "other"          other trainable matrices (modules_to_save, prefix)    lr,          weight_decay
    "other_no_decay" other trainable vectors and scalars (biases, norms,   lr,          0
                     DoRA magnitudes, learnable scales)

PEFT's ``create_loraplus_optimizer`` differs in two places, both on purpose: PEFT gives every 1-D parameter
(biases, DoRA magnitudes of linear layers) B's learning rate and decays nothing there; and it trains LoRA on
embeddings at a fixed 1e-6 unless told otherwise (here: the LoRA+ ratio applies; pass ``lr_embedding=1e-6``
for PEFT's behaviour).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .layers import Embedding
from .model import lora_layers

A_DICTS = ("lora_A", "lora_embedding_A")
B_DICTS = ("lora_B", "lora_embedding_B")
"""Containers of a LoRA layer holding the A and the B matrices (first part of the layer-local parameter name)."""


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    lr_embedding: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ over the model's trainable parameters (each exactly once).

    Args:
        lr: learning rate of A (and of every other trainable parameter).
        ratio: lr(B) / lr(A), >= 1 in the paper (16 by default).
        weight_decay: applied to A, B and other matrices; never to vectors (biases, norms, DoRA magnitudes).
        lr_embedding: if given, LoRA on embedding layers trains at this learning rate (PEFT uses 1e-6).

    Returns a list of dicts with "params", "lr", "weight_decay", "name" and "lr_scale" (the group's lr / lr:
    a loop that sets its own schedule should set ``group["lr"] = scheduled_lr * group["lr_scale"]``; torch's
    LR schedulers keep the ratios by themselves). Empty groups are left out.
    """
    for label, value in (("lr", lr), ("ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{label} must be a positive number, got {value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ConfigError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if lr_embedding is not None and not (isinstance(lr_embedding, (int, float)) and lr_embedding > 0):
        raise ConfigError(f"lr_embedding must be a positive number or None, got {lr_embedding!r}")

    groups: dict[str, list[nn.Parameter]] = {k: [] for k in ("lora_A", "lora_B", "embedding", "other",
                                                               "other_no_decay")}
    seen: set[int] = set()
    for _, layer in lora_layers(model):
        embedding = isinstance(layer, Embedding) and lr_embedding is not None
        for name in layer.specs:
            for pname, p in layer.named_adapter_parameters(name):
                if not p.requires_grad or id(p) in seen:
                    continue
                container = pname.split(".")[0]
                if container in A_DICTS or container in B_DICTS:
                    group = "embedding" if embedding else ("lora_B" if container in B_DICTS else "lora_A")
                else:
                    group = "other_no_decay" if p.dim() < 2 or _is_vector(p) else "other"
                groups[group].append(p)
                seen.add(id(p))
    for module in model.modules():
        no_decay = isinstance(module, _NORMS)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            groups["other_no_decay" if no_decay or p.dim() < 2 else "other"].append(p)
            seen.add(id(p))

    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "other": (lr, weight_decay),
        "other_no_decay": (lr, 0.0),
    }
    out = []
    for group, params in groups.items():
        if params:
            group_lr, decay = settings[group]
            out.append({"params": params, "lr": group_lr, "weight_decay": decay, "name": group,
                        "lr_scale": group_lr / lr})
    if not out:
        raise ConfigError("the model has no trainable parameters; inject an adapter first")
    return out


def _is_vector(p: torch.Tensor) -> bool:
    """A DoRA magnitude of a conv is stored (1, out, 1, 1): a vector in effect."""
    return sum(1 for s in p.shape if s > 1) <= 1


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Modules whose parameters are not decayed (norm scales and shifts), as in Hugging Face's Trainer."""


def loraplus_optimizer(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr_embedding: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` (AdamW by default) over ``loraplus_param_groups``; kwargs go to the optimizer
    (betas, eps, fused, ...)."""
    groups = loraplus_param_groups(model, lr, ratio=ratio, weight_decay=weight_decay, lr_embedding=lr_embedding)
    return optimizer_cls(groups, lr=lr, **kwargs)


__all__ = ["loraplus_optimizer", "loraplus_param_groups"]
