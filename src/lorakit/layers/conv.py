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
        G, r = self.groups, self.specs[name].r
        A = self.lora_A[name].weight.reshape(G, r // G, -1)  # (G, r/G, in/G * kernel)
        B = self.lora_B[name].weight.reshape(G, self.out_channels // G, r // G)
        delta = lora_delta(A, B, 1.0)  # (G, out/G, in/G * kernel)
        return delta.reshape(self.out_channels, self.in_channels // G, *self.kernel_size)

    # PEFT stores A ungrouped: (r, in, *kernel). Ours is its block-diagonal part.
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self.groups == 1:
            return {"lora_A.weight": A, "lora_B.weight": B}
        G, r = self.groups, self.specs[name].r
        rg, cg = r // G, self.in_channels // G
        full = A.new_zeros(r, self.in_channels, *self.kernel_size)
        for g in range(G):
            full[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg] = A[g * rg:(g + 1) * rg]
        return {"lora_A.weight": full, "lora_B.weight": B}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        A, B = tensors["lora_A.weight"], tensors["lora_B.weight"]
        if self.groups > 1:
            G, r = self.groups, self.specs[name].r
            rg, cg = r // G, self.in_channels // G
            blocks, mask = [], torch.zeros(A.shape[:2], dtype=torch.bool)
            for g in range(G):
                blocks.append(A[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg])
                mask[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg] = True
            if torch.any(A[~mask.to(A.device)] != 0):
                raise AdapterLoadError(
                    f"lora_A.weight of a grouped conv (groups={G}) mixes channel groups; lorakit keeps grouped "
                    "convs mergeable and cannot represent this adapter"
                )
            A = torch.cat(blocks, dim=0)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
