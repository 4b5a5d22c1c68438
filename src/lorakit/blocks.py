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

import torch
from torch import nn

from . import registry
from .kernels.gated_mlp import lora_mlp_down
from .layers import Linear
from .registry import MlpBlock

ENABLED = True
"""Fuse known MLP blocks (an A/B switch; ``use_fused_kernel = False`` on a down projection turns it off there)."""


class FusedMlpForward:
    """The forward installed on one MLP block (``block.forward``). ``replaced``: the instance forward it took
    over (another library's implementation of the same block, registry.computes_block), or None for the
    class's; it runs whenever the fused op does not apply and comes back on ``unfuse``."""

    def __init__(self, module: nn.Module, block: MlpBlock, silu: bool, replaced=None):
        self.module, self.block, self.silu, self.replaced = module, block, silu, replaced

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
        if current.replaced is None:
            del module.forward
        else:
            module.forward = current.replaced
