"""QLoRA on a whole model: quantize its Linear layers to 4 bits, prepare it for training, account for its
memory, and fold adapters back (exactly into 16 bits, or re-quantized with the error reported).

Loading a Hugging Face checkpoint straight into 4 bits lives in ``lorakit.quant_loading``. The workflow:

    model = lorakit.load_quantized("path/to/llama")          # or quantize_model(model_already_loaded)
    lorakit.prepare_for_kbit_training(model)
    lorakit.inject(model, LoraConfig(r=16, target_modules="all-linear"))
    ... train ...
    lorakit.save_adapter(model, "out")                       # a PEFT adapter, loads onto the 16-bit base too
    dense = lorakit.merge_to_dense(model, torch.bfloat16)     # a plain bf16 model, W = bf16(D(W4) + delta)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import QuantError
from .kernels.lora_linear import checkpoint_kwargs
from .layers import FrozenPackedLinear, Linear4bit, Linear8bit, LoraLayer, ModulesToSave
from .merge import merge, unload
from .model import _name_matches, _replace, lora_layers, output_head
from .quant.nf4 import _check_blocksize, _check_quant_type, check_weight


# ---------------------------------------------------------------------------------------------- quantize
@dataclass
class QuantizeReport:
    """What quantize_model changed: quantized and skipped Linear paths, weight bytes before and after."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        return (f"quantized {len(self.quantized)} Linear layers ({self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB), kept {len(self.skipped)} in 16 bits: {self.skipped}")


def quantize_targets(model: nn.Module, skip: Sequence[str] | None = None,
                     quantize_head: bool = False) -> tuple[list[str], list[str]]:
    """(paths to quantize, paths kept) among the model's plain nn.Linear layers.

    ``skip`` entries match a path exactly or as a dotted suffix ("lm_head", "mlp.down_proj"). The output head
    (``get_output_embeddings()`` on Hugging Face models) is kept unless ``quantize_head``. Only exact
    nn.Linear instances are converted: subclasses (e.g. inside nn.MultiheadAttention) are read directly by
    their owners and must keep a float weight.
    """
    if any(True for _ in lora_layers(model)) or any(isinstance(m, ModulesToSave) for m in model.modules()):
        raise QuantError("quantize the base model before injecting adapters: this model already has LoRA layers")
    head = None if quantize_head else output_head(model)
    targets, kept = [], []
    for path, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if path == head or any(_name_matches(s, path) for s in (skip or ())):
            kept.append(path)
        else:
            targets.append(path)
    return targets, kept


def check_quant_settings(bits: int, quant_type: str, double_quant: bool, blocksize: int, where: str) -> None:
    """QuantError for a width other than 4 or 8, a bad 4-bit format, or 4-bit settings given with bits=8
    (defaults only: int8 stores one code per value with one fp32 scale per row)."""
    if bits not in (4, 8):
        raise QuantError(f"{where}: bits must be 4 or 8, got bits={bits!r}")
    if bits == 8 and (quant_type, double_quant, blocksize) != ("nf4", True, 64):
        raise QuantError(f"{where}: quant_type, double_quant and blocksize are 4-bit settings; bits=8 "
                         "stores one int8 code per value with one fp32 scale per row")
    _check_quant_type(quant_type, where)
    _check_blocksize(blocksize, where)


def quantize_model(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, skip: Sequence[str] | None = None,
                   blocksize: int = 64, quantize_head: bool = False,
                   device: torch.device | str | None = None) -> QuantizeReport:
    """Replace the model's Linear layers by Linear4bit (or Linear8bit), in place, one layer at a time.

    Each weight is quantized (on ``device`` when given, else where it lives) and its 16-bit original dropped
    before the next layer, so with ``device="cuda"`` a model loaded on the CPU arrives on the GPU at its 4-bit
    size (peak: 4-bit model + one 16-bit layer). Embeddings, norms and the output head stay in 16 bits.
    Every weight is checked before the first one is converted: a NaN/Inf or non-float weight raises
    QuantError with the model untouched.

    Args:
        bits: 4 (NF4/FP4 blocks, QLoRA) or 8 (row-wise absmax int8, bitsandbytes' LLM.int8 weight format;
            quant_type, double_quant and blocksize do not apply to it).
        quant_type: "nf4" or "fp4".
        double_quant: 8-bit absmax values (QLoRA's double quantization).
        compute_dtype: dtype of the matmuls (None: the input's dtype).
        skip: Linear paths (or dotted suffixes) to keep in 16 bits.
        blocksize: values per absmax block.
        quantize_head: also quantize the output head.
        device: where the quantized layers (and the rest of the model, at the end) go.
    """
    check_quant_settings(bits, quant_type, double_quant, blocksize, "quantize_model")
    targets, kept = quantize_targets(model, skip, quantize_head)
    modules = dict(model.named_modules())
    for path in targets:
        check_weight(modules[path].weight, path)
    report = QuantizeReport(skipped=kept)
    for path in targets:
        linear = modules.pop(path)
        report.bytes_before += linear.weight.numel() * linear.weight.element_size()
        if bits == 8:
            layer = Linear8bit.from_linear(linear, compute_dtype=compute_dtype, device=device, where=path)
        else:
            layer = Linear4bit.from_linear(linear, blocksize=blocksize, quant_type=quant_type,
                                           double_quant=double_quant, compute_dtype=compute_dtype, device=device,
                                           where=path)
        _replace(model, path, layer)
        del linear
        report.bytes_after += layer.weight.numel() * layer.weight.element_size()
        report.bytes_after += sum(t.numel() * t.element_size() for t in layer.state_tensors())
        report.quantized.append(path)
    if device is not None:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return report


# ---------------------------------------------------------------------------------------------- training
def _norm_modules(model: nn.Module):
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("Norm", "RMSNorm", "LayerNorm")):
            yield module


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True,
                              upcast_norms: bool | None = None, upcast_logits: bool | None = None) -> nn.Module:
    """Get a 4-bit model ready for LoRA training (call before ``inject``).

    Freezes every parameter; enables gradient checkpointing (non-reentrant) and input gradients, so the
    checkpointed blocks see a tensor that requires grad; turns off the KV cache. Stability where it matters:
    with an fp16 model, norm weights go to fp32 and the head's logits are returned in fp32 (defaults None
    mean "only for fp16"). bf16 models keep bf16 norms: Hugging Face norms already compute in fp32 inside,
    and fp32 norm weights would turn every activation after them into fp32, doubling memory and time.
    """
    model_dtype = _float_dtype(model)
    upcast_norms = model_dtype == torch.float16 if upcast_norms is None else upcast_norms
    upcast_logits = model_dtype == torch.float16 if upcast_logits is None else upcast_logits
    for p in model.parameters():
        p.requires_grad_(False)
    if upcast_norms:
        for module in _norm_modules(model):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.to(torch.float32)
    if upcast_logits:
        head_path = output_head(model)
        if head_path:
            model.get_submodule(head_path).register_forward_hook(lambda m, i, out: out.float())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    if gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
            model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs())
        else:
            raise QuantError(f"prepare_for_kbit_training: {type(model).__name__} has no "
                             "gradient_checkpointing_enable(); pass gradient_checkpointing=False and checkpoint "
                             "its blocks yourself (torch.utils.checkpoint)")
    return model


