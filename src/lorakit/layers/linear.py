"""LoRA for Linear layers, GPT-2's Conv1D (weight stored (in, out): fan_in_fan_out) and fused projections."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FusedSpec
from ..errors import AdapterLoadError
from ..functional import lora_delta, lora_linear
from ..kernels.lora_linear import Weight, lora_linear_fused
from .base import AdapterSpec, LoraLayer, init_A


@dataclass(frozen=True)
class FusedCall:
    """What ``lora_linear_fused`` needs for one call: the base weight (a tensor or a packed weight), bias, the
    active adapter's A and B, its scale, the dropout module when it is active, and the weight layout."""

    weight: Weight
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: nn.Module | None
    transposed: bool


class Linear(LoraLayer):
    """``base(x) + scale * B(A(dropout(x)))`` with A: (r, in_features), B: (out_features, r)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, plain_matmul: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        # the base computes exactly x @ W.T + b (registry decides): the fused kernel may then replace it
        self.plain_matmul = plain_matmul
        self.use_fused_kernel = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = self.fused_call(x, args, kwargs)
        if call is None:
            return super().forward(x, *args, **kwargs)
        y = lora_linear_fused(x, call.weight, call.bias, call.A, call.B, call.scale, call.dropout, call.transposed)
        if not isinstance(call.weight, torch.Tensor) and y.dtype != x.dtype:
            y = y.to(x.dtype)  # a packed base returns its input's dtype, under autocast too (as bitsandbytes')
        return y

    def fused_call(self, x: torch.Tensor, args=(), kwargs=None) -> FusedCall | None:
        """The fused kernel's operands for input ``x`` (or one like it: same dtype and device), or None when
        the kernel would not compute exactly what the reference path does.

        Runs for every projection in every forward, so it reads submodules and parameters from their dicts
        (``_modules``, ``_parameters``): through ``nn.Module.__getattr__`` the same lookups cost ~15 Python calls
        a projection, a fifth of lorakit's host time over the frozen model's (bench/dispatch_cost.py)."""
        name = self._fused_adapter(x, args, kwargs)
        operand = self._base_operand(x, name) if name is not None else None
        if operand is None:
            return None
        weight, dtype = operand
        modules = self._modules
        base, drop = modules["base_layer"], modules["lora_dropout"]._modules[name]
        drop = drop if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0 else None
        bias = _parameter(base, "bias")
        if bias is not None and bias.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            bias = bias.to(dtype)  # a packed base keeps its bias in the original dtype and casts it the same way
        return FusedCall(weight, bias, _parameter(modules["lora_A"]._modules[name], "weight"),
                         _parameter(modules["lora_B"]._modules[name], "weight"),
                         self.specs[name].scale * self.active[name], drop, self.fan_in_fan_out)

    def _fused_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The one active adapter when the fused kernel computes exactly what the reference path does."""
        if not (self.use_fused_kernel and self.plain_matmul) or args or kwargs:
            return None
        if self.disabled or self.mixed is not None or self.merged or len(self.active) != 1:
            return None
        name = next(iter(self.active))
        modules = self._modules
        base = modules["base_layer"]
        if name in modules["lora_scale"] or base._forward_hooks or base._forward_pre_hooks:
            return None
        weight = _parameter(base, "weight")
        return None if weight is None or weight.requires_grad else name

    def _base_operand(self, x: torch.Tensor, name: str):
        """(weight, compute dtype) for the fused kernel, or None when the dtypes would make it differ from the
        reference path. A base storing its weight packed (4/8-bit) hands over the packed weight."""
        modules = self._modules
        base = modules["base_layer"]
        if hasattr(type(base), "matmul_operand"):  # the packed-weight protocol of layers.quantized.FrozenPackedLinear
            operand = base.matmul_operand(x)
            if operand is None:
                return None
        else:
            weight = _parameter(base, "weight")
            operand = (weight, weight.dtype)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # autocast computes a dense base in its own dtype
            dense = isinstance(operand[0], torch.Tensor)
            return operand if dense or operand[1] == torch.get_autocast_dtype(device_type) else None
        A = _parameter(modules["lora_A"]._modules[name], "weight")
        return operand if x.dtype == operand[1] == A.dtype else None

    def _create(self, name: str, spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, spec.r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(spec.r, self.out_features, bias=False, dtype=dtype, device=device)

    def _remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def _reset(self, name: str, spec: AdapterSpec) -> None:
        init_A(self.lora_A[name].weight, spec)
        nn.init.zeros_(self.lora_B[name].weight)

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name].weight
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        return lora_linear(self.lora_dropout[name](x), A, self.lora_B[name].weight)

    def _delta(self, name: str) -> torch.Tensor:
        return linear_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.fan_in_fan_out)

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A[name].weight.copy_(tensors["lora_A.weight"])
            self.lora_B[name].weight.copy_(tensors["lora_B.weight"])


