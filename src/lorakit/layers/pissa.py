"""PiSSA initialization (Meng et al. 2024): start the adapter on the principal part of the base weight.

With W0 = U S V^T (W0 in (out, in) layout) and s the adapter's scale:

    A = sqrt(S_r / s) V_r^T        (r, in)
    B = U_r sqrt(S_r / s)          (out, r)
    W_res = W0 - s * B @ A         written into the base weight (frozen)

so W_res + s * B @ A = W0 at initialization: the model is unchanged, but training moves the top-r singular
subspace instead of a random one. ``init="pissa_niter_<N>"`` replaces the full SVD by a randomized one
(``torch.svd_lowrank``, N subspace iterations), which is much faster on large layers; lorakit seeds it with a
fixed seed so that the same weight always gives the same residual (a saved adapter can be re-applied exactly).

These are PEFT's formulas (``init_lora_weights="pissa"`` / ``"pissa_niter_N"``), for Linear layers and GPT-2's
Conv1D, as in PEFT. Each layer keeps the initial A and B (non-persistent buffers in ``pissa_init[name]``):
deleting the adapter adds ``s * B0 @ A0`` back (the original weight within one rounding), and
``lorakit.pissa.pissa_to_lora`` uses them to express the trained adapter as a plain LoRA on the original W0.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError
from ..functional import lora_delta
from .base import AdapterSpec, LoraLayer
from .linear import FusedLinear, Linear
from .quantized import FrozenPackedLinear

_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
SVD_SEED = 0
"""Seed of the randomized SVD (pissa_niter_N): fixed, so the residual of a given weight is reproducible."""


class PissaInit(nn.Module):
    """The initial (A0, B0) of one PiSSA adapter and the scale they were taken out of the base weight with."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return f"r={self.A.shape[0]}, scale={self.scale}"


def svd_niter(init: str) -> int | None:
    """None for "pissa" (full SVD), N for "pissa_niter_N"."""
    if init == "pissa":
        return None
    match = _NITER.fullmatch(init)
    if match is None:
        raise ConfigError(f"init must be 'pissa' or 'pissa_niter_<N>' here, got {init!r}")
    return int(match.group(1))


def check_pissa(layer: LoraLayer, r: int, where: str = "") -> None:
    """Raise ConfigError when PiSSA cannot initialize ``layer`` (before anything is changed)."""
    at = f" at {where!r}" if where else ""
    if isinstance(layer, FusedLinear) or not isinstance(layer, Linear):
        raise ConfigError(
            f"init='pissa'{at}: PiSSA is defined for Linear layers and GPT-2 Conv1D (as in PEFT), not for "
            f"{type(layer).__name__}; leave this module out of the PiSSA adapter's target_modules"
        )
    base = layer.base_layer
    if isinstance(base, FrozenPackedLinear) or base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16,
                                                                  torch.float64):
        raise ConfigError(
            f"init='pissa'{at}: the base weight must be floating point (found {type(base).__name__} with "
            f"{base.weight.dtype}); initialize PiSSA on the 16/32-bit model, then quantize the residual"
        )
    if r > min(layer.in_features, layer.out_features):
        raise ConfigError(
            f"init='pissa'{at}: rank {r} exceeds min(in, out) = {min(layer.in_features, layer.out_features)}"
        )


def principal_factors(weight: torch.Tensor, r: int, scale: float, niter: int | None) -> tuple[torch.Tensor, ...]:
    """(A, B) in fp32 with scale * B @ A the best rank-r approximation of ``weight`` (out, in)."""
    weight = weight.to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            torch.manual_seed(SVD_SEED)
            U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scale)
    return root[:, None] * Vh, U * root[None, :]


def pissa_residual(layer: LoraLayer, name: str, init: str, set_adapter: bool = False) -> None:
    """Take the principal part out of the base weight for adapter ``name`` and remember (A0, B0).

    With ``set_adapter`` the adapter's A and B are set to (A0, B0) (a fresh PiSSA adapter); without, they are
    left alone (an adapter loaded from a file that was trained from this initialization).
    """
    spec: AdapterSpec = layer.specs[name]
    check_pissa(layer, spec.r)
    if "pissa_init" in layer._modules and name in layer.pissa_init:
        raise ConfigError(f"adapter {name!r} already took its PiSSA part out of this layer's weight")
    scale = layer.scale(name)
    scale = float(scale.detach()) if isinstance(scale, torch.Tensor) else float(scale)
    base = layer.base_layer
    with torch.no_grad():
        weight = base.weight.T if layer.fan_in_fan_out else base.weight  # (out, in) view
        A, B = principal_factors(weight, spec.r, scale, svd_niter(init))
        A_param, B_param = layer.lora_A[name].weight, layer.lora_B[name].weight
        A0, B0 = A.to(A_param.dtype), B.to(B_param.dtype)
        residual = weight.to(torch.float32) - lora_delta(A0, B0, scale)  # with the rounded factors: exact sum
        if "pissa_init" not in layer._modules:
            layer.pissa_init = nn.ModuleDict()
        layer.pissa_init[name] = PissaInit(A0.clone(), B0.clone(), scale)
        if set_adapter:
            A_param.copy_(A0)
            B_param.copy_(B0)
        weight.copy_(residual)


def pissa_init(layer: LoraLayer, name: str, spec: AdapterSpec) -> None:
    """The init hook LoraLayer.add_adapter calls for ``spec.init`` "pissa" / "pissa_niter_N"."""
    pissa_residual(layer, name, spec.init, set_adapter=True)


def pissa_restore(layer: LoraLayer, name: str) -> None:
    """Add ``s * B0 @ A0`` back into the base weight (the original within one rounding) and forget (A0, B0)."""
    saved: PissaInit = layer.pissa_init[name]
    base = layer.base_layer
    with torch.no_grad():
        weight = base.weight.T if layer.fan_in_fan_out else base.weight
        weight.copy_(weight.to(torch.float32) + lora_delta(saved.A, saved.B, saved.scale))
    del layer.pissa_init[name]


def restore_unmerged_pissa(layer: LoraLayer) -> None:
    """Give the base weight back the principal part of every PiSSA adapter not merged into it (unload uses this:
    a merged PiSSA adapter leaves W_res + s B A, the fine-tuned weight; a dropped one leaves W0)."""
    if "pissa_init" not in layer._modules:
        return
    for name in list(layer.pissa_init):
        if name not in layer.merged:
            pissa_restore(layer, name)
