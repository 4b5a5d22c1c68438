"""Load a Hugging Face checkpoint straight into 4 (or 8) bits, one tensor at a time.

The model is built from its config with every parameter on the meta device (no memory, no random init;
buffers such as rotary frequencies are computed for real), its Linear layers are swapped for empty
Linear4bit layers, and then each tensor of the safetensors files is read alone, moved to the target device
and quantized (or cast, for embeddings and norms) before the next one is read. Peak memory is the 4-bit model
plus one 16-bit tensor; the full 16-bit model never exists.

Checkpoints that bitsandbytes already quantized (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``
... next to the packed ``weight``; for 8 bits, ``SCB`` and ``weight_format`` next to int8 codes) load as they
are, with no re-quantization.

Only transformers' config and model classes are used (imported here, lazily); safetensors files only, never
pickle.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import QuantError
from .layers import Linear4bit, Linear8bit
from .model import _replace
from .qlora import check_quant_settings, quantize_targets
from .quant.nf4 import QUANT_TYPES, QuantState, check_weight

_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                 "quant_state.bitsandbytes__fp4")
_INT8_SIBLINGS = ("SCB", "weight_format")  # next to an int8 ``weight``: read with it


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside the block every parameter a module registers is moved to the meta device at once (buffers are
    left alone): building an 8B model costs no memory and no initialisation time."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        held = module._parameters.get(name)
        if held is not None and held.device.type != "meta":
            module._parameters[name] = nn.Parameter(held.to("meta"), requires_grad=held.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QuantError(f"load_quantized: no safetensors weights in {str(path)!r} (looked for model.safetensors, "
                         "model.safetensors.index.json, *.safetensors); pickle checkpoints are not read")
    return files


def _resolve(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint key (checkpoints of a base model lack the task model's prefix)."""
    if key in names:
        return key
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


STORAGE_NAMES = (*QUANT_TYPES, "int8")
"""The names the command line uses for a packed base (``--quantize``): 4-bit NF4/FP4 or row-wise int8."""


def load_quantized_named(path: str | Path, storage: str, dtype: torch.dtype,
                         device: torch.device | str = "cpu", double_quant: bool = True) -> nn.Module:
    """``load_quantized`` with the base format given by name (nf4, fp4: 4-bit blocks of 64; int8), computing
    in ``dtype``: what ``lorakit generate``, ``merge`` and ``serve`` call for ``--quantize``."""
    if storage not in STORAGE_NAMES:
        raise QuantError(f"unknown base storage {storage!r}; expected one of {', '.join(STORAGE_NAMES)}")
    if storage == "int8":
        return load_quantized(path, bits=8, dtype=dtype, compute_dtype=dtype, device=device)
    return load_quantized(path, bits=4, quant_type=storage, double_quant=double_quant, dtype=dtype,
                          compute_dtype=dtype, device=device)


