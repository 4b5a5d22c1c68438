"""Adapter files: safetensors + JSON, in Hugging Face PEFT's layout so PEFT, vLLM and others read them.

A folder holds:
    adapter_model.safetensors  tensors under PEFT keys ``base_model.model.<path>.lora_A.weight`` ...
    adapter_config.json        PEFT's LoraConfig (peft_type "LORA"), per-layer rank/alpha as exact patterns
    lorakit.json               lorakit's own config (fused slices, learnable scale, dtype), read back first

Only safetensors is ever read (never pickle). Every file is written atomically (temp file + rename), and a
load validates keys, shapes and dtypes before anything reaches the model: on error the model is as before.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FusedSpec, LoraConfig
from .errors import AdapterLoadError, ConfigError, LoraError
from .layers.pissa import check_pissa, pissa_residual
from .model import Summary, _saved_modules, configs, delete_adapter, inject, lora_layers, summary
from .parametrize import (
    delete_parametrized_adapter,
    load_parametrized_state,
    parametrize,
    parametrized_configs,
    parametrized_layers,
    parametrized_state_dict,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORAKIT_CONFIG = "lorakit.json"
PREFIX = "base_model.model."
FORMAT_VERSION = 1

# PEFT fields lorakit cannot honour when they hold anything but their default.
_UNSUPPORTED = {
    "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
    "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
    "use_qalora": False, "alora_invocation_tokens": None,
}


_PLAIN_INITS = ("eva", "orthogonal", "mica")
"""PEFT inits (besides True/False/"gaussian") that leave the base weights alone: a saved adapter is plain LoRA."""


# ------------------------------------------------------------------------------------------ state
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk keys (modules_to_save copies included)."""
    _require_adapter(model, name)
    if _method(model, name) == "parametrize":
        return {k: v.detach() for k, v in parametrized_state_dict(model, name).items()}
    state: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.specs:
            for key, tensor in layer.peft_state(name).items():
                state[f"{PREFIX}{path}.{key}"] = tensor.detach()
    for path, saved in _saved_modules(model):
        if name in saved.modules_to_save:
            for key, tensor in saved.modules_to_save[name].state_dict().items():
                state[f"{PREFIX}{path}.{key}"] = tensor.detach()
    return state


def _require_adapter(model: nn.Module, name: str) -> None:
    if name not in configs(model) and name not in parametrized_configs(model):
        known = sorted(configs(model)) + sorted(parametrized_configs(model))
        raise AdapterLoadError(f"the model has no adapter named {name!r}; it has {known}")


def _method(model: nn.Module, name: str) -> str:
    """"inject" (wrapper layers) or "parametrize" (weight parametrizations): the same file either way."""
    return "inject" if name in configs(model) else "parametrize"


def _holders(model: nn.Module, name: str) -> list[tuple[str, Any]]:
    """(path, module holding adapter ``name``): LoRA layers for inject, parametrizations for parametrize."""
    if _method(model, name) == "parametrize":
        return [(path, lp) for path, _, lp in parametrized_layers(model) if name in lp.specs]
    return [(path, layer) for path, layer in lora_layers(model) if name in layer.specs]


# ------------------------------------------------------------------------------------------ save
def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write adapter ``name`` to ``directory`` as a PEFT-compatible folder; returns the folder.

    Files are replaced one by one atomically; other files in the folder are left alone.
    """
    from .prefix import prefix_adapters, save_prefix

    if name in prefix_adapters(model):
        return save_prefix(model, directory, name, base_model_name_or_path=base_model_name_or_path)
    _require_adapter(model, name)
    config = (configs(model) if _method(model, name) == "inject" else parametrized_configs(model))[name]
    lorakit_cfg = _lorakit_json(model, name, config)
    peft_cfg = _peft_json(model, name, config, lorakit_cfg, base_model_name(model, base_model_name_or_path), task_type)
    return write_adapter_folder(directory, adapter_state_dict(model, name), peft_cfg, lorakit_cfg)


def base_model_name(model: nn.Module, given: str | None) -> str | None:
    """``given``, else the Hugging Face ``config._name_or_path`` of the model (None when it has none)."""
    if given is not None:
        return given
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def write_adapter_folder(directory: str | os.PathLike, state: dict[str, torch.Tensor], peft_cfg: dict,
                         lorakit_cfg: dict) -> Path:
    """Write the three files of an adapter folder, each atomically (weights first, configs after)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    _atomic_write(directory / ADAPTER_WEIGHTS, lambda f: save_file(state, f, metadata={"format": "pt"}))
    _atomic_write(directory / ADAPTER_CONFIG, lambda f: Path(f).write_text(json.dumps(peft_cfg, indent=2)))
    _atomic_write(directory / LORAKIT_CONFIG, lambda f: Path(f).write_text(json.dumps(lorakit_cfg, indent=2)))
    return directory


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode a plain open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _serializable_targets(value: Any, wrapped: list[str]) -> Any:
    """Names and regexes are kept as given; types and predicates become the explicit list of paths."""
    if value is None or isinstance(value, str):
        return value
    if all(isinstance(v, str) for v in value):
        return list(value)
    return list(wrapped) if wrapped else None  # full paths: PEFT matches list entries exactly or as suffixes


