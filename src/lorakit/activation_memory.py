"""Count what a forward pass stores for backward: the activation memory of a training step.

A LoRA step's peak memory is the weights, the adapters and their optimizer state, plus the tensors autograd
holds between forward and backward, plus short-lived buffers. Only the middle part depends on how the LoRA
layers compute (lorakit.blocks exists to shrink it), so it is worth counting exactly and on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def saved_bytes(model: nn.Module, run: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` runs (views of one storage
    count once), ``model``'s parameters and buffers excluded. Works under FakeTensorMode too, where each fake
    storage is a distinct StorageImpl: a large model is counted without its memory or its compute."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    # the weights' storages as they are after the run: a first forward may move weights into new storages
    # (lorakit.widen), and the freed old ones' addresses may then be reused by activations
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    return sum(n for key, n in seen.items() if key not in weights)
