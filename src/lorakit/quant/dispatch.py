"""Choose the implementation: the Triton kernels on CUDA when Triton imports, the reference otherwise.

Set ``LORAKIT_NO_TRITON=1`` to force the reference everywhere (to compare, or to work around a driver issue).
Both paths give the same bits, so the choice never changes results, only speed.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .nf4 import QuantState, dequantize_4bit


@functools.lru_cache(maxsize=1)
def _triton_module():
    if os.environ.get("LORAKIT_NO_TRITON") == "1":
        return None
    try:
        from . import triton_kernels
    except Exception:  # triton missing or broken: the reference still works  # noqa: BLE001
        return None
    return triton_kernels


def triton_available() -> bool:
    """True when the Triton kernels can be used (Triton imports and LORAKIT_NO_TRITON is not set)."""
    return _triton_module() is not None


def _use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and _triton_module() is not None


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize a 4-bit tensor to ``dtype`` (default: the original dtype), on its own device."""
    if _use_triton(packed):
        return _triton_module().dequantize_4bit_triton(packed, state, dtype)
    return dequantize_4bit(packed, state, dtype)


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a 4-bit W; fused (no dequantized copy) on CUDA, dequantize + matmul elsewhere."""
    if _use_triton(x) and len(state.shape) == 2 and state.shape[1] % 2 == 0:
        return _triton_module().gemv_4bit_triton(x, packed, state, bias)
    return F.linear(x, dequantize_4bit(packed, state, x.dtype), None if bias is None else bias.to(x.dtype))
