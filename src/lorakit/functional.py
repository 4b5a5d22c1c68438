"""The one truth for LoRA maths. Layers, merge, the parametrization and the kernels all call these.

The update of a layer is ``scale * B @ A`` with A: (r, fan_in) and B: (fan_out, r); the forward pass
never forms it: it computes ``scale * ((x @ A.T) @ B.T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``scale * B @ A``, computed in fp32 (or fp64 when given fp64) and returned in fp32/fp64.

    Leading batch dimensions broadcast (grouped convolutions pass one (A, B) pair per group).
    Merge and unmerge add this to the base weight in fp32 and round once, which keeps bf16
    weights within one bf16 rounding of the original after an unmerge.
    """
    compute = torch.float64 if torch.float64 in (A.dtype, B.dtype) else torch.float32
    delta = B.to(compute) @ A.to(compute)
    if isinstance(scale, torch.Tensor):
        return delta * scale.to(compute)
    return delta * scale


def lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(x @ A.T) @ B.T`` in the adapter's dtype, without forming B @ A. The scale is applied by the caller,
    fused into the addition to the base output."""
    return F.linear(F.linear(x, A), B)


def add_scaled(result: torch.Tensor, update: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``result + scale * update`` in one kernel when the scale is a Python number.

    The update is cast to the result's dtype first (a no-op when the adapter shares the base dtype),
    so activations are never silently upcast to fp32.
    """
    if update.dtype != result.dtype:
        update = update.to(result.dtype)
    if isinstance(scale, torch.Tensor):
        return result + update * scale.to(result.dtype)
    return torch.add(result, update, alpha=scale)
