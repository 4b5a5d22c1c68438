"""The one place that knows layer types: base-layer type -> how to wrap it in a LoRA layer.

Other modules ask ``lookup(module)``; nothing else in lorakit tests module types or names. Later layer
families (4-bit Linear, ...) call ``register`` for their own base type.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .config import LoraConfig
from .errors import ConfigError
from .layers import Conv, Embedding, FusedLinear, Linear, Linear4bit, Linear8bit, LoraLayer
from .layers.dora import DoraConv, DoraFusedLinear, DoraLayer, DoraLinear, upgrade_to_dora


@dataclass(frozen=True)
class LayerType:
    """How to wrap one base type. ``kind`` groups types for "all-linear" ("linear", "embedding", "conv")."""

    build: Callable[[nn.Module, str, LoraConfig], LoraLayer]
    kind: str


def _linear(fan_in_fan_out: bool) -> Callable[[nn.Module, str, LoraConfig], LoraLayer]:
    def build(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
        fifo = fan_in_fan_out if config.fan_in_fan_out is None else config.fan_in_fan_out
        fused = config.fused_for(name)
        if fused is not None:
            return (DoraFusedLinear if config.use_dora else FusedLinear)(module, fused, fan_in_fan_out=fifo)
        # exact types only: a subclass may compute something else than x @ W.T + b
        cls = DoraLinear if config.use_dora else Linear
        return cls(module, fan_in_fan_out=fifo, plain_matmul=type(module) in _PLAIN_MATMUL)

    return build


def _conv(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    return DoraConv(module) if config.use_dora else Conv(module)


def _embedding(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    if config.use_dora:
        raise ConfigError(
            f"use_dora=True, but {name!r} is an embedding: lorakit has DoRA for Linear, GPT-2 Conv1D and Conv "
            "layers; leave embeddings out of target_modules (or give them a separate LoraConfig without DoRA)"
        )
    return Embedding(module)


_PLAIN_MATMUL: set[type] = {nn.Linear, Linear4bit, Linear8bit}
"""Base types whose forward is exactly ``x @ W.T + b`` (or ``x @ W + b`` when fan_in_fan_out; for Linear4bit
and Linear8bit with W dequantized to their compute dtype): the fused LoRA kernel may compute them itself."""


_REGISTRY: dict[type, LayerType] = {
    nn.Linear: LayerType(_linear(False), "linear"),
    Linear4bit: LayerType(_linear(False), "linear"),  # 4-bit base: the ordinary LoRA Linear on top
    Linear8bit: LayerType(_linear(False), "linear"),
    nn.Embedding: LayerType(_embedding, "embedding"),
    nn.Conv1d: LayerType(_conv, "conv"),
    nn.Conv2d: LayerType(_conv, "conv"),
    nn.Conv3d: LayerType(_conv, "conv"),
}
_hf_registered = False


def register(base_type: type, build: Callable[[nn.Module, str, LoraConfig], LoraLayer], kind: str) -> None:
    """Teach lorakit to wrap ``base_type`` (and its subclasses) with the layer ``build`` returns."""
    _REGISTRY[base_type] = LayerType(build, kind)


@dataclass(frozen=True)
class MlpBlock:
    """An MLP block whose forward is exactly ``down(act(gate(x)) * up(x))`` (``gate`` None: ``down(act(up(x)))``,
    then ``dropout`` when named): attribute names of its parts. lorakit.blocks may then compute it as one
    fused LoRA op that stores less (kernels.gated_mlp)."""

    gate: str | None
    up: str
    down: str
    act: str
    dropout: str | None = None


_LLAMA_MLP = MlpBlock(gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")
_HF_MLP_BLOCKS = {  # transformers module -> (class, block); exact classes whose forward is the one above
    "llama": ("LlamaMLP", _LLAMA_MLP),
    "mistral": ("MistralMLP", _LLAMA_MLP),
    "qwen2": ("Qwen2MLP", _LLAMA_MLP),
    "qwen3": ("Qwen3MLP", _LLAMA_MLP),
    "gemma": ("GemmaMLP", _LLAMA_MLP),
    "gemma2": ("Gemma2MLP", _LLAMA_MLP),
    "smollm3": ("SmolLM3MLP", _LLAMA_MLP),
    "olmo": ("OlmoMLP", _LLAMA_MLP),
    "granite": ("GraniteMLP", _LLAMA_MLP),
    "cohere": ("CohereMLP", _LLAMA_MLP),
}
# Not GPT-2's MLP (c_proj(act(c_fc(x))), the ungated case): its gelu_new is a chain of small ops, and redoing
# them in backward made a CPU step 8% slower (tests/test_blocks.py checks that case through a test block).
_MLP_BLOCKS: dict[type, MlpBlock] = {}


def _hf_entry(module: nn.Module, table: dict, resolved: dict):
    """``module``'s entry in one of the Hugging Face tables above (model type -> (class name, entry)), by exact
    type (a subclass may compute something else); ``resolved`` caches class -> entry (and holds registrations).

    A class is known by where it was defined (its ``__module__`` and name), not by what the transformers module
    holds under that name now: liger-kernel replaces ``modeling_llama.LlamaMLP`` with its own class at module
    level, after which a name lookup would miss every existing LlamaMLP instance (and take liger's class, which
    has no ``act_fn``, for the block). A transformers class that another family's module reuses under the
    same name is known through that module too."""
    cls = type(module)
    entry = resolved.get(cls)
    if entry is not None:
        return entry
    defined_in = getattr(cls, "__module__", "") or ""
    for model_type, (cls_name, entry) in table.items():
        module_name = f"transformers.models.{model_type}.modeling_{model_type}"
        if cls.__qualname__ != cls_name:
            continue
        reused = defined_in.startswith("transformers.") and getattr(sys.modules.get(module_name), cls_name, None) is cls
        if defined_in == module_name or reused:
            resolved[cls] = entry
            return entry
    return None


def mlp_block(module: nn.Module) -> MlpBlock | None:
    """The MlpBlock of a module of a known MLP class."""
    _register_transformers()
    return _hf_entry(module, _HF_MLP_BLOCKS, _MLP_BLOCKS)


_QKV = ("q_proj", "k_proj", "v_proj")
_HF_SHARED_INPUT = {  # transformers module -> attention class whose forward calls these on one hidden_states
    model_type: (f"{prefix}Attention", _QKV) for model_type, prefix in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("gemma", "Gemma"),
        ("gemma2", "Gemma2"), ("smollm3", "SmolLM3"), ("olmo", "Olmo"), ("granite", "Granite"),
        ("cohere", "Cohere"))
}
_SHARED_INPUT: dict[type, tuple[str, ...]] = {}


def shared_input_projections(module: nn.Module) -> tuple[str, ...]:
    """Names of the projections a module of a known class applies to one and the same input in one forward
    (self-attention's q, k, v): lorakit.blocks may compute them as one op. Empty for other modules."""
    return _hf_entry(module, _HF_SHARED_INPUT, _SHARED_INPUT) or ()


_LLAMA_NORMS = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
_HF_DECODER_LAYERS = {  # transformers module -> decoder layer class whose forward is Llama's: (hidden_states,
    # attention_mask=, position_embeddings=(cos, sin), ...) -> hidden_states (lorakit.graphs replays these);
    # the entry: (norm, the module whose forward alone reads that norm's output) pairs
    model_type: (f"{prefix}DecoderLayer", _LLAMA_NORMS) for model_type, prefix in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))
}
_DECODER_LAYERS: dict[type, tuple[tuple[str, str], ...]] = {}


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers of a known class in ``model``, in module order (the order a forward calls them)."""
    return [(name, m) for name, m in model.named_modules() if _hf_entry(m, _HF_DECODER_LAYERS, _DECODER_LAYERS)]


def norm_consumers(layer: nn.Module) -> tuple[tuple[str, str], ...]:
    """For a decoder layer of a known class: (norm, consumer) attribute names, the consumer's forward being the
    only reader of the norm's output (Llama's input_layernorm -> self_attn). Empty for other modules."""
    return _hf_entry(layer, _HF_DECODER_LAYERS, _DECODER_LAYERS) or ()


_HF_RMS_NORMS = {  # transformers module -> RMSNorm class whose forward is LlamaRMSNorm's: the float32 mean of
    # squares, x * rsqrt(mean + variance_epsilon) cast back, then weight * that (lorakit.blocks.WideNorm redoes it)
    model_type: (f"{prefix}RMSNorm", True) for model_type, prefix in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))
}
_RMS_NORMS: dict[type, bool] = {}


def is_rms_norm(module: nn.Module) -> bool:
    """True for an RMSNorm of a known class (exact type) whose forward is LlamaRMSNorm's."""
    return bool(_hf_entry(module, _HF_RMS_NORMS, _RMS_NORMS))


