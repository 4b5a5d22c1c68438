"""Linear4bit: a Linear layer whose frozen weight is stored as 4-bit NF4/FP4 codes (the QLoRA base layer).

It is a base layer, not a LoRA layer: ``lorakit.inject`` wraps it in the ordinary ``Linear`` LoRA layer (the
registry lists it as kind "linear"), so adapters on a 4-bit model work exactly as on a 16-bit one.

* Storage: plain buffers, so ``.to(device)`` and ``state_dict`` just work. The state_dict uses bitsandbytes'
  keys (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``): a lorakit 4-bit checkpoint is a
  bitsandbytes checkpoint, and the reverse. Casting the module's dtype never touches the fp32 quant state.
* Forward: dequantize to the compute dtype, then one matmul. With gradients, a custom autograd Function keeps
  only references to the packed weight and dequantizes again in backward: no dequantized copy is saved.
* Merge: the LoRA layer asks this layer to add a delta (``add_to_weight_``): the weight is dequantized in fp32,
  the delta added, and the sum re-quantized; the error of that re-quantization is kept in ``merge_error``.
  ``lorakit.qlora.merge_to_dense`` gives the exact alternative (a 16-bit Linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantError
from ..quant import dispatch
from ..quant.nf4 import (
    NestedState,
    QuantState,
    _check_blocksize,
    _check_quant_type,
    code_book,
    dequantize_4bit,
    dynamic_map,
    error_stats,
    quantize_4bit,
)

_STATE_BUFFERS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
GEMV_MAX_ROWS = 4
"""Inference inputs with at most this many rows use the fused dequant + matmul kernel on CUDA."""


@dataclass(frozen=True)
class Packed4bit:
    """What the autograd Function needs of the weight: packed codes and their state (references only)."""

    packed: torch.Tensor
    state: QuantState

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dispatch.dequantize(self.packed, self.state, dtype)

    def dequantize_lowrank(self, dtype: torch.dtype, A: torch.Tensor, B: torch.Tensor,
                           scale: float) -> torch.Tensor | None:
        """``D(W) + scale * B @ A`` in one pass where a kernel does that (CUDA), else None."""
        return dispatch.dequantize_lowrank(self.packed, self.state, A, B, scale, dtype)


class MatmulPacked(torch.autograd.Function):
    """y = x @ D(W).T + b, with D the dequantization of a frozen packed W (4-bit, 8-bit: anything with
    ``dequantize(dtype)``).

    Backward: dL/dx = dL/dy @ D(W) (W dequantized again: nothing but references is saved, so a layer's
    activations cost no more than with a 16-bit weight); W gets no gradient (frozen); dL/db = dL/dy summed
    over every dimension but the last.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, bias: torch.Tensor | None):
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.weight.dequantize(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class FrozenPackedLinear(nn.Module):
    """What the 4-bit and 8-bit Linears share: a frozen weight stored packed (the buffers in
    ``_STATE_BUFFERS``, which dtype casts of the module never touch), dequantized to the compute dtype for
    each matmul, never kept dequantized for backward. Subclasses give ``packed()`` (an object with
    ``dequantize(dtype)``), ``dequantize``, ``state_tensors`` and the merge hooks."""

    _STATE_BUFFERS: tuple[str, ...] = ()
    in_features: int
    out_features: int
    compute_dtype: torch.dtype | None
    weight_dtype: torch.dtype

    _code_view: tuple[int, torch.Size, torch.dtype] | None = None

    @property
    def codes(self) -> torch.Tensor:
        """The packed codes (uint8 4-bit pairs or int8), whatever dtype ``weight`` is stored in: for FSDP,
        ``store_codes_as_float`` keeps them as a flat float tensor of the same bytes."""
        if self._code_view is None:
            return self.weight
        n_bytes, shape, dtype = self._code_view
        return self.weight.view(dtype)[:n_bytes].view(shape)

    def store_codes_as_float(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Keep the codes' bytes in a frozen 1-D ``dtype`` Parameter (padded to whole elements), as
        bitsandbytes' ``quant_storage`` does: FSDP2 before torch 2.13 shards only floating-point parameters."""
        codes = self.codes.detach()
        flat = codes.reshape(-1)
        step = torch.empty((), dtype=dtype).element_size()
        padded = torch.zeros(-(-flat.numel() // step) * step, dtype=codes.dtype, device=codes.device)
        padded[: flat.numel()] = flat
        self._buffers.pop("weight", None)
        self._parameters.pop("weight", None)
        self._parameters["weight"] = nn.Parameter(padded.view(dtype), requires_grad=False)
        self._code_view = (flat.numel(), codes.shape, codes.dtype)

    def packed(self):
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """The quantization state besides the codes in ``weight`` (for memory accounting)."""
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (and the bias), frozen like this layer."""
        dtype = self.weight_dtype if dtype is None else dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=dtype)
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=self.bias.requires_grad)
        return linear

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.dtype.is_floating_point else self.weight_dtype

    def _small_batch_kernel(self, x: torch.Tensor) -> bool:
        """True where the layer has a faster path of its own for this input (4-bit: the fused GEMV)."""
        return False

    def matmul_operand(self, x: torch.Tensor) -> tuple[object, torch.dtype] | None:
        """For the fused LoRA kernel: the packed weight and the dtype this layer would compute ``x`` in, or
        None where its own forward is better (small-batch inference on a kernel of its own)."""
        if not torch.is_grad_enabled() and self._small_batch_kernel(x):
            return None
        return self.packed(), self._compute_dtype(x)

    def _matmul(self, xin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The inference matmul (no gradient needed): dequantize, then one GEMM."""
        return F.linear(xin, self.dequantize(xin.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        xin = x if x.dtype == dtype else x.to(dtype)
        bias = None if self.bias is None else (self.bias if self.bias.dtype == dtype else self.bias.to(dtype))
        needs_grad = torch.is_grad_enabled() and (xin.requires_grad or (bias is not None and bias.requires_grad))
        y = MatmulPacked.apply(xin, self.packed(), bias) if needs_grad else self._matmul(xin, bias)
        return y if y.dtype == x.dtype or not x.dtype.is_floating_point else y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``/``.half()`` must not round the quant state: state buffers only change device."""
        held = {n: self._buffers[n] for n in self._STATE_BUFFERS if self._buffers.get(n) is not None}
        for n in held:
            self._buffers[n] = None
        # codes kept as float bytes for FSDP (store_codes_as_float) are a Parameter: they only move too
        stored = self._parameters.get("weight") if self._code_view is not None else None
        if stored is not None:
            self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in held.items():
                moved = fn(t)
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
            if stored is not None:
                moved = fn(stored.data)
                moved = moved if moved.dtype == stored.dtype else stored.data.to(moved.device)
                self._parameters["weight"] = nn.Parameter(moved, requires_grad=False)
        return self

    def _device(self, incoming: torch.Tensor) -> torch.device:
        """Where loaded state goes: this layer's device, or the incoming tensor's while the layer is on meta."""
        return incoming.device if self.weight.device.type == "meta" else self.weight.device

    @classmethod
    def _build_from(cls, linear: nn.Module, device, where: str, **settings):
        """A layer of this class holding ``linear``'s weight quantized (``_load_float_weight``) and its bias."""
        weight = linear.weight
        if weight.dim() != 2:
            raise QuantError(f"{where}: expected a 2-D weight, found shape {tuple(weight.shape)}")
        device = weight.device if device is None else torch.device(device)
        out_f, in_f = weight.shape
        bias = getattr(linear, "bias", None)
        layer = cls(in_f, out_f, bias=bias is not None, weight_dtype=weight.dtype, device="meta", **settings)
        layer._load_float_weight(weight.detach().to(device), where)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device).clone(), requires_grad=False)
        return layer

    def _load_float_weight(self, weight: torch.Tensor, where: str) -> None:
        raise NotImplementedError

    def _load_bias(self, state_dict: dict, key: str, missing_keys: list) -> None:
        if self.bias is None:
            return
        if key not in state_dict:
            missing_keys.append(key)
            return
        b = state_dict[key]
        if tuple(b.shape) != (self.out_features,):
            raise QuantError(f"{key}: expected shape {(self.out_features,)}, found {tuple(b.shape)}")
        with torch.no_grad():
            self.bias.copy_(b)


class Linear4bit(FrozenPackedLinear):
    """``x @ W.T + b`` with W (out_features, in_features) stored in 4 bits.

    Args:
        in_features, out_features, bias: as nn.Linear.
        blocksize: values per absmax block (64: the QLoRA default).
        quant_type: "nf4" or "fp4".
        double_quant: quantize the absmax values too (8-bit, blocks of 256).
        compute_dtype: dtype of the matmul; None uses the input's dtype (or autocast's).
        weight_dtype: dtype of the original weight (what ``dequantize()`` returns by default).
        device: where the buffers live.

    A layer built this way holds zeros; fill it with ``from_linear``, ``set_quantized`` or ``load_state_dict``.
    """

    _STATE_BUFFERS = _STATE_BUFFERS

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 weight_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        _check_quant_type(quant_type, "Linear4bit")
        _check_blocksize(blocksize, "Linear4bit")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.blocksize, self.quant_type, self.double_quant = blocksize, quant_type, bool(double_quant)
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self.use_gemv = True
        self.merge_error: dict[str, float] | None = None
        n = self.in_features * self.out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("quant_map", code_book(quant_type, device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // 256), device=device))
            self.register_buffer("nested_quant_map", dynamic_map(device))
            self.register_buffer("nested_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
            for name in ("nested_absmax", "nested_quant_map", "nested_offset"):
                self.register_buffer(name, None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device),
                                 requires_grad=False) if bias else None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(cls, linear: nn.Module, *, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, where: str = "linear") -> Linear4bit:
        """Quantize an nn.Linear (or any module with a 2-D ``weight`` and optional ``bias``) on ``device``
        (default: where its weight is). The source module is not modified."""
        return cls._build_from(linear, device, where, blocksize=blocksize, quant_type=quant_type,
                               double_quant=double_quant, compute_dtype=compute_dtype)

    def set_quantized(self, packed: torch.Tensor, state: QuantState, where: str = "weight") -> None:
        """Install packed codes and their state (moved to the codes' device); they must fit this layer's shape."""
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            raise QuantError(f"{where}: the 4-bit state is for a weight of shape {tuple(state.shape)}, but this "
                             f"layer's weight is {expected} (out_features, in_features)")
        n_bytes = (state.numel + 1) // 2
        if packed.dtype != torch.uint8 or packed.numel() != n_bytes:
            raise QuantError(f"{where}: expected {n_bytes} packed uint8 bytes for shape {expected}, found "
                             f"{packed.numel()} of dtype {packed.dtype}")
        device = packed.device
        state = state.to(device)
        self.weight = packed.reshape(n_bytes, 1)
        self.absmax = state.absmax
        self.quant_map = state.code
        nested = state.nested
        self.nested_absmax = None if nested is None else nested.absmax
        self.nested_quant_map = None if nested is None else nested.code
        self.nested_offset = None if nested is None else nested.offset.reshape(())
        self.blocksize, self.quant_type, self.double_quant = state.blocksize, state.quant_type, nested is not None
        self.weight_dtype = state.dtype

    @property
    def quant_state(self) -> QuantState:
        nested = None
        if self.nested_absmax is not None:
            nested = NestedState(self.nested_absmax, self.nested_quant_map, self.nested_offset)
        return QuantState((self.out_features, self.in_features), self.weight_dtype, self.blocksize,
                          self.quant_type, self.absmax, self.quant_map, nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default: the original weight's dtype)."""
        return dispatch.dequantize(self.codes, self.quant_state, dtype)

    def packed(self) -> Packed4bit:
        return Packed4bit(self.codes, self.quant_state)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.quant_state.tensors())

    def _small_batch_kernel(self, x: torch.Tensor) -> bool:
        return self.use_gemv and x.is_cuda and x.numel() <= GEMV_MAX_ROWS * self.in_features

    def _matmul(self, xin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._small_batch_kernel(xin):
            return dispatch.gemv_4bit(xin, self.codes, self.quant_state, bias)
        return super()._matmul(xin, bias)

    # ------------------------------------------------------------------ merge hooks (layers.base.WeightStore)
    def add_to_weight_(self, delta: torch.Tensor) -> None:
        """W <- Q(D(W) + delta): add in fp32, re-quantize with the same settings; records ``merge_error``
        (mean/max absolute and relative Frobenius error of the re-quantized weight against the exact sum)."""
        with torch.no_grad():
            exact = dequantize_4bit(self.codes, self.quant_state, torch.float32)
            exact += delta.to(device=exact.device, dtype=torch.float32)
            packed, state = quantize_4bit(exact, self.blocksize, self.quant_type, self.double_quant, "merged weight")
            self.merge_error = error_stats(dequantize_4bit(packed, state, torch.float32), exact)
            self.set_quantized(packed, QuantState(state.shape, self.weight_dtype, state.blocksize,
                                                  state.quant_type, state.absmax, state.code, state.nested))

    def weight_snapshot(self) -> dict:
        """A copy of the 4-bit weight and its state (what ``restore_weight`` puts back bit for bit)."""
        buffers = {n: (None if getattr(self, n) is None else getattr(self, n).clone()) for n in _STATE_BUFFERS}
        return {"buffers": buffers, "meta": (self.blocksize, self.quant_type, self.double_quant)}

    def restore_weight(self, snapshot: dict) -> None:
        for name, tensor in snapshot["buffers"].items():
            setattr(self, name, tensor)
        self.blocksize, self.quant_type, self.double_quant = snapshot["meta"]

    # ------------------------------------------------------------------ state dicts
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.codes if keep_vars else self.codes.detach()
        for key, tensor in self.quant_state.as_bnb_dict().items():
            destination[f"{prefix}weight.{key}"] = tensor if keep_vars else tensor.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        ours = [k for k in state_dict if k.startswith(prefix)]  # no child modules: every such key is ours
        extra = {k[len(wkey) + 1:]: state_dict[k] for k in ours if k.startswith(wkey + ".")}
        if wkey not in state_dict:
            missing_keys.append(wkey)
        elif extra:
            state = QuantState.from_bnb_dict(extra, where=wkey)
            device = self._device(state_dict[wkey])
            self.set_quantized(state_dict[wkey].to(device), state.to(device), wkey)
        else:
            self._load_float_weight(state_dict[wkey], wkey)
        bkey = prefix + "bias"
        self._load_bias(state_dict, bkey, missing_keys)
        if strict:
            unexpected_keys.extend(k for k in ours if k not in (wkey, bkey) and not k.startswith(wkey + "."))

    def _load_float_weight(self, weight: torch.Tensor, where: str) -> None:
        """A 16/32-bit weight loaded into a 4-bit layer is quantized with the layer's settings."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise QuantError(f"{where}: expected a weight of shape {expected} (or a 4-bit state), found "
                             f"{tuple(weight.shape)} of dtype {weight.dtype}")
        packed, state = quantize_4bit(weight.to(self._device(weight)), self.blocksize, self.quant_type,
                                      self.double_quant, where)
        self.set_quantized(packed, state, where)

    def extra_repr(self) -> str:
        bits = 8 * (self.codes.numel() + self.quant_state.nbytes) / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, bits_per_param={bits:.3f}")


def bits_per_param(layer: Linear4bit) -> float:
    """Storage of the weight (codes + state) per weight value, in bits."""
    return 8 * (layer.codes.numel() + layer.quant_state.nbytes) / math.prod((layer.out_features, layer.in_features))
