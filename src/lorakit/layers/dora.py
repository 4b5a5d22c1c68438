"""DoRA (weight-decomposed LoRA, Liu et al. 2024) for Linear, GPT-2 Conv1D, fused projections and Conv layers.

DoRA writes the adapted weight as a trainable magnitude per output row times a normalized direction:

    W' = m * (W + s * B @ A) / ||W + s * B @ A||        (norm of every output row, treated as a constant)

so, with c = m / ||W + s * B @ A|| (one factor per output row), the layer computes

    y = base(x) + (c - 1) * (W @ x) + c * s * B @ A @ x

which is the expression PEFT evaluates, term for term (with dropout active, ``W @ x`` is recomputed on the
dropped-out input, as in PEFT). At creation B = 0 and m = ||W||, so c = 1 and the layer computes its base
exactly. The magnitude lives in ``lora_magnitude_vector[name]`` with PEFT's shape ((out,) for linear layers,
(1, out, 1, ...) for convolutions) and is saved under PEFT's key ``<path>.lora_magnitude_vector``.

The DoRA classes subclass the plain families, so a DoRA layer also hosts plain LoRA adapters (``spec.use_dora``
is per adapter). With several adapters active, each DoRA adapter contributes ``weight * ((c - 1) W x + c s B A x)``
relative to the unmerged base weight. Merging folds ``W <- W + sum_i w_i ((c_i - 1) W + c_i s_i B_i A_i)`` in fp32
and remembers each c_i, so unmerging inverts exactly that map (bit-exact with ``keep_original=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError, MergeError
from ..functional import add_scaled, lora_linear
from .base import AdapterSpec, LoraLayer, WeightStore
from .conv import Conv
from .linear import FusedLinear, Linear
from .quantized import FrozenPackedLinear


class DoraLayer(LoraLayer):
    """DoRA on top of a LoRA layer family; put it first in the bases: ``class DoraLinear(DoraLayer, Linear)``.

    The family provides the layout (``_delta``, the low-rank product); this class adds the magnitude, the
    DoRA forward and the DoRA merge. Families override ``_lowrank``, ``_base_matmul`` and ``_row_view``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_dora_state()

    def _init_dora_state(self) -> None:
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_merged: dict[str, torch.Tensor] = {}  # merged DoRA adapter -> its factor c (fp32, (out,))

    # ------------------------------------------------------------------ family hooks
    def _lowrank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) without dropout (the caller applies it once, shared with the base term)."""
        raise NotImplementedError

    def _base_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's product with ``weight`` (base layout), without bias."""
        raise NotImplementedError

    def _row_view(self, factor: torch.Tensor, like: torch.Tensor, weight_layout: bool) -> torch.Tensor:
        """``factor`` (out,) shaped to broadcast over the output dimension of an output (or of the weight)."""
        raise NotImplementedError

    def _peft_magnitude_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def is_dora(self, name: str) -> bool:
        return self.specs[name].use_dora

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        super().add_adapter(name, spec)  # PiSSA (if asked) has already rewritten the base weight here
        if spec.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(name, self.dense_weight())  # = ||W|| while B is zero
            # fp32 even for 16-bit adapters (it is one number per row): the forward then divides the very same
            # fp32 norm by itself, c = 1 exactly, and a fresh DoRA adapter changes nothing in bf16 too
            dtype = torch.float64 if self.adapter_dtype(spec) == torch.float64 else torch.float32
            self.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(self._peft_magnitude_shape()).to(dtype))

    def _remove(self, name: str) -> None:
        super()._remove(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._dora_merged.pop(name, None)

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().peft_state(name)
        if self.is_dora(name):
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft_state(name, tensors)
        if self.is_dora(name):
            with torch.no_grad():
                self.lora_magnitude_vector[name].copy_(tensors["lora_magnitude_vector"])

    # ------------------------------------------------------------------ maths
    def dense_weight(self) -> torch.Tensor:
        """The base weight in its own layout as fp32 (dequantized for a 4-bit or 8-bit base). Not a copy for fp32 weights."""
        base = self.base_layer
        if isinstance(base, FrozenPackedLinear):
            return base.dequantize(torch.float32)
        return base.weight.detach().to(torch.float32)

    def _weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """||W + s * B @ A|| of every output row, fp32, no gradient (DoRA paper, section 4.3)."""
        scale = self.scale(name)
        scale = scale.detach() if isinstance(scale, torch.Tensor) else scale
        with torch.no_grad():
            full = weight + self._delta(name) * scale
            return self._row_norm(full)

    def _row_norm(self, full: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(full.flatten(1), dim=1)

    def factor(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """c = m / ||W + s B A|| per output row (fp32; carries the magnitude's gradient)."""
        weight = self.dense_weight() if weight is None else weight
        return self.lora_magnitude_vector[name].reshape(-1).float() / self._weight_norm(name, weight)

    def _dora_term(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """(c - 1) * W x + c * s * B A x for one adapter, in the output's dtype."""
        weight = self.dense_weight()
        c = self.factor(name, weight)
        drop = self.lora_dropout[name]
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            x = drop(x)
            base_nb = self._base_matmul(x, weight)
        else:
            base_nb = base_out
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_nb = base_out - self._row_view(bias, base_out, weight_layout=False).to(base_out.dtype)
        lora = self._lowrank(name, x)
        scale = self.scale(name)
        cv = self._row_view(c, base_nb, weight_layout=False)
        term = (cv - 1) * base_nb + cv * (lora * scale)
        return term.to(base_out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging this adapter alone adds to the (unmerged) base weight, fp32: for DoRA
        (c - 1) * W + c * s * B @ A; for a plain adapter s * B @ A."""
        if not self.is_dora(name):
            return super().delta_weight(name)
        self._require(name)
        with torch.no_grad():
            weight = self.dense_weight()
            cv = self._row_view(self.factor(name, weight), weight, weight_layout=True)
            return (cv - 1) * weight + cv * super().delta_weight(name)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or (self.mixed is None and not self._unmerged_dora()):
            return super().forward(x, *args, **kwargs)  # plain adapters only: the family's path (fused kernel)
        result = self.base_layer(x, *args, **kwargs)
        if self.mixed is not None:
            return self._mixed_forward(x, result)
        if self.merged:
            raise MergeError(
                f"DoRA adapters {self._unmerged_dora()} are active but not merged while {sorted(self.merged)} "
                "are merged: DoRA is defined relative to the unmerged base weight; merge all active adapters or none"
            )
        base = result
        for name, weight in self.active.items():
            if self.is_dora(name):
                term = self._dora_term(name, x, base)
                result = result + (term if weight == 1.0 else term * weight)
            else:
                result = add_scaled(result, self._update(name, x), self._coef(name, weight))
        return result

    def _unmerged_dora(self) -> list[str]:
        return [n for n in self.active if n not in self.merged and self.is_dora(n)]

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not any(self.is_dora(n) for n in self.specs):
            return super()._mixed_forward(x, result)
        if self.merged:
            raise MergeError("a mixed-adapter batch needs unmerged adapters; unmerge first")
        mixed = self.mixed
        if x.shape[0] != len(mixed):
            raise AdapterError(
                f"adapter_names has {len(mixed)} entries but the batch has {x.shape[0]} rows (dim 0 of the input)"
            )
        base = result
        for name, rows in mixed.groups(x.device).items():
            if name is None or name not in self.specs:
                continue
            xr = x.index_select(0, rows)
            if self.is_dora(name):
                update = self._dora_term(name, xr, base.index_select(0, rows))
                result = result.index_add(0, rows, update)
            else:
                update = self._update(name, xr).to(result.dtype)
                coef = self.scale(name)
                if isinstance(coef, torch.Tensor):
                    result = result.index_add(0, rows, update * coef.to(result.dtype))
                else:
                    result = result.index_add(0, rows, update, alpha=coef)
        return result

    # ------------------------------------------------------------------ merge
    def merge(self, names=None, keep_original: bool = False) -> list[str]:
        names = [n for n in (self.active if names is None else names) if n not in self.merged]
        if names and self.merged and any(self.is_dora(n) for n in [*names, *self.merged]):
            # DoRA factors are defined on the unmerged weight: take everything out, fold all in one pass
            previous = list(self.merged)
            keep = keep_original or self._original_weight is not None
            self.unmerge()
            super().merge([*previous, *names], keep_original=keep)
            return names
        return super().merge(names, keep_original=keep_original)

    def unmerge(self) -> list[str]:
        names = super().unmerge()
        self._dora_merged.clear()  # restored from a copy (keep_original, tied weight): the factors are stale
        return names

    def _add_to_weight(self, coefs: dict[str, float], sign: float) -> None:
        """Merge (sign > 0, from the unmerged weight) or unmerge (sign < 0, all merged adapters) in fp32."""
        if not any(self.is_dora(n) for n in coefs):
            return super()._add_to_weight(coefs, sign)
        with torch.no_grad():
            weight = self.dense_weight().clone()
            if sign > 0:
                new = weight.clone()
                for name, coef in coefs.items():
                    delta = LoraLayer.delta_weight(self, name)
                    if self.is_dora(name):
                        c = self.factor(name, weight)
                        self._dora_merged[name] = c
                        cv = self._row_view(c, weight, weight_layout=True)
                        new += coef * ((cv - 1) * weight + cv * delta)
                    else:
                        new += coef * delta
            else:  # W' = W * (1 + sum w (c - 1)) + sum w c s B A (+ plain deltas): solve for W
                new = weight.clone()
                denom = torch.ones(weight.shape[0] if not self._transposed() else weight.shape[1],
                                   dtype=torch.float32, device=weight.device)
                for name, coef in coefs.items():
                    delta = LoraLayer.delta_weight(self, name)
                    if self.is_dora(name):
                        c = self._dora_merged.pop(name)
                        new -= coef * self._row_view(c, weight, weight_layout=True) * delta
                        denom += coef * (c - 1)
                    else:
                        new -= coef * delta
                new /= self._row_view(denom, weight, weight_layout=True)
            self._write_weight(new, weight)

    def _transposed(self) -> bool:
        return False

    def _write_weight(self, new: torch.Tensor, old: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, WeightStore):
            base.add_to_weight_(new - old)
        else:
            self.base_weight.copy_(new)


class DoraLinear(DoraLayer, Linear):
    """DoRA on a Linear (or a 4-bit Linear, or GPT-2's Conv1D with fan_in_fan_out)."""

    def _fused_adapter(self, x, args, kwargs) -> str | None:
        name = super()._fused_adapter(x, args, kwargs)
        return None if name is not None and self.is_dora(name) else name  # the fused kernel is plain LoRA only

    def _lowrank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name].weight
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        return lora_linear(x, A, self.lora_B[name].weight)

    def _base_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.to(x.dtype)
        return F.linear(x, weight.T if self.fan_in_fan_out else weight)

    def _transposed(self) -> bool:
        return self.fan_in_fan_out

    def _row_norm(self, full: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(full, dim=0 if self.fan_in_fan_out else 1)

    def _row_view(self, factor: torch.Tensor, like: torch.Tensor, weight_layout: bool) -> torch.Tensor:
        if weight_layout and not self.fan_in_fan_out:
            return factor.reshape(-1, 1)
        return factor.reshape(-1)  # outputs (..., out) and a transposed weight (in, out): the last dimension

    def _peft_magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)


class DoraFusedLinear(DoraLinear, FusedLinear):
    """DoRA on a fused projection: one magnitude per output row of the whole fused weight (as PEFT sees it)."""

    def _lowrank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name].weight
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        return F.linear(F.linear(x, A), self._dense_B(name))


class DoraConv(DoraLayer, Conv):
    """DoRA on Conv1d/2d/3d: one magnitude per output channel, stored (1, out, 1, ...) as PEFT stores it."""

    def _lowrank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name]
        if x.dtype != A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.weight.dtype)
        return self.lora_B[name](A(x))

    def _base_matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, weight.to(x.dtype), None)

    def _row_view(self, factor: torch.Tensor, like: torch.Tensor, weight_layout: bool) -> torch.Tensor:
        spatial = len(self.kernel_size)
        if weight_layout:
            return factor.reshape(-1, *(1,) * (like.dim() - 1))
        batched = like.dim() == spatial + 2
        return factor.reshape(*((1,) if batched else ()), -1, *(1,) * spatial)

    def _peft_magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_channels) + (1,) * len(self.kernel_size)