def known_decoder_layers() -> list[str]:
    return sorted(cls for cls, _ in _HF_DECODER_LAYERS.values())


_HF_DECODER_MODELS = {  # transformers module -> base model class whose forward applies ``self.norm`` to the last
    # decoder layer's output and to nothing else (``hidden_states = self.norm(hidden_states)`` after the loop)
    model_type: (f"{prefix}Model", "norm") for model_type, prefix in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))
}
_DECODER_MODELS: dict[type, str] = {}


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a base model of a known class applies to its last decoder layer's output (LlamaModel.norm),
    or None (lorakit.graphs may fold it into the last layer's graph)."""
    for _, m in model.named_modules():
        attr = _hf_entry(m, _HF_DECODER_MODELS, _DECODER_MODELS)
        if attr is not None and isinstance(getattr(m, attr, None), nn.Module):
            return getattr(m, attr)
    return None


_EQUIVALENT_FORWARDS = [  # (module, class) whose forward, bound on an instance, computes that instance's block
    ("liger_kernel.transformers.swiglu", "LigerSwiGLUMLP"),  # speed_up_base's SwiGLU: down(silu(gate) * up)
]


def computes_block(module: nn.Module, forward) -> bool:
    """True when ``forward`` (an instance attribute of ``module``) is another library's implementation of
    the same block, e.g. liger-kernel's SwiGLU MLP bound by ``lorakit.fast.speed_up_base``."""
    func = getattr(forward, "__func__", None)
    if func is None or getattr(forward, "__self__", None) is not module:
        return False
    for module_name, cls_name in _EQUIVALENT_FORWARDS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if cls is not None and func is cls.forward:
            return True
    return False


def is_silu(act: nn.Module) -> bool:
    """True for activation modules that compute exactly ``F.silu``: torch's and transformers' SiLU."""
    if type(act) is nn.SiLU:
        return True
    activations = sys.modules.get("transformers.activations")
    return activations is not None and type(act) is getattr(activations, "SiLUActivation", None)


def _register_transformers() -> None:
    """GPT-2's Conv1D is a Linear with its weight stored (in, out). Registered only once transformers is
    imported: a model cannot hold a Conv1D before that, and lorakit never imports transformers itself."""
    global _hf_registered
    if _hf_registered or "transformers.pytorch_utils" not in sys.modules:
        return
    from transformers.pytorch_utils import Conv1D

    register(Conv1D, _linear(True), "linear")
    _PLAIN_MATMUL.add(Conv1D)

    _hf_registered = True


def lookup(module: nn.Module) -> LayerType | None:
    """The LayerType for a module (searching its class hierarchy), or None when lorakit cannot adapt it."""
    _register_transformers()
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def layer_for(module: nn.Module, path: str, config: LoraConfig) -> LoraLayer:
    """The LoRA layer that will hold a new adapter of ``config`` at ``path``: a new wrapper around a plain module;
    an existing LoRA layer itself; or, when a DoRA adapter joins a layer built for plain LoRA, a DoRA layer of
    the same family that takes over its adapters (the caller swaps it in only once everything succeeded)."""
    if not isinstance(module, LoraLayer):
        return lookup(module).build(module, path, config)
    if config.use_dora and not isinstance(module, DoraLayer):
        return upgrade_to_dora(module, path)
    return module


def supported_types() -> list[str]:
    _register_transformers()
    return sorted(t.__name__ for t in _REGISTRY)