class FusedLinear(Linear):
    """A Linear whose output is several projections side by side (q,k,v or gate,up), LoRA on chosen slices.

    One A of shape (r * k, in) feeds all k enabled slices (one matmul); slice j has its own B_j of shape
    (size_j, r). Disabled slices get no update. On disk this is an ordinary PEFT LoRA of rank r * k with a
    block-structured B, so PEFT and vLLM load it unchanged.
    """

    def __init__(self, base_layer: nn.Module, spec: FusedSpec, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)  # plain_matmul False: slices take the reference path
        self.fused = spec
        self.slice_sizes = spec.slice_sizes(self.out_features)
        starts = [sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes))]
        self.slices = [(s, s + n) for s, n in zip(starts, self.slice_sizes)]
        self.enabled = [i for i, on in enumerate(spec.enabled) if on]

    def _create(self, name: str, spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> None:
        k = len(self.enabled)
        rows = sum(self.slice_sizes[i] for i in self.enabled)
        self.lora_A[name] = nn.Linear(self.in_features, spec.r * k, bias=False, dtype=dtype, device=device)
        # B stores the enabled slices' B_j stacked: (sum of enabled sizes, r)
        self.lora_B[name] = nn.Linear(spec.r, rows, bias=False, dtype=dtype, device=device)

    def _blocks(self, name: str):
        """Yield (slice index, A_j, B_j) for every enabled slice."""
        r = self.specs[name].r
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        row = 0
        for j, i in enumerate(self.enabled):
            size = self.slice_sizes[i]
            yield i, A[j * r:(j + 1) * r], B[row:row + size]
            row += size

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name].weight
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        r = self.specs[name].r
        ax = torch.nn.functional.linear(self.lora_dropout[name](x), A)  # (..., r * k), one matmul for all slices
        B = self.lora_B[name].weight
        pieces, row, j = [], 0, 0
        for i, size in enumerate(self.slice_sizes):
            if i in self.enabled:
                pieces.append(torch.nn.functional.linear(ax[..., j * r:(j + 1) * r], B[row:row + size]))
                row += size
                j += 1
            else:
                pieces.append(ax.new_zeros(*ax.shape[:-1], size))
        return torch.cat(pieces, dim=-1)

    def _delta(self, name: str) -> torch.Tensor:
        A = self.lora_A[name].weight
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=A.device)
        for i, A_j, B_j in self._blocks(name):
            start, stop = self.slices[i]
            delta[start:stop] = lora_delta(A_j, B_j, 1.0)
        return delta.T if self.fan_in_fan_out else delta

    def _dense_B(self, name: str) -> torch.Tensor:
        r = self.specs[name].r
        B = self.lora_B[name].weight
        dense = B.new_zeros(self.out_features, r * len(self.enabled))
        for j, (i, _, B_j) in enumerate(self._blocks(name)):
            start, stop = self.slices[i]
            dense[start:stop, j * r:(j + 1) * r] = B_j
        return dense

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self._dense_B(name)}

    def peft_rank_alpha(self, name: str) -> tuple[int, float]:
        spec, k = self.specs[name], len(self.enabled)
        factor = k**0.5 if spec.use_rslora else k  # keeps alpha'/r' (or alpha'/sqrt(r')) equal to ours
        return spec.r * k, spec.alpha * factor

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        r = self.specs[name].r
        dense = tensors["lora_B.weight"]
        mask = torch.zeros(dense.shape, dtype=torch.bool)
        blocks = []
        for j, i in enumerate(self.enabled):
            start, stop = self.slices[i]
            mask[start:stop, j * r:(j + 1) * r] = True
            blocks.append(dense[start:stop, j * r:(j + 1) * r])
        if torch.any(dense[~mask.to(dense.device)] != 0):
            raise AdapterLoadError(
                "lora_B.weight of a fused projection has non-zero entries outside its slices "
                f"(slices {self.slices}, enabled {self.enabled}); it was not saved for this fused layout"
            )
        with torch.no_grad():
            self.lora_A[name].weight.copy_(tensors["lora_A.weight"])
            self.lora_B[name].weight.copy_(torch.cat(blocks, dim=0))


def linear_delta(
    A: torch.Tensor, B: torch.Tensor, fan_in_fan_out: bool, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``scale * B @ A`` (A: (r, in), B: (out, r)) in the base weight's layout, fp32: (out, in), or (in, out)
    when the weight is stored transposed (GPT-2's Conv1D). Shared with lorakit.parametrize."""
    delta = lora_delta(A, B, scale)
    return delta.T if fan_in_fan_out else delta


def linear_features(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like layer, reading the attributes when it has them."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    w = layer.weight
    return (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])


def _parameter(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter (or None) without nn.Module.__getattr__ where it is registered
    as one: the fused path's lookups run for every projection in every forward (Linear.fused_call)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)
