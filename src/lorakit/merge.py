"""Merge adapters into base weights (zero inference latency), unmerge them, unload lorakit entirely,
and combine adapters into a new one."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from . import blocks
from .config import LoraConfig
from .errors import AdapterError, ConfigError
from .layers import FusedLinear
from .layers.pissa import restore_unmerged_pissa
from .model import _replace, _saved_modules, configs, lora_layers


def merge(model: nn.Module, adapters: Sequence[str] | None = None, keep_original: bool = False) -> list[str]:
    """Fold adapters (default: the active ones, with their weights) into the base weights.

    The update is added in fp32 and rounded once to the weight's dtype. With ``keep_original`` each layer
    keeps a copy of its weight so that ``unmerge`` restores it bit for bit (costs one weight copy per layer).
    Returns the paths of the layers that merged something.
    """
    if adapters is not None:
        unknown = [a for a in adapters if a not in configs(model)]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r}; the model has {sorted(configs(model))}")
    done = []
    for path, layer in lora_layers(model):
        names = None if adapters is None else [a for a in adapters if a in layer.specs]
        if layer.merge(names, keep_original=keep_original):
            done.append(path)
    return done


def unmerge(model: nn.Module) -> list[str]:
    """Take every merged adapter back out of the base weights. Returns the paths of the layers changed."""
    return [path for path, layer in lora_layers(model) if layer.unmerge()]


def unload(model: nn.Module, merge_adapters: bool = True) -> nn.Module:
    """Return the plain model with no lorakit module left, in place.

    merge_adapters=True folds the active adapters in first (and keeps the active modules_to_save copy);
    False restores the original base modules, dropping the adapters.
    """
    for path, layer in list(lora_layers(model)):
        if merge_adapters:
            layer.merge()
        else:
            layer.unmerge()
        restore_unmerged_pissa(layer)  # a PiSSA adapter that is not folded in gives W0 its principal part back
        _replace(model, path, layer.base_layer)
    for path, saved in list(_saved_modules(model)):
        _replace(model, path, saved.current if merge_adapters else saved.original_module)
    for p in model.parameters():
        p.requires_grad_(True)
    configs(model).clear()
    blocks.sync(model)  # no LoRA layer left: every block gets its class's forward back
    return model


def combine_adapters(model: nn.Module, weights: dict[str, float], new_name: str) -> None:
    """Add ``new_name`` = sum_i w_i * adapter_i, exactly, by concatenating ranks.

    The new adapter on each layer has A = cat(A_i) and B = cat(w_i * s_i / s * B_i) with s its own scale, so
    its update equals the weighted sum of the originals (rank = sum of ranks). It starts inactive.
    """
    from .model import inject  # local: merge and model import each other's helpers only here

    if not weights:
        raise ConfigError("combine_adapters needs at least one adapter")
    known = configs(model)
    for n in weights:
        if n not in known:
            raise AdapterError(f"no adapter named {n!r}; the model has {sorted(known)}")
    first = known[next(iter(weights))]
    layers = {p: l for p, l in lora_layers(model) if any(n in l.specs for n in weights)}
    for path, layer in layers.items():
        if any(layer.specs[n].use_dora for n in weights if n in layer.specs):
            raise ConfigError(
                f"combine_adapters cannot concatenate DoRA adapters (their magnitudes do not add) at {path!r}; "
                "combine with set_active_adapters({...: weight}) instead"
            )
        if isinstance(layer, FusedLinear) or getattr(layer, "groups", 1) > 1:
            raise ConfigError(
                f"combine_adapters concatenates ranks, which does not fit the block layout of {path!r} "
                f"({type(layer).__name__}); combine with set_active_adapters({{...: weight}}) instead"
            )
    ranks = {p: sum(l.specs[n].r for n in weights if n in l.specs) for p, l in layers.items()}
    config = LoraConfig(
        r=max(ranks.values()),
        alpha=float(max(ranks.values())),
        target_modules="|".join(re.escape(p) for p in sorted(layers)),  # regex: exactly these paths
        rank_pattern={_exact(p): r for p, r in ranks.items()},
        alpha_pattern={_exact(p): float(r) for p, r in ranks.items()},
        dtype=first.dtype,
    )
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    inject(model, config, new_name)
    for p in model.parameters():
        p.requires_grad_(trainable.get(id(p), False))
    with torch.no_grad():
        for path, layer in layers.items():
            pieces = [(n, w) for n, w in weights.items() if n in layer.specs]
            state = {k: [] for k in layer.peft_state(pieces[0][0])}
            for n, w in pieces:
                for k, t in layer.peft_state(n).items():
                    if k == layer.peft_B_key:
                        t = t * (w * float(layer.scale(n)) / layer.specs[new_name].scale)
                    state[k].append(t)
            merged_state = {k: torch.cat(v, dim=1 if k == layer.peft_B_key else 0) for k, v in state.items()}
            layer.load_peft_state(new_name, merged_state)


def _exact(path: str) -> str:
    """A pattern that matches exactly this path under PEFT's (.*\\.)?(pattern)$ rule."""
    return "^" + re.escape(path)


__all__ = ["combine_adapters", "merge", "unload", "unmerge"]