def _exact(path: str) -> str:
    return re.escape(path)


def _layer_overrides(model: nn.Module, name: str, config: LoraConfig, peft: bool) -> tuple[dict, dict]:
    """Per-layer (rank, alpha) wherever a layer differs from the config: fused layers (PEFT sees rank r * k)
    and learned scales (folded into alpha so that alpha / r, or alpha / sqrt(r), equals the learned value)."""
    ranks, alphas = {}, {}
    for path, layer in _holders(model, name):
        spec = layer.specs[name]
        r, alpha = layer.peft_rank_alpha(name) if peft else (spec.r, spec.alpha)
        if spec.learnable_scale:
            denom = math.sqrt(r) if spec.use_rslora else r
            alpha = float(torch.as_tensor(layer.scale(name)).detach()) * denom
        if r != config.rank_for(path):
            ranks[_exact(path)] = r
        if alpha != config.alpha_for(path):
            alphas[_exact(path)] = alpha
    return ranks, alphas


def _lorakit_json(model: nn.Module, name: str, config: LoraConfig) -> dict:
    wrapped = [p for p, _ in _holders(model, name)]
    targets = _serializable_targets(config.target_modules, wrapped)
    excludes = config.exclude_modules
    if excludes is not None and not isinstance(excludes, str) and not all(isinstance(e, str) for e in excludes):
        targets, excludes = list(wrapped), None  # the path list already has the exclusions applied
    ranks, alphas = _layer_overrides(model, name, config, peft=False)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in adapter_state_dict(model, name).values()}
    return {
        "format_version": FORMAT_VERSION,
        "r": config.r,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "target_modules": targets,
        "exclude_modules": list(excludes) if isinstance(excludes, (list, tuple)) else excludes,
        "rank_pattern": {**ranks, **config.rank_pattern},
        "alpha_pattern": {**alphas, **config.alpha_pattern},
        "bias": config.bias,
        "modules_to_save": list(config.modules_to_save),
        "init": config.init,
        "use_rslora": config.use_rslora,
        "learnable_scale": config.learnable_scale,
        "fan_in_fan_out": config.fan_in_fan_out,
        "fused_slices": {k: {"enabled": list(v.enabled), "sizes": list(v.sizes) if v.sizes else None}
                         for k, v in config.fused_slices.items()},
        "dtype": str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
        "saved_dtypes": sorted(dtypes),
        "merge_on_eval": config.merge_on_eval,
        "use_dora": config.use_dora,
        "method": _method(model, name),
        "wrapped_modules": wrapped,
    }


def _peft_json(model, name, config, kit: dict, base_model: str | None, task_type: str | None) -> dict:
    ranks, alphas = _layer_overrides(model, name, config, peft=True)
    fifo = any(getattr(layer, "fan_in_fan_out", False) for _, layer in _holders(model, name))
    targets = kit["target_modules"]
    if isinstance(targets, list) and not targets:
        targets = None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "exclude_modules": kit["exclude_modules"],
        "rank_pattern": {**ranks, **config.rank_pattern},
        "alpha_pattern": {**alphas, **config.alpha_pattern},
        "bias": config.bias,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": True if config.init == "kaiming" else config.init,  # "gaussian", "pissa[_niter_N]"
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": fifo,
        "use_dora": config.use_dora,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


