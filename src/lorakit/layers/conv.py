"""LoRA for Conv1d/2d/3d: A is a conv with the base kernel, stride, padding and groups; B is a 1x1 conv.

With ``groups = G`` both A and B are grouped, so the update is itself a grouped conv with the base's
weight shape (out, in / G, *kernel) and merges exactly. The rank must be divisible by G.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterLoadError, ConfigError
from ..functional import lora_delta
from .base import AdapterSpec, LoraLayer, init_A

_CONV_BY_DIM = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


class Conv(LoraLayer):
    def __init__(self, base_layer: nn.modules.conv._ConvNd):
        super().__init__(base_layer)
        self.conv_cls = _CONV_BY_DIM[base_layer.weight.dim()]
        self.in_channels = base_layer.in_channels
        self.out_channels = base_layer.out_channels
        self.groups = base_layer.groups
        self.kernel_size = tuple(base_layer.kernel_size)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> None:
        base, G = self.base_layer, self.groups
        if spec.r % G:
            raise ConfigError(
                f"a conv with groups={G} needs a rank divisible by {G} (so the update stays a grouped conv "
                f"that can merge), got r={spec.r}"
            )
        self.lora_A[name] = self.conv_cls(
            self.in_channels, spec.r, base.kernel_size, base.stride, base.padding, base.dilation,
            groups=G, bias=False, padding_mode=base.padding_mode, dtype=dtype, device=device,
        )
        self.lora_B[name] = self.conv_cls(spec.r, self.out_channels, 1, groups=G, bias=False, dtype=dtype, device=device)

    def _remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def _reset(self, name: str, spec: AdapterSpec) -> None:
        init_A(self.lora_A[name].weight, spec)
        nn.init.zeros_(self.lora_B[name].weight)

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name]
        if x.dtype != A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.weight.dtype)
        return self.lora_B[name](A(self.lora_dropout[name](x)))

    def _delta(self, name: str) -> torch.Tensor:
        return conv_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.groups)

    # PEFT stores A ungrouped: (r, in, *kernel). Ours is its block-diagonal part.
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return {"lora_A.weight": conv_A_to_peft(A, self.groups, self.in_channels), "lora_B.weight": B}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        A = conv_A_from_peft(tensors["lora_A.weight"], self.groups, self.specs[name].r)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(tensors["lora_B.weight"])


# Shared with lorakit.parametrize: the conv maths and the PEFT layout live here once.
def conv_delta(A: torch.Tensor, B: torch.Tensor, groups: int, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``scale * B @ A`` of a conv adapter in the base weight's layout (out, in / G, *kernel), fp32.

    A: (r, in / G, *kernel), B: (out, r / G, 1, ...). Each group g multiplies its own (out / G, r / G) block of
    B with its (r / G, in / G * kernel) block of A, so the update is a grouped conv like the base.
    """
    G, r, out = groups, A.shape[0], B.shape[0]
    delta = lora_delta(A.reshape(G, r // G, -1), B.reshape(G, out // G, r // G), scale)  # (G, out/G, in/G * k)
    return delta.reshape(out, *A.shape[1:])


def conv_A_to_peft(A: torch.Tensor, groups: int, in_channels: int) -> torch.Tensor:
    """A in PEFT's on-disk layout (r, in, *kernel): the grouped A placed block-diagonally (itself when G = 1)."""
    if groups == 1:
        return A
    G, r = groups, A.shape[0]
    rg, cg = r // G, in_channels // G
    full = A.new_zeros(r, in_channels, *A.shape[2:])
    for g in range(G):
        full[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg] = A[g * rg:(g + 1) * rg]
    return full


def conv_A_from_peft(A: torch.Tensor, groups: int, r: int) -> torch.Tensor:
    """Inverse of conv_A_to_peft; raises AdapterLoadError when A mixes channel groups (not mergeable)."""
    if groups == 1:
        return A
    G = groups
    rg, cg = r // G, A.shape[1] // G
    blocks, mask = [], torch.zeros(A.shape[:2], dtype=torch.bool)
    for g in range(G):
        blocks.append(A[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg])
        mask[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg] = True
    if torch.any(A[~mask.to(A.device)] != 0):
        raise AdapterLoadError(
            f"lora_A.weight of a grouped conv (groups={G}) mixes channel groups; lorakit keeps grouped "
            "convs mergeable and cannot represent this adapter"
        )
    return torch.cat(blocks, dim=0)
