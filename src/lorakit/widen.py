"""Frozen weights stored widened for kernels.shared_input: W (out, in) as the first ``in`` columns of an
(out, in + R + pad) buffer whose other columns hold s*B for one projection of a group and zeros for the rest
(the other projections' rank columns and any padding, PAD_TO).

The weight itself becomes a strided view of the buffer (``weight.data``), so there is no second copy of W,
and everything else that reads the weight (state_dict, merge, the per-layer path) sees the same values.
``Widened`` remembers which buffers it made; a weight moved since (``.to()``, a load that replaced it) is
widened again on its next use, and ``release`` makes the weights plain contiguous tensors again.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class Widened:
    """The widened weights of one group of projections (one per instance of the group's owner)."""

    def __init__(self):
        self.records: dict[int, tuple] = {}  # id(weight) -> (weakref, buffer storage pointer, ranks)
        # the group's input made in place by the norm before it (blocks.WideNorm): how many columns wider than
        # the input the norm should make its buffer (0: not at all), and a weak reference to its last output
        self.input_extra = 0
        self.norm_output: weakref.ref | None = None

    def __getstate__(self) -> dict:
        """Pickled (torch.save of a whole model, deepcopy) without the weak references, which do not pickle: a copy
        widens its weights again on first use (a copy's weights are not the ones recorded anyway)."""
        return {**self.__dict__, "records": {}, "norm_output": None}

    def holds(self, weight: nn.Parameter, ranks: tuple[int, ...]) -> bool:
        """Whether ``weight`` is already widened for ``ranks`` (its buffer made here, not moved since). Read from
        the parameter itself, not ``weight.data`` (an op of its own: this runs in every forward)."""
        width = padded_width(weight.shape[1], ranks)
        record = self.records.get(id(weight))
        return (record is not None and record[0]() is weight and record[1] == weight.untyped_storage().data_ptr()
                and weight.stride() == (width, 1) and weight.storage_offset() == 0)

    def buffer(self, weight: nn.Parameter, ranks: tuple[int, ...], slot: int, B: torch.Tensor,
               scale: float) -> torch.Tensor:
        """The (out, padded_width(in, ranks)) buffer of ``weight`` with ``scale * B`` in projection ``slot``'s rank
        columns. The first call moves the weight into it; later calls only write s*B, through an alias that
        leaves autograd's version counters alone (those columns are read by the shared-input op only)."""
        out_features, in_features = weight.shape
        width = padded_width(in_features, ranks)
        record = self.records.get(id(weight))
        if not self.holds(weight, ranks):
            data = weight.data
            with torch.inference_mode(False):  # a first call under inference_mode must not make W an inference tensor
                buffer = torch.zeros(out_features, width, dtype=data.dtype, device=data.device)
                buffer[:, :in_features].copy_(data)
                weight.data = buffer[:, :in_features]
            record = None
        data = weight.data  # an alias with a version counter of its own: the s*B writes leave W's alone
        if record is not None and record[2] != ranks:  # same width, another split: clear the old s*B columns
            data.as_strided((out_features, width - in_features), (width, 1), in_features).zero_()
        if record is None or record[2] != ranks:
            self.records[id(weight)] = (weakref.ref(weight), data.untyped_storage().data_ptr(), ranks)
        lo = in_features + sum(ranks[:slot])
        torch.mul(B.detach(), scale, out=data.as_strided((out_features, ranks[slot]), (width, 1), lo))
        return data.as_strided((out_features, width), (width, 1))

    def clear(self) -> None:
        self.records.clear()


PAD_TO = 1
"""Round the widened width up to a multiple of this (64: rows of whole 128-byte lines in 16 bits, no more K
tiles than unpadded). 1, no padding, is the measured setting (docs/speed.md); 64 is an untested A/B option."""


def padded_width(in_features: int, ranks: tuple[int, ...]) -> int:
    """in + sum(ranks), rounded up to a multiple of PAD_TO."""
    return -(-(in_features + sum(ranks)) // PAD_TO) * PAD_TO


def release(weights) -> None:
    """Make ``weights`` plain contiguous tensors again (a widened one is a strided view of its buffer)."""
    for weight in weights:
        if isinstance(weight, torch.Tensor) and not weight.data.is_contiguous():
            weight.data = weight.data.contiguous()


def base_weight(layer: nn.Module | None) -> torch.Tensor | None:
    """The frozen weight of a projection, whether it still carries LoRA (``base_layer``) or not any more."""
    return getattr(getattr(layer, "base_layer", layer), "weight", None)
