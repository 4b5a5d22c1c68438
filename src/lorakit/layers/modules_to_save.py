"""ModulesToSave: a module trained in full beside the adapters (a classifier head), one copy per adapter.

Names follow PEFT (``original_module``, ``modules_to_save.<adapter>``) so the saved keys are PEFT's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError
from .base import MixedBatch


class ModulesToSave(nn.Module):
    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False
        self.mixed: MixedBatch | None = None

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise AdapterError(f"adapter {name!r} already has a copy of this module")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active.pop(name, None)

    def set_active(self, adapters: dict[str, float]) -> None:
        self.active = dict(adapters)

    @property
    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        if not self.disabled:
            for name in self.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.mixed is None or self.disabled:
            return self.current(x, *args, **kwargs)
        if x.shape[0] != len(self.mixed):
            raise AdapterError(f"adapter_names has {len(self.mixed)} entries but the batch has {x.shape[0]} rows")
        result = None
        for name, rows in self.mixed.groups(x.device).items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            out = module(x.index_select(0, rows), *args, **kwargs)
            if result is None:
                result = out.new_zeros((x.shape[0], *out.shape[1:]))
            result = result.index_copy(0, rows, out)
        return result