# ------------------------------------------------------------------------------------------ read
def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check a saved adapter folder: (LoraConfig, tensors under PEFT keys). Touches no model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {str(directory)!r} does not exist")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {pickled}: pickle files are never loaded, convert them to safetensors)" if pickled else ""
        raise AdapterLoadError(f"{str(weights)!r} is missing{hint}")
    config = _read_config(directory)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterLoadError(f"{str(weights)!r} is truncated or not a safetensors file: {err}") from None
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterLoadError(f"key {key!r} in {weights.name} does not start with {PREFIX!r}; not a PEFT adapter")
        if not tensor.dtype.is_floating_point:
            raise AdapterLoadError(f"key {key!r} holds {tensor.dtype}; adapter tensors must be floating point")
    return config, tensors


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{str(path)!r} must hold a JSON object")
    return data


def _read_config(directory: Path) -> LoraConfig:
    kit_path, peft_path = directory / LORAKIT_CONFIG, directory / ADAPTER_CONFIG
    try:
        if kit_path.is_file():
            return _config_from_lorakit(_read_json(kit_path))
        if peft_path.is_file():
            return _config_from_peft(_read_json(peft_path))
    except (ConfigError, KeyError, TypeError) as err:
        raise AdapterLoadError(f"adapter config in {str(directory)!r} is invalid: {err}") from None
    raise AdapterLoadError(f"{str(directory)!r} has neither {ADAPTER_CONFIG} nor {LORAKIT_CONFIG}")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}")
    return dtype


def _config_from_lorakit(d: dict) -> LoraConfig:
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(f"{LORAKIT_CONFIG} has format_version {d['format_version']}; this lorakit reads "
                               f"up to {FORMAT_VERSION}: upgrade lorakit")
    return LoraConfig(
        r=d["r"], alpha=d["alpha"], dropout=d["dropout"], target_modules=d["target_modules"],
        exclude_modules=d.get("exclude_modules"), rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {}, bias=d.get("bias", "none"),
        modules_to_save=tuple(d.get("modules_to_save") or ()), init=d.get("init", "kaiming"),
        use_rslora=d.get("use_rslora", False), learnable_scale=d.get("learnable_scale", False),
        fan_in_fan_out=d.get("fan_in_fan_out"),
        fused_slices={k: FusedSpec.coerce(v) for k, v in (d.get("fused_slices") or {}).items()},
        dtype=_dtype(d.get("dtype")), merge_on_eval=d.get("merge_on_eval", False),
        use_dora=d.get("use_dora", False),
    )


def _config_from_peft(d: dict) -> LoraConfig:
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"this is a {d.get('peft_type')} adapter; lorakit loads LoRA adapters (peft_type LORA)")
    for field, default in _UNSUPPORTED.items():
        value = d.get(field, default)
        if value not in (default, None, False, [], {}):
            raise AdapterLoadError(f"adapter_config.json sets {field}={value!r}, which lorakit cannot load yet")
    init = d.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian" and not init.startswith("pissa") and init not in _PLAIN_INITS:
        raise AdapterLoadError(
            f"adapter_config.json has init_lora_weights={init!r}, an initialization that changes the base weights; "
            "lorakit can re-apply 'pissa' and 'pissa_niter_<N>' only"
        )
    return LoraConfig(
        r=d["r"], alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
        target_modules=d.get("target_modules"), exclude_modules=d.get("exclude_modules"),
        rank_pattern=d.get("rank_pattern") or {}, alpha_pattern=d.get("alpha_pattern") or {},
        bias=d.get("bias", "none"), modules_to_save=tuple(d.get("modules_to_save") or ()),
        init=init if isinstance(init, str) and init not in _PLAIN_INITS else "kaiming",
        use_rslora=d.get("use_rslora", False),
        fan_in_fan_out=None,  # detected per layer (PEFT forces True for GPT-2's Conv1D anyway)
        use_dora=d.get("use_dora", False),
    )


