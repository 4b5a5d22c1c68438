"""Linear8bit: a Linear layer whose frozen weight is stored as row-wise absmax int8 (bitsandbytes' format).

The 8-bit counterpart of Linear4bit (same base class, same LoRA path: the registry wraps it in the ordinary
LoRA ``Linear``, and the fused LoRA op dequantizes it in forward and backward without keeping a copy).
Half the memory of a 16-bit weight with a quantization error about 16x smaller than NF4's, for when 4 bits
cost too much quality. The state_dict holds bitsandbytes' ``Linear8bitLt`` keys (``weight`` int8, ``SCB``,
``weight_format``), so checkpoints move between the two libraries both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QuantError
from ..quant import dispatch
from ..quant.int8 import dequantize_8bit, quantize_8bit
from ..quant.nf4 import error_stats
from .quantized import FrozenPackedLinear


@dataclass(frozen=True)
class Packed8bit:
    """What the autograd Functions need of the weight: the int8 codes and their row scales (references)."""

    codes: torch.Tensor
    scb: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dispatch.dequantize_8bit(self.codes, self.scb, dtype)

    def dequantize_lowrank(self, dtype: torch.dtype, A: torch.Tensor, B: torch.Tensor,
                           scale: float) -> torch.Tensor | None:
        """``codes * SCB / 127 + scale * B @ A`` in one pass where a kernel does that (CUDA), else None."""
        return dispatch.dequantize_8bit_lowrank(self.codes, self.scb, A, B, scale, dtype)


class Linear8bit(FrozenPackedLinear):
    """``x @ W.T + b`` with W (out_features, in_features) stored as int8 codes and one fp32 scale per row.

    Args: in_features, out_features, bias as nn.Linear; compute_dtype: dtype of the matmul (None: the input's,
    or autocast's); weight_dtype: dtype of the original weight (what ``dequantize()`` returns by default).
    A layer built this way holds zeros; fill it with ``from_linear``, ``set_quantized`` or ``load_state_dict``.
    """

    _STATE_BUFFERS = ("weight", "SCB")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype | None = None, weight_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self.merge_error: dict[str, float] | None = None
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, *, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, where: str = "linear") -> Linear8bit:
        """Quantize an nn.Linear (or any module with a 2-D ``weight`` and optional ``bias``) on ``device``
        (default: where its weight is). The source module is not modified."""
        return cls._build_from(linear, device, where, compute_dtype=compute_dtype)

    def _load_float_weight(self, weight: torch.Tensor, where: str) -> None:
        """A 16/32-bit weight is quantized on the way in."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise QuantError(f"{where}: expected a weight of shape {(self.out_features, self.in_features)}, "
                             f"found {tuple(weight.shape)}")
        self.set_quantized(*quantize_8bit(weight.to(self._device(weight)), where), where)

    def set_quantized(self, codes: torch.Tensor, scb: torch.Tensor, where: str = "weight") -> None:
        expected = (self.out_features, self.in_features)
        if codes.dtype != torch.int8 or tuple(codes.shape) != expected:
            raise QuantError(f"{where}: expected int8 codes of shape {expected}, found {codes.dtype} "
                             f"{tuple(codes.shape)}")
        if tuple(scb.shape) != (self.out_features,) or not scb.dtype.is_floating_point:
            raise QuantError(f"{where}: expected SCB (row scales) of shape {(self.out_features,)}, found "
                             f"{scb.dtype} {tuple(scb.shape)}")
        self.weight = codes
        self.SCB = scb.to(device=codes.device, dtype=torch.float32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in ``dtype`` (default: the original weight's dtype)."""
        return dispatch.dequantize_8bit(self.codes, self.SCB, self.weight_dtype if dtype is None else dtype)

    def packed(self) -> Packed8bit:
        return Packed8bit(self.codes, self.SCB)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.SCB,)

    # ------------------------------------------------------------------ merge hooks (layers.base.WeightStore)
    def add_to_weight_(self, delta: torch.Tensor) -> None:
        """W <- Q(D(W) + delta) in fp32, re-quantized row-wise; records ``merge_error`` against the exact sum."""
        with torch.no_grad():
            exact = dequantize_8bit(self.codes, self.SCB)
            exact += delta.to(device=exact.device, dtype=torch.float32)
            codes, scb = quantize_8bit(exact, "merged weight")
            self.merge_error = error_stats(dequantize_8bit(codes, scb), exact)
            self.set_quantized(codes, scb)

    def weight_snapshot(self) -> dict:
        """A copy of the codes and scales (what ``restore_weight`` puts back bit for bit)."""
        return {"weight": self.codes.clone(), "SCB": self.SCB.clone()}

    def restore_weight(self, snapshot: dict) -> None:
        self.weight, self.SCB = snapshot["weight"], snapshot["SCB"]

    # ------------------------------------------------------------------ state dicts (bitsandbytes' keys)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.codes if keep_vars else self.codes.detach()
        destination[prefix + "SCB"] = self.SCB if keep_vars else self.SCB.detach()
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # "row", as bitsandbytes
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey, skey, fkey, bkey = (prefix + k for k in ("weight", "SCB", "weight_format", "bias"))
        if fkey in state_dict and int(state_dict[fkey]) != 0:
            raise QuantError(f"{fkey}: only bitsandbytes' row-major int8 format (0) is supported, found "
                             f"{int(state_dict[fkey])}")
        if wkey not in state_dict:
            missing_keys.append(wkey)
        elif state_dict[wkey].dtype == torch.int8:
            if skey not in state_dict:
                raise QuantError(f"{wkey}: int8 codes without their row scales {skey!r}")
            device = self._device(state_dict[wkey])
            self.set_quantized(state_dict[wkey].to(device), state_dict[skey].to(device), wkey)
        else:
            self._load_float_weight(state_dict[wkey], wkey)
        self._load_bias(state_dict, bkey, missing_keys)
        if strict:
            ours = (wkey, skey, fkey, bkey)
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 row-wise, compute_dtype={self.compute_dtype}")
