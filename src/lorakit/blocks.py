"""Fused LoRA paths over a whole known block: the MLP of Llama-family models.

``inject`` installs them and ``unload`` removes them; nothing to call. A LoRA on an MLP's down projection
would otherwise store that projection's (tokens x intermediate) input for its gradient - the largest
tensor of a layer, which the frozen model never stores. ``FusedMlpForward`` computes the block as
kernels.gated_mlp's one op instead, which stores only what the frozen model stores too, and recomputes
the rest (that module says how). It replaces the block's forward on the instance (``module.forward``, the
pattern accelerate's hooks use), computes exactly what the class's forward computes, and hands over to
that forward whenever the fused op does not apply: adapters disabled, merged or mixed, dropout on the down
projection, a packed base, hooks on the projection, another active adapter count than one, and
``use_fused_kernel = False`` on the down projection (the reference path).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import registry
from .kernels.gated_mlp import lora_mlp, lora_mlp_down
from .layers import Linear
from .registry import MlpBlock

ENABLED = True
"""Fuse known MLP blocks (an A/B switch; ``use_fused_kernel = False`` on a down projection turns it off there)."""

WIDEN_GATE_UP = True
"""Compute LoRA gate and up inside the block's op, through their widened weights (kernels.gated_mlp's
LoraMlpFunction; an A/B switch). Off, or where it does not apply, gate and up run as their own LoRA layers."""


class FusedMlpForward:
    """The forward installed on one MLP block (``block.forward``). ``replaced``: the instance forward it took
    over (another library's implementation of the same block, registry.computes_block), or None for the
    class's; it runs whenever the fused op does not apply and comes back on ``unfuse``."""

    def __init__(self, module: nn.Module, block: MlpBlock, silu: bool, replaced=None):
        self.module, self.block, self.silu, self.replaced = module, block, silu, replaced
        self.widened: dict[int, tuple] = {}  # id(weight) -> (weakref, buffer storage pointer, ranks)

    def original(self, x: torch.Tensor) -> torch.Tensor:
        return self.replaced(x) if self.replaced is not None else type(self.module).forward(self.module, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module, block = self.module, self.block
        down = getattr(module, block.down)
        # decided on x first (no side effects), before the projections run: a fallback runs them itself
        call = down.fused_call(x) if ENABLED and isinstance(down, Linear) and not _hooked(down) else None
        if not self._applies(call, x, None):
            return self.original(x)
        act = getattr(module, block.act)
        y = self._whole(x, call, act) if WIDEN_GATE_UP else None
        if y is not None:
            return getattr(module, block.dropout)(y) if block.dropout is not None else y
        gate = getattr(module, block.gate)(x) if block.gate is not None else None  # the class's call order
        up = getattr(module, block.up)(x)
        first, second = (gate, up) if gate is not None else (up, None)  # act's input, the other factor
        if first.dtype != x.dtype:  # the down projection's operands depend on its input's dtype
            call = down.fused_call(first)
        if not self._applies(call, first, second):  # gate/up changed the dtype: the class's own ops
            y = down(act(first) if second is None else act(first) * second)
        else:
            y = lora_mlp_down(first, second, act, call.weight, call.bias, call.A, call.B, call.scale,
                              call.transposed, self.silu)
        return getattr(module, block.dropout)(y) if block.dropout is not None else y

    def _whole(self, x: torch.Tensor, call, act: nn.Module) -> torch.Tensor | None:
        """The whole MLP as LoraMlpFunction when gate and up are plain LoRA Linears over dense frozen weights
        of x's dtype (one active adapter, no dropout, no bias, no hooks), else None (nothing computed)."""
        module, block = self.module, self.block
        if block.gate is None or torch.compiler.is_compiling() or call.weight.dtype != x.dtype:
            return None  # compiled graphs: the per-layer ops (inductor fuses those itself)
        if torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != x.dtype:
            return None
        gate, up = getattr(module, block.gate), getattr(module, block.up)
        calls = []
        for layer in (gate, up):
            c = layer.fused_call(x) if isinstance(layer, Linear) and not _hooked(layer) else None
            if c is None or c.dropout is not None or c.bias is not None or c.transposed \
                    or type(c.weight) not in (torch.Tensor, nn.Parameter) or c.weight.dtype != x.dtype:
                return None
            calls.append(c)
        cg, cu = calls
        if cg.weight.shape != cu.weight.shape or cg.weight.device != x.device:
            return None
        r_gate, r_up = cg.A.shape[0], cu.A.shape[0]
        packed_gate = self._widened(cg.weight, (r_gate, r_up), 0, cg.B, cg.scale)
        packed_up = self._widened(cu.weight, (r_gate, r_up), 1, cu.B, cu.scale)
        return lora_mlp(x, cg.A, cg.B, cu.A, cu.B, packed_gate, packed_up, act, call.weight, call.bias, call.A,
                        call.B, (cg.scale, cu.scale, call.scale), call.transposed, self.silu)

    def _widened(self, weight: nn.Parameter, ranks: tuple[int, int], slot: int, B: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """The (out, in + r_gate + r_up) buffer whose first ``in`` columns are ``weight`` itself and whose
        ``slot``-th rank columns hold ``scale * B`` (the other's zero). The first call moves the weight into
        such a buffer (``weight.data`` becomes a strided view of it: no second copy of W); later calls only
        write s*B, through an alias that leaves autograd's version counters alone (those columns are read by
        LoraMlpFunction only). A weight moved since (``.to()``, a load) is widened again."""
        out_features, in_features = weight.shape
        width = in_features + sum(ranks)
        record = self.widened.get(id(weight))
        data = weight.data
        current = (record is not None and record[0]() is weight and record[1] == data.untyped_storage().data_ptr()
                   and data.stride() == (width, 1) and data.storage_offset() == 0)
        if not current:
            buffer = torch.zeros(out_features, width, dtype=data.dtype, device=data.device)
            buffer[:, :in_features].copy_(data)
            weight.data = buffer[:, :in_features]
            data = weight.data
            record = None
        buffer = data.as_strided((out_features, width), (width, 1))
        if record is not None and record[2] != ranks:  # same width, other split: clear the old s*B columns
            buffer[:, in_features:].zero_()
        self.widened[id(weight)] = (weakref.ref(weight), data.untyped_storage().data_ptr(), ranks)
        lo = in_features + (ranks[0] if slot else 0)
        torch.mul(B.detach(), scale, out=buffer[:, lo:lo + ranks[slot]])
        return buffer

    def release(self) -> None:
        """Give the widened weights back as plain contiguous tensors (unfuse, unload)."""
        for name in (self.block.gate, self.block.up):  # this module's own (a deep copy's records are the original's)
            layer = getattr(self.module, name, None) if name is not None else None
            weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
            if isinstance(weight, torch.Tensor) and not weight.data.is_contiguous():
                weight.data = weight.data.contiguous()
        self.widened.clear()

    def _applies(self, call, first: torch.Tensor, second: torch.Tensor | None) -> bool:
        """Whether the fused op computes this call (``call``: the down projection's FusedCall or None)."""
        if call is None or call.dropout is not None or not isinstance(call.weight, torch.Tensor):
            return False  # the reference path's semantics (dropout mask) or a packed base: per-layer ops
        if second is not None and (second.shape != first.shape or second.dtype != first.dtype):
            return False
        return self.silu or not torch.compiler.is_compiling()  # autograd.grad inside backward: eager only


def _hooked(module: nn.Module) -> bool:
    """Hooks on the down projection itself, or a forward replaced on it, would be skipped by the fused op."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks or "forward" in module.__dict__)


def sync(model: nn.Module) -> int:
    """Install FusedMlpForward on every known MLP block whose down projection is a LoRA Linear and remove it
    where it no longer is; returns how many blocks carry it. An instance forward of another library is taken
    over only where it computes the same block (registry.computes_block), else left alone."""
    count = 0
    for module in model.modules():
        block = registry.mlp_block(module)
        current = module.__dict__.get("forward")
        if block is None or not isinstance(getattr(module, block.down, None), Linear):
            _restore(module)
            continue
        if current is None or registry.computes_block(module, current):
            act = getattr(module, block.act)
            module.forward = FusedMlpForward(module, block, registry.is_silu(act), replaced=current)
        count += isinstance(module.__dict__.get("forward"), FusedMlpForward)
    return count


def unfuse(model: nn.Module) -> None:
    """Give every block the forward it had before (``sync`` installs the fused one again)."""
    for module in model.modules():
        _restore(module)


def _restore(module: nn.Module) -> None:
    current = module.__dict__.get("forward")
    if isinstance(current, FusedMlpForward):
        current.release()
        if current.replaced is None:
            del module.forward
        else:
            module.forward = current.replaced
