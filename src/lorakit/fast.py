"""Lower the floor itself: fused kernels for the frozen base model of known Hugging Face architectures.

LoRA cannot train faster than the frozen base's forward + backward. For the architectures liger-kernel
knows (Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM3, ...) ``speed_up_base`` swaps in its Triton kernels:
fused linear + cross-entropy (the (tokens x vocab) logits are never stored: GiBs less memory and a large
share of the step), RMSNorm, RoPE and SwiGLU. LoRA layers are untouched: they wrap the projections, which
liger leaves alone; where a LoRA sits on an MLP's down projection, lorakit's fused block (blocks.py) takes
that MLP over from liger's SwiGLU in either order of calls (it stores what liger's stores, and the down
projection's input not at all). liger-kernel is an optional dependency (``pip install liger-kernel``); it needs a CUDA GPU.

Note: liger patches RoPE and the modules' classes at the module level of transformers, so other models of
the same architecture in the process are affected too.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from . import blocks
from .errors import ConfigError


def speed_up_base(
    model: nn.Module,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
) -> str:
    """Apply liger-kernel's fused kernels to a Hugging Face model instance; returns its model_type.

    Raises ConfigError (never a silent no-op) when liger-kernel is missing, the model has no known
    architecture, or no parameter of the model is on a CUDA device.
    """
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("speed_up_base needs liger-kernel: pip install liger-kernel")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        known = sorted(k for k in MODEL_TYPE_TO_APPLY_LIGER_FN if k)
        raise ConfigError(f"no fused kernels for model_type {model_type!r}; liger-kernel knows {known}")
    if not any(p.is_cuda for p in model.parameters()):
        raise ConfigError("speed_up_base uses Triton kernels: move the model to a CUDA device first")
    _apply_liger_kernel_to_instance(
        model=model, fused_linear_cross_entropy=fused_linear_cross_entropy, rms_norm=rms_norm, rope=rope,
        swiglu=swiglu, cross_entropy=False,
    )
    blocks.sync(model)  # liger replaced the MLPs' forwards: where LoRA sits on down_proj, the fused block again
    return model_type
