"""Fused LoRA paths over whole known blocks of Llama-family models: the MLP, and self-attention's q, k, v.

``inject`` installs them and ``unload`` removes them; nothing to call.

* **MLP** (``FusedMlpForward``): a LoRA on the down projection would otherwise store that projection's
  (tokens x intermediate) input for its gradient - the largest tensor of a layer, which the frozen model
  never stores. The block computes down as kernels.gated_mlp's op instead, which recomputes that input, and
  gate and up (when both carry LoRA) as one shared-input op (kernels.shared_input).
* **Projections of one input** (``SharedInputGroup``, q/k/v of the attention classes registry names): the
  first member called computes all of them as one shared-input op and hands the others their outputs
  when they are called with the same tensor.

* **Norms before them** (``WideNorm``, an RMSNorm of a registered decoder layer whose output only such an op
  reads): writes its output into a buffer as wide as that op's widened input, which then needs no copy of it.

All replace forwards on the instance (``module.forward``, the pattern accelerate's hooks use), compute
exactly what the class's forward computes, and hand over to it whenever a fused op does not apply:
adapters disabled, merged or mixed, dropout, a packed base, hooks, another active adapter count than one,
autocast to another dtype than the weights', torch.compile (inductor fuses the per-layer ops itself) and
``use_fused_kernel = False`` (the reference path).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import registry, widen
from .kernels.gated_mlp import lora_mlp_down
from .kernels.rms_norm import rms_norm_into_wide
from .kernels.shared_input import lora_shared_input
from .layers import Linear
from .registry import MlpBlock

ENABLED = True
"""Fuse known MLP blocks (an A/B switch; ``use_fused_kernel = False`` on a down projection turns it off there)."""

SHARED_INPUT = True
"""Compute LoRA projections of one input (gate/up, q/k/v) as one op through their widened weights
(kernels.shared_input; an A/B switch). Off, or where it does not apply, they run as their own LoRA layers."""

SHARED_QKV = True
"""Also q/k/v (SharedInputGroup). On since 2026-12-02 (session 20): on the H200 it was faster than gate/up alone
in every interleaved run, eager and with graphed layers (1B: 0.935 against 0.926 of the floor eagerly, 0.953
against 0.941 graphed; 8B with checkpointing: 0.950 / 0.938 and 0.968 / 0.952; docs/speed.md). An earlier eager run
(2026-12-01) had bimodal rounds and was not faster. False: q/k/v run as their own LoRA layers (an A/B switch)."""


WIDE_NORM = True
"""RMSNorms of registered decoder layers write their output into a buffer wide enough for the shared-input op
that reads it (WideNorm), which then only adds the XA columns instead of copying X into its widened input
(kernels.shared_input). An A/B switch."""


class FusedMlpForward:
    """The forward installed on one MLP block (``block.forward``). ``replaced``: the instance forward it took
    over (another library's implementation of the same block, registry.computes_block), or None for the
    class's; it runs whenever the fused op does not apply and comes back on ``unfuse``."""

    def __init__(self, module: nn.Module, block: MlpBlock, silu: bool, replaced=None):
        self.module, self.block, self.silu, self.replaced = module, block, silu, replaced
        self.widened = widen.Widened()  # gate's and up's

    def original(self, x: torch.Tensor) -> torch.Tensor:
        return self.replaced(x) if self.replaced is not None else type(self.module).forward(self.module, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module, block = self.module, self.block
        self.widened.input_extra = 0  # set again where gate and up run as one shared-input op
        down = getattr(module, block.down)
        # decided on x first (no side effects), before the projections run: a fallback runs them itself
        call = down.fused_call(x) if ENABLED and isinstance(down, Linear) and not _hooked(down) else None
        if not self._applies(call, x, None):
            return self.original(x)
        act = getattr(module, block.act)
        y = self._whole(x, call, act) if SHARED_INPUT else None
        if y is None:  # gate and up as their own layers
            y = self._down(x, call, act)
        return getattr(module, block.dropout)(y) if block.dropout is not None else y

    def _down(self, x: torch.Tensor, call, act: nn.Module) -> torch.Tensor:
        """gate and up as their own layers (in the class's call order), then down's op."""
        module, block = self.module, self.block
        gate = getattr(module, block.gate)(x) if block.gate is not None else None
        up = getattr(module, block.up)(x)
        first, second = (gate, up) if gate is not None else (up, None)  # act's input, the other factor
        if first.dtype != x.dtype:  # the down projection's operands depend on its input's dtype
            call = getattr(module, block.down).fused_call(first)
        if not self._applies(call, first, second):  # gate/up changed the dtype: the class's own ops
            return getattr(module, block.down)(act(first) if second is None else act(first) * second)
        return lora_mlp_down(first, second, act, call.weight, call.bias, call.A, call.B, call.scale,
                             call.transposed, self.silu)

    def _whole(self, x: torch.Tensor, call, act: nn.Module) -> torch.Tensor | None:
        """gate and up as one shared-input op, then down's op; None (nothing computed) where it does not apply."""
        module, block = self.module, self.block
        if block.gate is None or call.weight.dtype != x.dtype:
            return None
        outs = shared_outputs([getattr(module, block.gate), getattr(module, block.up)], x, self.widened)
        if outs is None:
            return None
        gate, up = outs  # made here for down's op alone (shared_outputs refuses hooked layers): it owns them
        return lora_mlp_down(gate, up, act, call.weight, call.bias, call.A, call.B, call.scale, call.transposed,
                             self.silu, owns_inputs=True)

    def release(self) -> None:
        """Give the widened weights back as plain contiguous tensors (unfuse, unload): this module's own (a
        deep copy's records point at the original's weights)."""
        block = self.block
        widen.release(widen.base_weight(getattr(self.module, n, None)) for n in (block.gate, block.up) if n)
        self.widened.clear()

    def _applies(self, call, first: torch.Tensor, second: torch.Tensor | None) -> bool:
        """Whether the fused op computes this call (``call``: the down projection's FusedCall or None)."""
        if call is None or call.dropout is not None or not isinstance(call.weight, torch.Tensor):
            return False  # the reference path's semantics (dropout mask) or a packed base: per-layer ops
        if second is not None and (second.shape != first.shape or second.dtype != first.dtype):
            return False
        return self.silu or not torch.compiler.is_compiling()  # autograd.grad inside backward: eager only


class SharedInputGroup:
    """The LoRA projections of one module that its forward applies to one input (q, k, v of a registered
    attention class). Each member's forward is a ``_Member`` of the group: the first one called with a
    tensor computes every member's output as one shared-input op and keeps the others' outputs until they
    are called with that same tensor (unchanged since: same version); any other call is the member's own
    forward. Where the op does not apply nothing is computed ahead."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...]):
        self.owner, self.names = owner, names
        self.widened = widen.Widened()
        self.pending_input: torch.Tensor | None = None
        self.pending_version = -1
        self.pending: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        layer = getattr(self.owner, name)
        if not args and not kwargs and isinstance(x, torch.Tensor):
            if x is self.pending_input and _version(x) == self.pending_version and name in self.pending:
                out = self.pending.pop(name)
                if not self.pending:
                    self.pending_input = None
                return out
            outs = None
            self.widened.input_extra = 0  # set again where the shared-input op applies
            if SHARED_INPUT and SHARED_QKV:
                outs = shared_outputs([getattr(self.owner, n) for n in self.names], x, self.widened)
            if outs is not None:
                self.pending_input, self.pending_version = x, _version(x)
                self.pending = {n: o for n, o in zip(self.names, outs) if n != name}
                return outs[self.names.index(name)]
        return type(layer).forward(layer, x, *args, **kwargs)

    def release(self) -> None:
        self.pending_input, self.pending = None, {}
        self.widened.clear()


def _version(x: torch.Tensor) -> int:
    """x's version counter (in-place writes bump it); inference tensors have none."""
    return -1 if x.is_inference() else x._version


class _Member:
    """The forward installed on one member projection of a SharedInputGroup."""

    def __init__(self, group: SharedInputGroup, name: str):
        self.group, self.name = group, name

    def __call__(self, x, *args, **kwargs):
        return self.group(self.name, x, args, kwargs)


def shared_outputs(layers, x: torch.Tensor, widened: widen.Widened) -> tuple[torch.Tensor, ...] | None:
    """The outputs of LoRA ``layers`` for one input as one shared-input op (kernels.shared_input), or None
    when it would not compute exactly what each layer computes: a layer that is not a plain LoRA Linear over a
    dense frozen weight of x's dtype with one active adapter and no dropout, hooks, torch.compile, autocast to
    another dtype."""
    wide = _norm_buffer(widened, x)  # (callers set widened.input_extra to 0 first: set again where the op applies)
    if torch.compiler.is_compiling():
        return None  # compiled graphs: the per-layer ops (inductor fuses those itself)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != x.dtype:
        return None
    if _global_hooks():
        return None
    calls = []
    dtype, device, in_features = x.dtype, x.device, x.shape[-1]
    for layer in layers:
        forward = layer.__dict__.get("forward")
        if not isinstance(layer, Linear) or _own_hooks(layer) or not (forward is None or isinstance(forward, _Member)):
            return None
        c = layer.fused_call(x)
        if c is None or c.dropout is not None or c.transposed or type(c.weight) not in (torch.Tensor, nn.Parameter):
            return None
        weight = c.weight
        if weight.dtype != dtype or weight.shape[1] != in_features or weight.device != device:
            return None
        calls.append(c)
    ranks = tuple(c.A.shape[0] for c in calls)
    if not torch.is_grad_enabled() and not all(widened.holds(c.weight, ranks) for c in calls):
        return None  # weights are widened for training only: an eval or inference pass alone leaves them as
        # they are (with dropout, training runs the per-layer ops, whose GEMMs prefer contiguous weights)
    projections = [(c.A, c.B, c.bias, c.scale, widened.buffer(c.weight, ranks, i, c.B, c.scale))
                   for i, c in enumerate(calls)]
    widened.input_extra = projections[0][4].shape[1] - in_features
    return lora_shared_input(x, projections, wide)


def _norm_buffer(widened: widen.Widened, x: torch.Tensor) -> torch.Tensor | None:
    """The buffer whose first columns are ``x`` (x's view base) where x is the last output of the WideNorm before
    this group (taken once: the reference is dropped here)."""
    ref, widened.norm_output = widened.norm_output, None
    return x._base if ref is not None and ref() is x else None


class WideNorm:
    """The forward installed on an RMSNorm of a registered class (registry.is_rms_norm) whose output is the
    input of one shared-input group (``widened``: that group's): the class's ops, the output written into the
    first columns of a buffer ``widened.input_extra`` columns wider (kernels.rms_norm), with a weak reference to
    it left for the group. The class's own forward where the group did not apply last time (input_extra 0),
    under torch.compile or inference mode, with WIDE_NORM off, or for a weight of another dtype. Other readers
    of the output see its own values (the group writes only the columns beyond it); an in-place write to it
    before backward fails loudly (autograd's checks of custom Functions' views, and the group's op saves it for
    its version)."""

    def __init__(self, norm: nn.Module, widened: widen.Widened):
        self.norm, self.widened = norm, widened

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm, widened = self.norm, self.widened
        weight, extra = norm.weight, widened.input_extra
        if (torch.compiler.is_compiling() or not (WIDE_NORM and extra) or weight.dtype != x.dtype
                or torch.is_inference_mode_enabled()):
            return type(norm).forward(norm, x)
        out = rms_norm_into_wide(x, weight, norm.variance_epsilon, extra)
        widened.norm_output = weakref.ref(out)
        return out


def _has_hooks(module: nn.Module) -> bool:
    return _own_hooks(module) or _global_hooks()


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    """Hooks on a projection, or a forward replaced on it, would be skipped by a fused op."""
    return _has_hooks(module) or "forward" in module.__dict__


def sync(model: nn.Module) -> int:
    """Install FusedMlpForward on every known MLP block whose down projection is a LoRA Linear, and a
    SharedInputGroup where two or more of a registered module's shared-input projections are LoRA Linears;
    remove them where that no longer holds. Returns how many MLP blocks carry the fused forward. An
    instance forward of another library is taken over only where it computes the same block
    (registry.computes_block), else left alone."""
    count = 0
    for module in model.modules():
        _sync_group(module)
        block = registry.mlp_block(module)
        current = module.__dict__.get("forward")
        if block is None or not isinstance(getattr(module, block.down, None), Linear):
            _restore_mlp(module)
            continue
        if current is None or registry.computes_block(module, current):
            act = getattr(module, block.act)
            module.forward = FusedMlpForward(module, block, registry.is_silu(act), replaced=current)
        count += isinstance(module.__dict__.get("forward"), FusedMlpForward)
    for module in model.modules():
        _sync_norms(module)
    return count


def _sync_norms(layer: nn.Module) -> None:
    """A WideNorm on each RMSNorm of a registered decoder layer whose consumer (registry.norm_consumers) computes
    its projections as one shared-input op: the group on self-attention's q/k/v or the fused MLP block; the
    class's forward back where it has none. Installed anew each time, for the consumer's current group."""
    for norm_name, consumer_name in registry.norm_consumers(layer):
        norm, consumer = getattr(layer, norm_name, None), getattr(layer, consumer_name, None)
        if norm is None or consumer is None:
            continue
        current = norm.__dict__.get("forward")
        if current is not None and not isinstance(current, WideNorm):
            continue  # another library's forward (liger's RMSNorm): left alone
        widened = _consumer_widened(consumer)
        if widened is not None and registry.is_rms_norm(norm):
            norm.forward = WideNorm(norm, widened)
        elif current is not None:
            del norm.forward


def _consumer_widened(consumer: nn.Module) -> widen.Widened | None:
    """The Widened of the shared-input op a module computes its projections of its input with, or None."""
    forward = consumer.__dict__.get("forward")
    if isinstance(forward, FusedMlpForward):
        return forward.widened if forward.block.gate is not None else None
    for name in registry.shared_input_projections(consumer):
        member = getattr(consumer, name, None)
        member_forward = member.__dict__.get("forward") if member is not None else None
        if isinstance(member_forward, _Member):
            return member_forward.group.widened
    return None


def _sync_group(module: nn.Module) -> None:
    names = registry.shared_input_projections(module)
    if not names:
        return
    lora = tuple(n for n in names if isinstance(getattr(module, n, None), Linear))
    forwards = [getattr(module, n).__dict__.get("forward") for n in lora]
    if len(lora) >= 2 and all(isinstance(f, _Member) and f.group.names == lora for f in forwards):
        return  # installed, same members
    _restore_group(module)
    if len(lora) >= 2 and all(f is None or isinstance(f, _Member) for f in forwards):
        group = SharedInputGroup(module, lora)
        for n in lora:
            getattr(module, n).forward = _Member(group, n)


def unfuse(model: nn.Module) -> None:
    """Give every block and projection the forward it had before (``sync`` installs the fused ones again)."""
    for module in model.modules():
        _restore(module)


def _restore(module: nn.Module) -> None:
    _restore_group(module)
    _restore_mlp(module)
    if isinstance(module.__dict__.get("forward"), WideNorm):
        del module.forward


def _restore_mlp(module: nn.Module) -> None:
    current = module.__dict__.get("forward")
    if isinstance(current, FusedMlpForward):
        current.release()
        if current.replaced is None:
            del module.forward
        else:
            module.forward = current.replaced


def _restore_group(module: nn.Module) -> None:
    names = registry.shared_input_projections(module)
    for n in names:
        layer = getattr(module, n, None)
        forward = layer.__dict__.get("forward") if layer is not None else None
        if isinstance(forward, _Member):
            forward.group.release()
            del layer.forward
    widen.release(widen.base_weight(getattr(module, n, None)) for n in names)
