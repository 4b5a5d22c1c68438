"""Fused LoRA down projection of an MLP: its input is recomputed in backward, never stored.

In a Llama-style MLP, ``down(act(gate(x)) * up(x))``, LoRA on ``down`` needs that projection's input
H = act(G) * U for its gradient dA = s * (dY @ B).T @ H. The frozen model never keeps H (its backward needs
only the weight), so storing H is LoRA's own cost: (tokens x intermediate) a layer, 128 MiB for
Llama-3.2-1B at 4 x 2048 tokens, 2 GiB a step. Autograd also keeps act(G) for the product's backward. This op
keeps only G and U - which the frozen model keeps too - and recomputes H in backward:

    forward:   H = act(G) * U ;  Y = H @ W.T + b + s * (H @ A.T) @ B.T     (lora_linear's unmerged forward)
    backward:  GA = dY @ B ;  dB = s * dY.T @ XA ;  dH = s * GA @ A + dY @ W
               one pass over (dH, G, U) recomputes H and forms dG = dH * U * act'(G), dU = dH * act(G)
               dA = s * GA.T @ H

So a LoRA step stores less than the frozen floor itself (G and U instead of G, act(G), U), for one extra
elementwise pass in backward; for SiLU on CUDA, Triton kernels (swiglu_triton) fuse that pass with the
gradient products, fewer passes than PyTorch's own backward of ``act(G) * U``. Ungated MLPs (GPT-2:
``c_proj(act(c_fc(x)))``) are the case U = None. SiLU has a closed-form backward (bit-identical to autograd's);
any other activation module is differentiated by autograd on the recomputation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._triton import load_kernels
from .lora_linear import LoraLinearArgs, forward_from_xa, grad_input, grad_lora_B, unmerged_forward

_triton = None
_triton_loaded = False

FUSED_DH_LORA = False
"""Backward: add the rank-r term s * GA @ A to dH inside the SiLU backward kernel (swiglu_triton's
silu_backward_lora), which reads dH anyway, instead of forming it in the down projection's dX GEMM. That saves
writing and reading back one (tokens x intermediate) tensor: 256 MiB a layer on the 1B shape. Measured on the
H200 (2026-12-02, bench/silu_lora_tiles.py and bench/graphed_layers.py --variants "fused dH"): the tiled kernel
reaches 2.3-2.6 TB/s against the 1-D kernel's 3.1-3.5, so GEMM + kernel take 0.90-0.96 of the unfused pair at
the best tile, and whole graphed steps do not move (1B 59.3k against 59.5k). Off."""

FUSED_DA_LORA = False
"""With FUSED_DH_LORA: the down projection's dA = s * GA^T @ H inside the same kernel, from H in registers
(swiglu_triton's silu_backward_lora_da), so H (tokens x intermediate) is neither written nor read back for it:
another 256 MiB a layer on the 1B shape. Measured on the H200 (2026-12-02): 1.03 of the unfused kernels' time at
the best tile (the accumulation over row tiles costs more than H's traffic); whole graphed steps 59.2k against
59.3k. Off."""


IN_PLACE_BACKWARD = True
"""Where the op owns gate and up (MlpArgs.owns_inputs: the fused MLP block's shared-input op made them for it),
the SiLU backward kernel writes dGate over gate, dUp over up and the recomputed H over dH: three (tokens x
intermediate) tensors a layer not allocated at the MLP's backward peak, 352 MiB on Llama-3-8B at 2 x 2048
tokens. Their version counters are bumped, so a second backward through the same graph (retain_graph) fails
with autograd's in-place error instead of reading gradients as activations. As liger-kernel's and Unsloth's
SwiGLU backward do; False: fresh outputs."""


def _kernels():
    global _triton, _triton_loaded
    if not _triton_loaded:
        _triton = load_kernels("lorakit.kernels.swiglu_triton")
        _triton_loaded = True
    return _triton


def _launch(name: str, *args):
    """Run a Triton kernel; if it cannot be compiled or launched here (a Triton or driver this code was not
    run on), warn once and return None: the torch path computes the same values from then on."""
    global _triton
    try:
        return getattr(_kernels(), name)(*args)
    except torch.OutOfMemoryError:
        raise  # not the kernel's fault: the torch path would need the same memory
    except Exception as exc:  # noqa: BLE001
        _triton = None
        warnings.warn(f"lorakit: the SiLU kernel failed ({exc!r}); using PyTorch's ops instead", stacklevel=3)
        return None


@dataclass(frozen=True)
class MlpArgs:
    """Non-tensor arguments: the down projection's ``LoraLinearArgs``, the activation module, whether it
    computes exactly ``F.silu`` (the caller knows its types; then the closed form and the kernels run), and
    whether gate and up are the op's own (``owns_inputs``: made for it, read by nothing else; see
    IN_PLACE_BACKWARD)."""

    lora: LoraLinearArgs
    act: nn.Module
    silu: bool
    owns_inputs: bool = False


def _use_triton(*tensors) -> bool:
    # compiling first: loading the kernels imports a module, which torch.compile cannot trace (a graph break
    # wherever the first use of the op is a compiled one)
    if torch.compiler.is_compiling() or not tensors[0].is_cuda:
        return False
    kernels = _kernels()
    return kernels is not None and kernels.supported(*tensors)


def activate(gate: torch.Tensor, up: torch.Tensor | None, args: MlpArgs) -> torch.Tensor:
    """H = act(gate) * up (act(gate) when up is None), computed as the MLP's own forward computes it."""
    if args.silu and _use_triton(gate, up):
        h = _launch("silu_forward", gate, up)
        if h is not None:
            return h
    h = F.silu(gate) if args.silu else args.act(gate)
    return h if up is None else h * up


def activation_backward(grad_h: torch.Tensor | None, gate: torch.Tensor, up: torch.Tensor | None, args: MlpArgs,
                        want_h: bool):
    """``(H or None, dGate or None, dUp or None)``: H recomputed (when ``want_h``) and the gradients of
    H = act(gate) * up for dH = ``grad_h`` (None: only H)."""
    if grad_h is None:
        return (activate(gate, up, args) if want_h else None), None, None
    grad_h = grad_h.view(gate.shape)
    if args.silu and _use_triton(grad_h, gate, up):
        in_place = IN_PLACE_BACKWARD and args.owns_inputs
        out = _launch("silu_backward", grad_h, gate, up, want_h, in_place)
        if out is not None:
            if in_place:  # the saved gate and up now hold gradients: a second unpack must fail
                torch.autograd.graph.increment_version([gate] if up is None else [gate, up])
            return out
    if args.silu:  # the ops autograd runs for F.silu(g) * u, in its order: the same bits
        act = F.silu(gate)
        if up is None:
            return act, torch.ops.aten.silu_backward(grad_h, gate), None
        return act * up, torch.ops.aten.silu_backward(grad_h * up, gate), grad_h * act
    with torch.enable_grad():
        g = gate.detach().requires_grad_(True)
        u = up.detach().requires_grad_(True) if up is not None else None
        h = args.act(g) if u is None else args.act(g) * u
        grads = torch.autograd.grad(h, [g] if u is None else [g, u], grad_h)
    return h.detach(), grads[0], grads[1] if u is not None else None


class _DownShared:
    """The gradients of the first node's inputs, which the second node's backward forms. (The second node
    reaches the first one's context, where G, U and XA are saved, through XA's grad_fn: no reference cycle
    keeps either alive.)"""

    __slots__ = ("grads",)


class LoraMlpDownInputs(torch.autograd.Function):
    """The op's first node: H = act(G) * U and XA = H @ A.T; saves G, U and XA, nothing after.

    Why two nodes: a checkpoint's recompute stops once the last tensor that backward needs is saved again
    (torch's early stop). Saved here, before the down projection's GEMM, they let the recompute skip that GEMM,
    as the frozen model's recompute does (nothing after it is saved). As one node, the op ran its whole forward
    before saving: one (tokens x intermediate x hidden) GEMM a layer too many, 32 x ~0.6 ms on Llama-3-8B's
    checkpointed step (H200)."""

    @staticmethod
    def forward(ctx, shared, gate, up, A, args: MlpArgs):
        h2 = activate(gate, up, args).reshape(-1, A.shape[1])
        xa = h2 @ A.t()
        ctx.save_for_backward(gate, up, xa)
        ctx.set_materialize_grads(False)
        ctx.shared = shared
        return h2, xa  # H is not saved: the second node reads it in forward only

    @staticmethod
    def backward(ctx, grad_h, grad_xa):  # both None: the second node's backward formed every gradient
        grads, ctx.shared.grads = ctx.shared.grads, None
        return (None, *grads, None)


class LoraMlpDownFunction(torch.autograd.Function):
    """The op's second node: Y = H @ W.T + b + s * XA @ B.T. It saves no tensor (the parameters ride on its
    context: a checkpoint's recompute is not asked for them); its backward reads the first node's G, U, XA
    and forms the gradients of both."""

    @staticmethod
    def forward(ctx, shared, h2, xa, weight, bias, A, B, args: MlpArgs):
        y = forward_from_xa(h2, xa, weight, bias, B, args.lora)
        ctx.shared, ctx.args, ctx.has_bias = shared, args, bias is not None
        ctx.weight, ctx.A, ctx.B = weight, A, B
        ctx.inputs_ctx = xa.grad_fn  # the first node (None when nothing before this op needs a gradient)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, xa = ctx.inputs_ctx.saved_tensors
        _, need_gate, need_up, need_A, _ = ctx.inputs_ctx.needs_input_grad
        grad_gate, grad_up, grad_A, grad_B, grad_bias = _backward(
            grad_out, gate, up, xa, ctx.weight, ctx.A, ctx.B, ctx.args, need_gate, need_up, need_A,
            ctx.needs_input_grad[6], ctx.has_bias and ctx.needs_input_grad[4])
        ctx.shared.grads = (grad_gate, grad_up, grad_A)
        return None, None, None, None, grad_bias, None, grad_B, None


class LoraMlpDownOneNode(torch.autograd.Function):
    """The same op as one node, for torch.compile (which traces it without a break; the two nodes' link
    through a grad_fn would break the graph, and a compiled graph recomputes by its own rules)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, A, B, args: MlpArgs):
        h2 = activate(gate, up, args).reshape(-1, A.shape[1])
        y, xa = unmerged_forward(h2, h2, weight, bias, A, B, args.lora)
        del h2
        ctx.args = args
        ctx.has_bias = bias is not None
        ctx.save_for_backward(gate, up, xa, weight, A, B)
        # shaped here, not by the caller: torch 2.11's dynamo computed wrong input gradients for a view of
        # this node's 2-d output taken outside it (tests/test_blocks.py::test_compile_adds_no_graph_break)
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, xa, weight, A, B = ctx.saved_tensors
        need_gate, need_up, _, need_bias, need_A, need_B, _ = ctx.needs_input_grad
        grad_gate, grad_up, grad_A, grad_B, grad_bias = _backward(
            grad_out.reshape(-1, grad_out.shape[-1]), gate, up, xa, weight, A, B, ctx.args, need_gate, need_up,
            need_A, need_B, ctx.has_bias and need_bias)
        return grad_gate, grad_up, None, grad_bias, grad_A, grad_B, None


def _backward(g, gate, up, xa, weight, A, B, args: MlpArgs, need_gate, need_up, need_A, need_B, need_bias):
    """(dGate, dUp, dA, dB, dBias) for the 2-d output gradient ``g`` (module docstring), None where not needed."""
    s = args.lora.scale
    ga = g @ B  # (N, r), unscaled: s rides in the GEMMs' alpha/beta (as in lora_linear)
    grad_B = grad_lora_B(g, xa, B, s) if need_B else None
    fused = _fused_dh_backward(g, ga, gate, up, weight, A, args, need_A) if need_gate or need_up else None
    grad_A = None
    if fused is not None:
        h, grad_gate, grad_up, grad_A = fused
    else:
        grad_h = grad_input(g, ga, weight, A, args.lora) if need_gate or need_up else None
        h, grad_gate, grad_up = activation_backward(grad_h, gate, up, args, want_h=need_A)
        del grad_h
    if need_A and grad_A is None:
        grad_A = torch.addmm(A, ga.t(), h.reshape(-1, A.shape[1]), beta=0, alpha=s)
    grad_bias = g.sum(0) if need_bias else None
    return grad_gate if need_gate else None, grad_up if need_up else None, grad_A, grad_B, grad_bias


def _fused_dh_backward(g, ga, gate, up, weight, A, args: MlpArgs, want_h: bool):
    """With FUSED_DH_LORA, for SiLU on the Triton path: dH_base = dY @ W by one plain GEMM, and the SiLU backward
    kernel adds s * GA @ A to it tile by tile: (H or None, dGate, dUp, dA or None), dA formed in the kernel
    with FUSED_DA_LORA; None where that does not apply (the caller then runs the unfused path)."""
    if not (FUSED_DH_LORA and args.silu and _use_triton(gate, up)) or ga.dtype != gate.dtype \
            or A.dtype != gate.dtype:
        return None
    w = weight.t() if args.lora.transposed else weight
    base = (g @ w).view(gate.shape)
    ga, A = ga.contiguous(), A.contiguous()
    if want_h and FUSED_DA_LORA:
        out = _launch("silu_backward_lora_da", base, gate, up, ga, A, args.lora.scale)
        return None if out is None else (None, *out)
    out = _launch("silu_backward_lora", base, gate, up, want_h, ga, A, args.lora.scale)
    return None if out is None else (*out, None)


def _apply(gate, up, weight, bias, A, B, args: MlpArgs) -> torch.Tensor:
    first_needs_grad = torch.is_grad_enabled() and (
        gate.requires_grad or A.requires_grad or (up is not None and up.requires_grad))
    if torch.compiler.is_compiling() or not first_needs_grad:  # (no first node then for the second to reach)
        return LoraMlpDownOneNode.apply(gate, up, weight, bias, A, B, args)
    shared = _DownShared()
    h2, xa = LoraMlpDownInputs.apply(shared, gate, up, A, args)
    y = LoraMlpDownFunction.apply(shared, h2, xa, weight, bias, A, B, args)
    return y.view(*gate.shape[:-1], y.shape[-1])


def lora_mlp_down(gate: torch.Tensor, up: torch.Tensor | None, act: nn.Module, weight: torch.Tensor,
                  bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float,
                  transposed: bool = False, silu: bool = False, owns_inputs: bool = False) -> torch.Tensor:
    """``down(act(gate) * up)`` for a LoRA ``down`` (dense frozen ``weight``, adapter A, B, ``scale``, no
    dropout) as one autograd op (two nodes) that stores gate and up but not the product. ``up`` None: ``down(act(gate))``.
    ``silu``: act computes exactly ``F.silu``. ``owns_inputs``: nothing else reads gate and up, so backward may
    overwrite them (IN_PLACE_BACKWARD). Under autocast every operand is cast to the autocast dtype first (as lora_linear_fused)."""
    args = MlpArgs(LoraLinearArgs(float(scale), transposed), act, silu, owns_inputs)
    if torch.is_autocast_enabled(gate.device.type):
        dtype = torch.get_autocast_dtype(gate.device.type)
        gate, weight, A, B = (t.to(dtype) for t in (gate, weight, A, B))
        up = up.to(dtype) if up is not None else None
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(gate.device.type, enabled=False):
            return _apply(gate, up, weight, bias, A, B, args)
    return _apply(gate, up, weight, bias, A, B, args)

