"""Row-wise absmax int8 weights in bitsandbytes' format (the base of an 8-bit LoRA, as ``load_in_8bit``).

Each row of W (one output feature) keeps its largest magnitude ``SCB[row]`` in fp32 and its values as
``round(W * (127 / SCB))`` in int8; dequantization is ``codes * SCB * (1/127)``. The arithmetic is the one
bitsandbytes' ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` use (same promotions, same order of
operations, the same fp32 constant for 1/127), so a weight quantized by either dequantizes to the same bits
in the other. Unlike bitsandbytes, an all-zero row is stored as zeros instead of 0 * inf = NaN codes.
Outlier decomposition (LLM.int8()'s threshold) is an activation-side trick for int8 matmuls; lorakit
dequantizes the weight and runs the matmul in the compute dtype, so it has none.
"""

from __future__ import annotations

import torch

from ..errors import QuantError
from .nf4 import add_lowrank, check_weight

INV_127 = 7.874015718698502e-3  # fp32(1/127), as bitsandbytes writes it


def quantize_8bit(weight: torch.Tensor, where: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), SCB fp32 (out,)) of a 2-D floating-point weight, on the weight's device."""
    check_weight(weight, where)
    if weight.dim() != 2:
        raise QuantError(f"{where}: expected a 2-D weight, found shape {tuple(weight.shape)}")
    w = weight.detach()
    scb = w.abs().amax(dim=1).float()
    factor = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))  # zero rows: codes 0, not NaN
    codes = torch.round(w * factor.unsqueeze(-1)).to(torch.int8)
    return codes, scb


def dequantize_8bit(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight: ``codes * SCB * (1/127)`` computed in fp32, then cast to ``dtype``."""
    if codes.dtype != torch.int8 or codes.dim() != 2 or scb.shape != (codes.shape[0],):
        raise QuantError(f"expected int8 codes (out, in) and SCB (out,), found {codes.dtype} "
                         f"{tuple(codes.shape)} and {tuple(scb.shape)}")
    out = codes * scb.float().view(-1, 1) * INV_127
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize_8bit_lowrank(codes: torch.Tensor, scb: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dtype(codes * SCB / 127 + scale * B @ A)``, one rounding at the end: the reference of
    ``triton_kernels.dequantize_8bit_lowrank_triton``; with B == 0 it equals ``dequantize_8bit``."""
    return add_lowrank(dequantize_8bit(codes, scb, torch.float32), A, B, scale, dtype)


__all__ = ["INV_127", "dequantize_8bit", "dequantize_8bit_lowrank", "quantize_8bit"]