def load_quantized(path: str | Path, *, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64,
                   dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", skip: Sequence[str] | None = None,
                   quantize_head: bool = False, model_class=None) -> nn.Module:
    """Build a Hugging Face model from a local folder with its Linear layers in 4 bits (or 8).

    Args:
        path: folder with config.json and safetensors weights (single file or sharded with an index).
        bits: 4 (Linear4bit) or 8 (Linear8bit: row-wise int8).
        quant_type, double_quant, blocksize: the 4-bit format (see quantize_model).
        dtype: dtype of everything kept in 16 bits (embeddings, norms, head) and of the dequantized weights.
        compute_dtype: matmul dtype of the 4-bit layers (None: the input's).
        device: where the model is built ("cuda" to stream a checkpoint onto the GPU).
        skip, quantize_head: Linear layers kept in 16 bits (the head by default), as in quantize_model.
        model_class: a transformers class with ``from_config`` (default AutoModelForCausalLM).

    Raises:
        QuantError: missing folder/config/weights, a checkpoint tensor of the wrong shape, NaN/Inf weights,
            or weights the checkpoint lacks.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    check_quant_settings(bits, quant_type, double_quant, blocksize, "load_quantized")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise QuantError(f"load_quantized: {str(path)!r} has no config.json (expected a local Hugging Face "
                         "model folder)")
    files = _checkpoint_files(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with _parameters_on_meta():
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=dtype)
    model.eval()
    targets, _ = quantize_targets(model, skip, quantize_head)
    for target in targets:
        linear = model.get_submodule(target)
        shape = dict(in_features=linear.in_features, out_features=linear.out_features,
                     bias=linear.bias is not None, compute_dtype=compute_dtype, weight_dtype=dtype, device="meta")
        _replace(model, target, Linear8bit(**shape) if bits == 8 else
                 Linear4bit(**shape, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant))
    quantized = {f"{t}.weight": model.get_submodule(t) for t in targets}
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "")
    expected_shapes = {n: tuple(t.shape) for n, t in model.named_parameters(remove_duplicate=False)}
    expected_shapes |= {n: tuple(t.shape) for n, t in model.named_buffers(remove_duplicate=False)}
    expected_shapes.update({n: (m.out_features, m.in_features) for n, m in quantized.items()})
    loaded, unexpected = set(), []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            key_set = set(keys)
            bnb_states = {k.rsplit(".", 1)[0] for k in keys if ".quant_state.bitsandbytes__" in k}
            for key in keys:
                if any(key.endswith("." + s) for s in _BNB_SUFFIXES) and not key.endswith(".weight"):
                    continue  # part of a pre-quantized state, read with its weight
                if key.rpartition(".")[2] in _INT8_SIBLINGS and key.rpartition(".")[0] + ".weight" in key_set:
                    continue  # an int8 weight's row scales / format flag: read with the weight
                name = _resolve(key, names, prefix)
                if name is None:
                    unexpected.append(key)
                    continue
                if key.endswith(".weight") and any(s.startswith(key + ".quant_state") for s in bnb_states):
                    _load_prequantized(f, keys, key, name, quantized, device)
                elif key.endswith(".weight") and key.removesuffix("weight") + "SCB" in key_set:
                    _load_prequantized_int8(f, key_set, key, name, quantized, device)
                else:  # in a function of its own: the 16-bit tensor dies before the next one is read
                    _load_one(f, key, name, model, quantized, expected_shapes, dtype, device)
                loaded.add(name)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_4bit = {n.removesuffix("weight") for n, m in quantized.items() if m.weight.device.type == "meta"}
    missing = sorted(n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                     if t.device.type == "meta" and n.rpartition(".")[0] + "." not in still_4bit)
    missing += sorted(p + "weight" for p in still_4bit)
    if missing:
        raise QuantError(f"load_quantized: the checkpoint in {str(path)!r} lacks {len(missing)} tensors the model "
                         f"needs, e.g. {missing[:8]}")
    model.to(device)  # buffers computed at build time (rotary frequencies, ...)
    model.lorakit_load_report = {"quantized": targets, "unexpected_keys": unexpected}
    return model


def _load_one(f, key: str, name: str, model: nn.Module, quantized: dict, expected_shapes: dict,
              dtype: torch.dtype, device) -> None:
    tensor = f.get_tensor(key)
    if name in expected_shapes and tuple(tensor.shape) != expected_shapes[name]:
        raise QuantError(f"load_quantized: checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the model "
                         f"expects {expected_shapes[name]}")
    if name in quantized:
        check_weight(tensor, key)
        quantized[name]._load_float_weight(tensor.to(device), key)
        return
    if tensor.dtype.is_floating_point:
        tensor = tensor.to(dtype)
    _set_tensor(model, name, tensor.to(device))


def _load_prequantized_int8(f, keys: set[str], key: str, name: str, quantized: dict, device) -> None:
    """An int8 weight with its ``SCB`` (bitsandbytes' Linear8bitLt or lorakit's Linear8bit): used as is."""
    layer = quantized.get(name)
    if not isinstance(layer, Linear8bit):
        raise QuantError(f"load_quantized: {key!r} is int8 in the checkpoint; load it with bits=8 (and the "
                         "same skip/quantize_head settings)")
    stem = key.removesuffix("weight")
    if stem + "weight_format" in keys and int(f.get_tensor(stem + "weight_format")) != 0:
        raise QuantError(f"load_quantized: {stem}weight_format is not bitsandbytes' row-major format (0)")
    layer.set_quantized(f.get_tensor(key).to(device), f.get_tensor(stem + "SCB").to(device), key)


def _load_prequantized(f, keys: list[str], key: str, name: str, quantized: dict, device) -> None:
    """A weight bitsandbytes already quantized: read its state and install it unchanged."""
    layer = quantized.get(name)
    if layer is None:
        raise QuantError(f"load_quantized: {key!r} is 4-bit in the checkpoint but {name!r} is not a quantized "
                         "Linear here (skip/quantize_head settings?)")
    state_keys = [k for k in keys if k.startswith(key + ".")]
    state = QuantState.from_bnb_dict({k[len(key) + 1:]: f.get_tensor(k) for k in state_keys}, where=key)
    layer.set_quantized(f.get_tensor(key).to(device), state.to(device), key)
