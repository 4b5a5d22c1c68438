"""LoraLayer: a base layer plus named low-rank adapters. Every layer family subclasses it.

The layer holds the module it adapts as ``base_layer`` (composition, never inheritance from nn.Linear), so
swapping it back out leaves the original untouched. Adapter state lives in plain dicts keyed by adapter
name; "merged" is the set of adapters folded into the base weight (with the coefficient they were folded
at), nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, MergeError
from ..functional import add_scaled


@runtime_checkable
class WeightStore(Protocol):
    """A base layer that stores its weight in a format of its own (Linear4bit: 4-bit codes and scales).

    Merging asks it to add a delta and to snapshot/restore its weight, instead of writing ``weight`` directly.
    """

    def add_to_weight_(self, delta: torch.Tensor) -> None: ...

    def weight_snapshot(self) -> object: ...

    def restore_weight(self, snapshot: object) -> None: ...


@dataclass(frozen=True)
class AdapterSpec:
    """Everything one layer needs to build one adapter, resolved from a LoraConfig for that layer's path."""

    r: int
    alpha: float
    dropout: float = 0.0
    init: str = "kaiming"
    use_rslora: bool = False
    learnable_scale: bool = False
    dtype: torch.dtype | None = None
    use_dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class MixedBatch:
    """Per-row adapter choice for one batch, shared by every layer of a model during one forward.

    ``names[i]`` is the adapter for row i, or None for the base model. Row indices are grouped once
    and moved to each device once.
    """

    def __init__(self, names: Iterable[str | None]):
        self.names = list(names)
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(self.names):
            groups.setdefault(name, []).append(row)
        self._groups = {k: torch.tensor(v, dtype=torch.long) for k, v in groups.items()}
        self._on_device: dict[torch.device, dict[str | None, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def groups(self, device: torch.device) -> dict[str | None, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = {k: v.to(device) for k, v in self._groups.items()}
        return self._on_device[device]


class LoraLayer(nn.Module):
    """Base of all LoRA layers. Subclasses create the adapter tensors and say how they act on an input.

    Subclass contract:
        _create(name, spec, dtype, device): register the adapter's parameters.
        _remove(name): drop them.
        _reset(name, spec): A random (spec.init), B zero.
        _update(name, x): the unscaled low-rank output B(A(dropout(x))), never forming B @ A.
        _delta(name): the unscaled update in the base weight's layout, in fp32 (merge and unmerge use it).
        peft_state(name) / load_peft_state(name, tensors) / peft_shapes(name): the adapter's tensors under
            PEFT's local key names ("lora_A.weight", ...), used by io.
    """

    peft_B_key: str = "lora_B.weight"
    """Key of B in peft_state (scaled when adapters are combined)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_scale = nn.ParameterDict()  # only adapters with learnable_scale
        self.specs: dict[str, AdapterSpec] = {}
        self.active: dict[str, float] = {}  # active adapter -> weight in the sum
        self.merged: dict[str, float] = {}  # adapter folded into the base weight -> coefficient used
        self.disabled = False
        self.merge_on_eval = False
        self.mixed: MixedBatch | None = None
        self.weight_tied = False  # set by inject: another module reads the same weight tensor (a tied head)
        self._tied_weight: nn.Parameter | None = None  # the shared tensor, while merged into a private copy
        self._original_weight: object | None = None  # a weight copy, or a WeightStore snapshot

    # ------------------------------------------------------------------ subclass hooks
    def _create(self, name: str, spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _remove(self, name: str) -> None:
        raise NotImplementedError

    def _reset(self, name: str, spec: AdapterSpec) -> None:
        raise NotImplementedError

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def peft_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.peft_state(name).items()}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def peft_rank_alpha(self, name: str) -> tuple[int, float]:
        """The (r, alpha) that PEFT must use for this layer to reproduce its scale."""
        spec = self.specs[name]
        return spec.r, spec.alpha

    # ------------------------------------------------------------------ adapters
    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_dtype(self, spec: AdapterSpec) -> torch.dtype:
        if spec.dtype is not None:
            return spec.dtype
        w = self.base_weight
        return w.dtype if w.dtype.is_floating_point else torch.float32

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        if name in self.specs:
            raise AdapterError(f"adapter {name!r} already exists on this layer; delete it first")
        if not name or "." in name:
            raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
        w = self.base_weight
        self._create(name, spec, self.adapter_dtype(spec), w.device)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        if spec.learnable_scale:
            self.lora_scale[name] = nn.Parameter(torch.tensor(spec.scale, dtype=torch.float32, device=w.device))
        self.specs[name] = spec
        self._reset(name, spec)
        if spec.init.startswith("pissa"):
            from .pissa import (
                pissa_init,  # local: pissa dispatches on the layer families, which import this module
            )

            pissa_init(self, name, spec)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged:
            raise MergeError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        if "pissa_init" in self._modules and name in self.pissa_init:
            from .pissa import pissa_restore

            pissa_restore(self, name)  # the base weight gets back the principal part PiSSA took out of it
        self._remove(name)
        del self.lora_dropout[name]
        if name in self.lora_scale:
            del self.lora_scale[name]
        del self.specs[name]
        self.active.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Trainable tensors of one adapter (A, B and the learnable scale, if any)."""
        self._require(name)
        return [p for _, p in self.named_adapter_parameters(name)]

    def named_adapter_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        out = []
        for pname, p in self.named_parameters():
            parts = pname.split(".")  # e.g. lora_A.<name>.weight, lora_embedding_A.<name>, lora_scale.<name>
            if parts[0] != "base_layer" and len(parts) > 1 and parts[1] == name:
                out.append((pname, p))
        return out

    def set_active(self, adapters: dict[str, float]) -> None:
        for name in adapters:
            self._require(name)
        if self.merged and dict(self.merged) != {k: v for k, v in adapters.items() if k in self.merged}:
            raise MergeError(
                f"adapters {sorted(self.merged)} are merged into the base weight; unmerge before changing the "
                "active set"
            )
        self.active = dict(adapters)

    def scale(self, name: str) -> float | torch.Tensor:
        if name in self.lora_scale:
            return self.lora_scale[name]
        return self.specs[name].scale

    def _require(self, name: str) -> None:
        if name not in self.specs:
            raise AdapterError(f"no adapter named {name!r} on this layer; it has {sorted(self.specs)}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            if self.merged:
                raise MergeError("adapters are disabled but merged into the base weight; unmerge first")
            return result
        if self.mixed is not None:
            return self._mixed_forward(x, result)
        for name, weight in self.active.items():
            if name in self.merged:
                continue
            result = add_scaled(result, self._update(name, x), self._coef(name, weight))
        return result

    def _coef(self, name: str, weight: float) -> float | torch.Tensor:
        scale = self.scale(name)
        return scale if weight == 1.0 else scale * weight

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        mixed = self.mixed
        if self.merged:
            raise MergeError("a mixed-adapter batch needs unmerged adapters; unmerge first")
        if x.shape[0] != len(mixed):
            raise AdapterError(
                f"adapter_names has {len(mixed)} entries but the batch has {x.shape[0]} rows (dim 0 of the input)"
            )
        for name, rows in mixed.groups(x.device).items():
            if name is None or name not in self.specs:
                continue  # base rows, or an adapter that does not touch this layer
            update = self._update(name, x.index_select(0, rows)).to(result.dtype)
            coef = self.scale(name)
            if isinstance(coef, torch.Tensor):
                result = result.index_add(0, rows, update * coef.to(result.dtype))
            else:
                result = result.index_add(0, rows, update, alpha=coef)
        return result

    # ------------------------------------------------------------------ merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * (B @ A) in the base weight's layout and fp32: what merge adds to the weight."""
        self._require(name)
        scale = self.scale(name)
        if isinstance(scale, torch.Tensor):
            scale = scale.detach()
        return self._delta(name) * scale

    def merge(self, names: Iterable[str] | None = None, keep_original: bool = False) -> list[str]:
        """Fold adapters (default: the active ones not yet merged) into the base weight."""
        names = [n for n in (self.active if names is None else names) if n not in self.merged]
        if not names:
            return []
        for name in names:
            self._require(name)
        if self.weight_tied and not self.merged:
            # merging in place would change the module that shares this weight (GPT-2's lm_head tied to wte):
            # merge into a private copy; unmerge puts the shared tensor back, bit for bit
            shared = self._tied_weight = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        if keep_original and self._original_weight is None and not self.merged and self._tied_weight is None:
            base = self.base_layer
            store = isinstance(base, WeightStore)
            self._original_weight = base.weight_snapshot() if store else self.base_weight.detach().clone()
        coefs = {name: self.active.get(name, 1.0) for name in names}
        self._add_to_weight(coefs, sign=1.0)
        self.merged.update(coefs)
        return names

    def unmerge(self) -> list[str]:
        """Take every merged adapter back out of the base weight (bit-exact when merged with keep_original)."""
        if not self.merged:
            return []
        if self._tied_weight is not None:
            self.base_layer.weight, self._tied_weight = self._tied_weight, None
        elif self._original_weight is not None:
            if isinstance(self.base_layer, WeightStore):
                self.base_layer.restore_weight(self._original_weight)
            else:
                with torch.no_grad():
                    self.base_weight.copy_(self._original_weight)
        else:
            self._add_to_weight(self.merged, sign=-1.0)
        names = list(self.merged)
        self.merged.clear()
        self._original_weight = None
        return names

    def _add_to_weight(self, coefs: dict[str, float], sign: float) -> None:
        """weight += sign * sum(coef * delta), accumulated in fp32 and rounded once to the weight's dtype."""
        if isinstance(self.base_layer, WeightStore):
            with torch.no_grad():
                total = sum(self.delta_weight(name) * (sign * coef) for name, coef in coefs.items())
                self.base_layer.add_to_weight_(total)
            return
        w = self.base_weight
        with torch.no_grad():
            acc = w if w.dtype == torch.float32 else w.to(torch.float32)
            for name, coef in coefs.items():
                acc.add_(self.delta_weight(name), alpha=sign * coef)
            if acc is not w:
                w.copy_(acc)

    def train(self, mode: bool = True) -> LoraLayer:
        super().train(mode)
        if self.merge_on_eval:
            if mode:
                self.unmerge()
            elif not self.disabled:
                self.merge()
        return self

    def extra_repr(self) -> str:
        parts = [f"adapters={sorted(self.specs)}", f"active={self.active}"]
        if self.merged:
            parts.append(f"merged={sorted(self.merged)}")
        if self.disabled:
            parts.append("disabled")
        return ", ".join(parts)


def init_A(tensor: torch.Tensor, spec: AdapterSpec) -> None:
    """A's initialisation: Kaiming-uniform as loralib and PEFT, or Gaussian with std 1/r as PEFT's 'gaussian'."""
    with torch.no_grad():
        if spec.init == "gaussian":
            nn.init.normal_(tensor, std=1.0 / spec.r)
        else:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