# ---------------------------------------------------------------------------------------------- memory
@dataclass
class MemoryReport:
    """Bytes held by a model's tensors, by group (every storage counted once, tied weights included once).

    Attributes:
        quantized_weights: the packed 4-bit (or int8) codes.
        quant_state: absmax values (8-bit or fp32), code books and offsets.
        adapters: LoRA tensors (A, B, learnable scales) and modules_to_save copies.
        other: every other parameter and buffer (embeddings, norms, head, 16-bit Linears), by dtype name.
        quantized_params: number of weight values stored in 4 or 8 bits.
    """

    quantized_weights: int = 0
    quant_state: int = 0
    adapters: int = 0
    other: dict[str, int] = field(default_factory=dict)
    quantized_params: int = 0

    @property
    def total(self) -> int:
        return self.quantized_weights + self.quant_state + self.adapters + sum(self.other.values())

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * (self.quantized_weights + self.quant_state) / self.quantized_params if self.quantized_params else 0.0

    def __str__(self) -> str:
        rows = [("quantized weights", self.quantized_weights), ("quant state", self.quant_state),
                ("adapters", self.adapters)]
        rows += [(f"other ({k})", v) for k, v in sorted(self.other.items())]
        rows.append(("total", self.total))
        lines = [f"{name:<22}{b / 2**20:>12.2f} MiB" for name, b in rows]
        if self.quantized_params:
            lines.append(f"{'bits per quant. param':<22}{self.bits_per_quantized_param:>12.3f}")
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes per parameter group: 4/8-bit weights, quant state, adapters and the rest (16-bit leftovers)."""
    report = MemoryReport()
    seen: set[tuple] = set()

    def add(t: torch.Tensor | None) -> int:
        if t is None or t.device.type == "meta":
            return 0
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for module in model.modules():
        if isinstance(module, FrozenPackedLinear):
            report.quantized_weights += add(module.codes)
            add(module.weight)  # the same bytes, when FSDP prep stores them as a float Parameter: not "rest"
            report.quant_state += sum(add(t) for t in module.state_tensors())
            report.quantized_params += module.in_features * module.out_features
        elif isinstance(module, LoraLayer):
            for name in module.specs:
                report.adapters += sum(add(p) for p in module.adapter_parameters(name))
        elif isinstance(module, ModulesToSave):
            for copy in module.modules_to_save.values():
                report.adapters += sum(add(p) for p in copy.parameters())
    for t in list(model.parameters()) + list(model.buffers()):
        n = add(t)
        if n:
            key = str(t.dtype).removeprefix("torch.")
            report.other[key] = report.other.get(key, 0) + n
    return report


# ---------------------------------------------------------------------------------------------- merging
def merge_to_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active adapters into a plain 16-bit model, exactly, and remove lorakit from it (in place).

    Each adapted 4-bit weight becomes ``dtype(D(W) + delta)``: dequantized and summed in fp32, rounded once
    (one layer at a time, so the fp32 copy is never more than one layer). 4-bit layers without an adapter are
    dequantized. ``dtype`` defaults to each layer's original weight dtype.
    """
    for path, layer in list(lora_layers(model)):
        base = layer.base_layer
        if isinstance(base, FrozenPackedLinear):
            target = base.weight_dtype if dtype is None else dtype
            if layer.merged:
                layer.unmerge()  # a re-quantized merge is undone before the exact one
            layer.base_layer = base.to_linear(torch.float32)
            layer.merge()
            layer.base_layer.to(target)
    unload(model, merge_adapters=True)
    for path, module in list(model.named_modules()):
        if isinstance(module, FrozenPackedLinear):
            _replace(model, path, module.to_linear(dtype))
    return model


def merge_requantized(model: nn.Module, adapters: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Merge adapters into the 4/8-bit weights (W <- Q(D(W) + delta)) and report the error each re-quantization
    added: ``{path: {"mean_abs", "max_abs", "rel_fro"}}`` against the exact fp32 sum. The model stays 4-bit
    (``lorakit.unload`` then drops the LoRA layers); ``lorakit.unmerge`` takes the adapters back out
    approximately, or exactly after ``lorakit.merge(model, keep_original=True)``."""
    done = set(merge(model, adapters))
    return {path: dict(layer.base_layer.merge_error) for path, layer in lora_layers(model)
            if path in done and isinstance(layer.base_layer, FrozenPackedLinear)}


__all__ = ["MemoryReport", "QuantizeReport", "check_quant_settings", "memory_report", "merge_requantized",
           "merge_to_dense", "prepare_for_kbit_training", "quantize_model", "quantize_targets"]