# ------------------------------------------------------------------------------------------ load
def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    is_trainable: bool = False,
    dtype: torch.dtype | None = None,
    method: str | None = None,
) -> Summary:
    """Add the adapter saved in ``directory`` to ``model`` under ``name`` (PEFT or lorakit folders).

    Args:
        is_trainable: leave the loaded adapter trainable (to continue training); default frozen for inference.
        dtype: adapter dtype; None keeps the dtype stored in the file.
        method: "inject" (wrapper layers) or "parametrize" (weight parametrizations); None: as it was saved
            (PEFT folders: "inject"). Both read and write the same files.

    Raises AdapterLoadError naming the first offending key (with expected and found shapes) when the file
    does not fit the model; the model is then exactly as before the call.
    """
    if _peft_type(directory) == "PREFIX_TUNING":
        from .prefix import load_prefix

        return load_prefix(model, directory, name, is_trainable=is_trainable, dtype=dtype)
    config, tensors = read_adapter(directory)
    file_dtypes = {t.dtype for t in tensors.values()}
    if dtype is None and config.dtype is None and len(file_dtypes) == 1:
        dtype = next(iter(file_dtypes))
    if dtype is not None:
        config = config.replace(dtype=dtype)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    method = method or _saved_method(directory)
    if method == "parametrize":
        return _load_parametrized(model, directory, name, config, tensors, trainable, is_trainable)
    if method != "inject":
        raise ConfigError(f"method must be 'inject' or 'parametrize', got {method!r}")
    pissa = config.init.startswith("pissa")  # the residual is taken out of W0 last, once the file has been checked
    try:
        inject(model, config.replace(init="kaiming") if pissa else config, name)
    except LoraError as err:
        raise AdapterLoadError(f"adapter in {str(directory)!r} does not fit this model: {err}") from None
    try:
        _copy_into(model, name, tensors)
        if pissa:
            _apply_pissa(model, name, config, directory)
    except BaseException:
        delete_adapter(model, name)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        raise
    if not is_trainable:  # inject left the new adapter trainable and everything else frozen
        for _, layer in lora_layers(model):
            if name in layer.specs:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(False)
        for _, saved in _saved_modules(model):
            if name in saved.modules_to_save:
                saved.modules_to_save[name].requires_grad_(False)
    return summary(model, name)


def _apply_pissa(model: nn.Module, name: str, config: LoraConfig, directory) -> None:
    """Take the PiSSA principal part out of the base weights, as PEFT does when it loads a "pissa" adapter: the
    file holds the trained A, B of an adapter whose residual came from these very base weights."""
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.specs]
    try:
        for path, layer in layers:
            check_pissa(layer, layer.specs[name].r, path)
    except ConfigError as err:
        raise AdapterLoadError(f"adapter in {str(directory)!r} does not fit this model: {err}") from None
    for _, layer in layers:
        pissa_residual(layer, name, config.init)
    configs(model)[name] = config


def _load_parametrized(model, directory, name, config, tensors, trainable, is_trainable) -> Summary:
    try:
        info = parametrize(model, config, name)
    except LoraError as err:
        raise AdapterLoadError(f"adapter in {str(directory)!r} does not fit this model: {err}") from None
    try:
        load_parametrized_state(model, tensors, name)
    except BaseException:
        delete_parametrized_adapter(model, name)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        raise
    if not is_trainable:
        for _, _, lp in parametrized_layers(model):
            if name in lp.specs:
                for p in lp.adapter_parameters(name):
                    p.requires_grad_(False)
        return summary(model, name)
    return info


def _saved_method(directory: str | os.PathLike) -> str:
    path = Path(directory) / LORAKIT_CONFIG
    try:
        return json.loads(path.read_text()).get("method", "inject")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return "inject"


def _peft_type(directory: str | os.PathLike) -> str | None:
    """peft_type of a saved folder's adapter_config.json (None when there is none or it cannot be read)."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("peft_type") if isinstance(data, dict) else None


def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    expected = adapter_state_dict(model, name)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise AdapterLoadError(
            f"key {unexpected[0]!r} in the file has no place in this model ({len(unexpected)} such keys): an "
            "adapter for another base model?"
        )
    if missing:
        raise AdapterLoadError(f"key {missing[0]!r} is missing from the file ({len(missing)} missing keys)")
    for key, want in expected.items():
        found = tensors[key]
        if tuple(found.shape) != tuple(want.shape):
            raise AdapterLoadError(
                f"key {key!r}: the model expects shape {tuple(want.shape)}, the file has {tuple(found.shape)} "
                "- an adapter for another base model (or another rank)?"
            )
    by_path = {f"{PREFIX}{p}.": layer for p, layer in lora_layers(model) if name in layer.specs}
    for prefix, layer in by_path.items():
        local = layer.peft_state(name)  # each tensor in its own dtype (a DoRA magnitude stays fp32)
        layer.load_peft_state(name, {k: tensors[prefix + k].to(v.dtype) for k, v in local.items()})
    for path, saved in _saved_modules(model):
        if name in saved.modules_to_save:
            prefix = f"{PREFIX}{path}."
            module = saved.modules_to_save[name]
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

