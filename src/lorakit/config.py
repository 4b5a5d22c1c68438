"""LoraConfig: what to adapt and how, validated on construction.

Field names follow Hugging Face PEFT where PEFT has the same idea (``r``, ``rank_pattern``,
``modules_to_save``, ...), so an ``adapter_config.json`` maps onto this class in a few lines.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

Target = str | type | Callable[[str, nn.Module], bool]
"""One target spec: a module name (exact or dotted suffix), a module type, or a predicate."""

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa", "pissa_niter_<N>")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class FusedSpec:
    """A fused projection (one Linear holding q,k,v or gate,up) with LoRA on chosen slices.

    Args:
        enabled: one flag per slice of the output dimension, True where LoRA applies.
        sizes: output size of each slice; None splits the output into equal parts.
    """

    enabled: tuple[bool, ...]
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enabled", tuple(bool(e) for e in self.enabled))
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if not self.enabled or not any(self.enabled):
            raise ConfigError(f"FusedSpec.enabled must name at least one slice with True, got {self.enabled}")
        if self.sizes is not None:
            if len(self.sizes) != len(self.enabled):
                raise ConfigError(
                    f"FusedSpec has {len(self.enabled)} flags but {len(self.sizes)} sizes: {self.sizes}"
                )
            if any(s <= 0 for s in self.sizes):
                raise ConfigError(f"FusedSpec.sizes must be positive, got {self.sizes}")

    def slice_sizes(self, out_features: int) -> tuple[int, ...]:
        """Output size of every slice for a layer with ``out_features`` outputs."""
        if self.sizes is not None:
            if sum(self.sizes) != out_features:
                raise ConfigError(
                    f"FusedSpec sizes {self.sizes} add up to {sum(self.sizes)}, but the layer has "
                    f"{out_features} outputs"
                )
            return self.sizes
        k = len(self.enabled)
        if out_features % k:
            raise ConfigError(f"cannot split {out_features} outputs into {k} equal slices; give FusedSpec.sizes")
        return (out_features // k,) * k

    @classmethod
    def coerce(cls, value: Any) -> FusedSpec:
        if isinstance(value, FusedSpec):
            return value
        if isinstance(value, dict):
            return cls(tuple(value["enabled"]), tuple(value["sizes"]) if value.get("sizes") else None)
        return cls(tuple(value))


@dataclass
class LoraConfig:
    """How to add one LoRA adapter to a model.

    Args:
        r: rank of the update B @ A (positive int).
        alpha: scale numerator; the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA).
        dropout: dropout probability applied to the adapter's input only.
        target_modules: which modules get LoRA. A str is a regular expression matched against the
            whole module path, except "all-linear" (every Linear-like layer but the output head).
            A list mixes exact names or dotted suffixes ("q_proj" matches "model.layers.0.attn.q_proj"),
            module types (nn.Conv2d) and predicates ``(name, module) -> bool``.
        exclude_modules: same forms as target_modules; matching modules are never adapted.
        rank_pattern: {regex: r} overriding ``r`` for modules whose path ends with a match (PEFT semantics).
        alpha_pattern: {regex: alpha} overriding ``alpha`` likewise.
        bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
        modules_to_save: modules trained in full beside the adapter (a classifier head); each adapter
            keeps its own copy.
        init: "kaiming" (loralib / PEFT default) or "gaussian" (LoRA paper) for A, B at zero; or "pissa": A and B
            from the top-r singular triplets of the base weight W0 and W0 - scale * B @ A written into the base weight
            (PiSSA; "pissa_niter_<N>": randomized SVD with N subspace iterations, much faster on large layers).
        use_dora: DoRA: a trainable magnitude per output row times the normalized direction of W + scale * B @ A.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        learnable_scale: make the scale a trainable scalar per layer, initialised to the value above.
        fan_in_fan_out: the base weight is stored (in, out); None detects it (GPT-2's Conv1D).
        fused_slices: {regex: FusedSpec or list of bools} for fused projections, e.g. {"c_attn": [True, False, True]}
            puts LoRA on q and v of GPT-2's fused qkv.
        dtype: dtype of the adapter weights; None uses the base weight's floating dtype.
        merge_on_eval: loralib semantics: eval() merges active adapters, train() unmerges them.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[Target] | None = None
    exclude_modules: str | Sequence[Target] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: Sequence[str] = ()
    init: str = "kaiming"
    use_rslora: bool = False
    learnable_scale: bool = False
    fan_in_fan_out: bool | None = None
    fused_slices: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    merge_on_eval: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if self.target_modules is None:
            raise ConfigError(
                "target_modules is required: module names (['q_proj', 'v_proj']), a regex string, "
                "module types ([nn.Linear]) or 'all-linear'"
            )
        self.target_modules = _check_targets("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _check_targets("exclude_modules", self.exclude_modules)
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())
        if not isinstance(self.init, str) or (
            self.init not in INIT_MODES[:3] and _PISSA_NITER.fullmatch(self.init) is None
        ):
            raise ConfigError(f"init must be one of {INIT_MODES} (N a positive int), got {self.init!r}")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {self.use_dora!r}")
        for key in self.fused_slices:
            _check_regex("fused_slices", key)
        self.fused_slices = {k: FusedSpec.coerce(v) for k, v in self.fused_slices.items()}
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")

    # --- per-module values -------------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(self.alpha_pattern, name, self.alpha)

    def fused_for(self, name: str) -> FusedSpec | None:
        return _pattern_value(self.fused_slices, name, None)

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)


def pattern_matches(pattern: str, name: str) -> bool:
    """PEFT's rule for rank/alpha patterns: the module path ends with a full match of the pattern."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if pattern_matches(pattern, name):
            return value
    return default


def _check_rank(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{label} must be a positive int, got {value!r}")


def _check_alpha(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{label} must be a positive number, got {value!r}")


def _check_regex(label: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{label} key {pattern!r} is not a valid regular expression: {err}") from None


def _check_targets(label: str, value: Any) -> str | tuple[Target, ...]:
    if isinstance(value, str):
        if value != ALL_LINEAR:
            _check_regex(label, value)
        return value
    if isinstance(value, type) or callable(value) and not isinstance(value, (list, tuple, set)):
        value = [value]
    items = tuple(value)
    if not items:
        raise ConfigError(f"{label} is empty; name at least one module, type or pattern")
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ConfigError(f"{label} contains an empty name")
        elif isinstance(item, type):
            if not issubclass(item, nn.Module):
                raise ConfigError(f"{label} contains {item!r}, which is not an nn.Module type")
        elif not callable(item):
            raise ConfigError(f"{label} entries must be names, nn.Module types or predicates, got {item!r}")
    return items