_UPGRADES: dict[type, type] = {Linear: DoraLinear, FusedLinear: DoraFusedLinear, Conv: DoraConv}


def upgrade_to_dora(layer: LoraLayer, path: str) -> DoraLayer:
    """A DoRA layer of the same family holding ``layer``'s base and adapters (its own containers, the same
    tensors). ``layer`` itself is left as it was, so an inject that fails later can simply drop the new one."""
    cls = _UPGRADES.get(type(layer))
    if cls is None:
        raise ConfigError(
            f"use_dora=True, but {path!r} is a {type(layer).__name__}: lorakit has DoRA for Linear, GPT-2 Conv1D, "
            "fused projections and Conv layers"
        )
    new = cls.__new__(cls)
    for key, value in layer.__dict__.items():
        if key == "_modules":
            value = {k: _own_container(m) for k, m in value.items()}
        elif isinstance(value, (dict, list, set)):
            value = type(value)(value)
        new.__dict__[key] = value
    new._init_dora_state()
    return new


def _own_container(module: nn.Module | None) -> nn.Module | None:
    if isinstance(module, nn.ModuleDict):
        return nn.ModuleDict(dict(module.items()))
    if isinstance(module, nn.ParameterDict):
        return nn.ParameterDict(dict(module.items()))
    return module
