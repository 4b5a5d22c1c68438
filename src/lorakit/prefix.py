"""Prefix tuning (Li & Liang 2021) for Hugging Face causal LMs, through the model's past-key-values interface.

Each attention layer gets ``num_virtual_tokens`` trainable key and value vectors that every real token attends
to, as if a prompt of virtual tokens had been run before the input. Nothing inside the model is replaced: a
forward pre-hook on the model puts the prefix into ``past_key_values`` (a ``DynamicCache``), prepends ones to a
2-D ``attention_mask`` and shifts explicit ``position_ids`` by the prefix length, so ``model(...)``, training
loops and ``model.generate(...)`` all see the prefix. Real tokens take the positions after the prefix, as in
PEFT's forward (PEFT's generate starts them at 0 instead; lorakit uses the same positions in both).

The prefix of all layers is one table (num_virtual_tokens, num_layers * 2 * kv_width), PEFT's layout: for layer i
the columns [2i * kv_width, (2i+1) * kv_width) are the keys and the next kv_width the values, each split into
(kv_heads, head_dim). With ``projection=True`` the table is produced during training by a two-layer MLP
(embedding -> Linear -> tanh -> Linear), the reparametrization of the paper, which trains more stably;
``fold_prefix`` (and every save) evaluates it once into the plain table. The file is PEFT's: adapter_config.json
with peft_type "PREFIX_TUNING" and adapter_model.safetensors holding ``prompt_embeddings``.

``init="zero"`` is PEFT's zero init (zero keys and values, or a zero last MLP layer). It is close to, but not, a
no-op: zero values add nothing to the attention output, but the zero keys still take a share of each softmax
(every attention output is multiplied by Z / (Z + P), with Z the softmax sum over real tokens), in PEFT as here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import AdapterError, AdapterLoadError, ConfigError
from .model import Summary, summary

PREFIX_TYPE = "PREFIX_TUNING"
PROMPT_KEY = "prompt_embeddings"
INITS = ("random", "zero")
_STATE = "_lorakit_prefix"  # model.__dict__ key: {"configs": {name: PrefixConfig}, "active": name, "hook": handle}
_MODULE = "lorakit_prefix"  # the ModuleDict of encoders registered on the model (so optimizers and .to() see it)


@dataclass
class PrefixConfig:
    """How to add one prefix adapter.

    Args:
        num_virtual_tokens: prefix length P (key/value vectors per layer).
        projection: train the prefix through a two-layer MLP (reparametrization), folded away for saving.
        encoder_hidden_size: hidden width of that MLP; None uses the key/value width.
        init: "random" (standard normal, PEFT's default) or "zero" (PEFT's "zero": not an exact no-op, see module).
        dtype: dtype of the trainable tensors; None keeps float32 (the prefix is cast to the model's dtype).
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive int or None, got {self.encoder_hidden_size!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")


@dataclass(frozen=True)
class Geometry:
    """The key/value shape of a causal LM: what one prefix table must provide."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """PEFT's ``token_dim``: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def row_width(self) -> int:
        return self.num_layers * 2 * self.kv_width

    def param_count(self, config: PrefixConfig) -> int:
        """Trainable parameters of a prefix of this geometry (what ``lorakit compare`` reports)."""
        if not config.projection:
            return config.num_virtual_tokens * self.row_width
        hidden = config.encoder_hidden_size or self.kv_width
        return (config.num_virtual_tokens * self.kv_width + self.kv_width * hidden + hidden
                + hidden * self.row_width + self.row_width)


def geometry(model_or_config) -> Geometry:
    """Key/value geometry of a Hugging Face causal LM (or of its config), as PEFT derives it (grouped-query
    attention included: ``num_key_value_heads`` and ``head_dim`` when the config has them)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        hidden = int(config.hidden_size)
    except (AttributeError, TypeError):
        raise ConfigError(
            f"prefix tuning needs a Hugging Face causal LM config with num_hidden_layers, num_attention_heads and "
            f"hidden_size; got {type(config).__name__}"
        ) from None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Geometry(layers, int(kv_heads), int(head_dim))


class PrefixEncoder(nn.Module):
    """Produces the (P, num_layers * 2 * kv_width) prefix table: a plain trainable table, or an MLP over a
    (P, kv_width) embedding when ``config.projection``."""

    def __init__(self, config: PrefixConfig, geo: Geometry, device: torch.device | None = None):
        super().__init__()
        dtype = config.dtype or torch.float32
        P, width = config.num_virtual_tokens, geo.row_width
        self.projection = config.projection
        if config.projection:
            hidden = config.encoder_hidden_size or geo.kv_width
            self.embedding = nn.Embedding(P, geo.kv_width, dtype=dtype, device=device)
            self.transform = nn.Sequential(
                nn.Linear(geo.kv_width, hidden, dtype=dtype, device=device),
                nn.Tanh(),
                nn.Linear(hidden, width, dtype=dtype, device=device),
            )
            if config.init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(P, width, dtype=dtype, device=device)
            if config.init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def table(self) -> torch.Tensor:
        if self.projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def fold(self) -> None:
        """Replace the MLP by the table it computes (inference form; what the file stores)."""
        if not self.projection:
            return
        with torch.no_grad():
            table = self.table().detach().clone()
        trainable = self.embedding.weight.requires_grad
        del self.transform
        self.embedding = nn.Embedding(*table.shape, dtype=table.dtype, device=table.device)
        with torch.no_grad():
            self.embedding.weight.copy_(table)
        self.embedding.weight.requires_grad_(trainable)
        self.projection = False


# ------------------------------------------------------------------------------------------ state on the model
def _state(model: nn.Module) -> dict:
    return model.__dict__.setdefault(_STATE, {"configs": {}, "active": None, "hook": None, "geometry": None})


def prefix_adapters(model: nn.Module) -> dict[str, PrefixConfig]:
    """The prefix adapters of the model, by name."""
    return _state(model)["configs"] if _STATE in model.__dict__ else {}


def active_prefix(model: nn.Module) -> str | None:
    return _state(model)["active"] if _STATE in model.__dict__ else None


def _encoders(model: nn.Module) -> nn.ModuleDict:
    return model._modules[_MODULE]


def prefix_table(model: nn.Module, name: str = "default") -> torch.Tensor:
    """The prefix table (P, num_layers * 2 * kv_width) of adapter ``name`` (through the MLP if it has one)."""
    _require(model, name)
    return _encoders(model)[name].table()


def _require(model: nn.Module, name: str) -> None:
    if name not in prefix_adapters(model):
        raise AdapterError(f"no prefix adapter named {name!r}; the model has {sorted(prefix_adapters(model))}")


# ------------------------------------------------------------------------------------------ add / remove / switch
def add_prefix(model: nn.Module, config: PrefixConfig, name: str = "default") -> Summary:
    """Add prefix adapter ``name`` to a Hugging Face causal LM, freeze everything else, return a summary.

    The first prefix becomes active; the model's forward (and generate) then runs with it.
    """
    from .model import configs  # LoRA adapter names: one namespace for save_adapter/load_adapter

    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in prefix_adapters(model) or name in configs(model):
        raise AdapterError(f"the model already has an adapter named {name!r}; delete it or pick another name")
    if not isinstance(config, PrefixConfig):
        raise ConfigError(f"add_prefix needs a PrefixConfig, got {type(config).__name__}")
    geo = geometry(model)
    device = next((p.device for p in model.parameters()), None)
    encoder = PrefixEncoder(config, geo, device)
    if _MODULE not in model._modules:
        model.add_module(_MODULE, nn.ModuleDict())
    _encoders(model)[name] = encoder
    state = _state(model)
    state["configs"][name] = config
    state["geometry"] = geo
    if state["hook"] is None:
        state["hook"] = model.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
    if state["active"] is None:
        state["active"] = name
    for p in model.parameters():
        p.requires_grad_(False)
    for p in encoder.parameters():
        p.requires_grad_(True)
    return summary(model)


def delete_prefix(model: nn.Module, name: str) -> None:
    """Remove prefix adapter ``name``; the hook goes with the last one, leaving the model as it was."""
    _require(model, name)
    state = _state(model)
    del state["configs"][name]
    del _encoders(model)[name]
    if state["active"] == name:
        state["active"] = next(iter(state["configs"]), None)
    if not state["configs"]:
        state["hook"].remove()
        del model._modules[_MODULE]
        del model.__dict__[_STATE]


def set_active_prefix(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the prefix every forward uses (None: none, the base model)."""
    if name is not None:
        _require(model, name)
    _state(model)["active"] = name


@contextlib.contextmanager
def disable_prefix(model: nn.Module):
    """Within the block the model runs without its prefix."""
    previous = active_prefix(model)
    if _STATE in model.__dict__:
        _state(model)["active"] = None
    try:
        yield model
    finally:
        if _STATE in model.__dict__:
            _state(model)["active"] = previous


def fold_prefix(model: nn.Module, name: str = "default") -> None:
    """Evaluate the reparametrizing MLP of ``name`` once and keep only the table (for inference)."""
    _require(model, name)
    _encoders(model)[name].fold()


# ------------------------------------------------------------------------------------------ the forward hook
def build_cache(model: nn.Module, name: str, batch_size: int, cache=None):
    """A DynamicCache (or the given empty cache) holding the prefix of adapter ``name`` for every layer."""
    from transformers import DynamicCache

    geo: Geometry = _state(model)["geometry"]
    table = prefix_table(model, name)
    dtype = getattr(model, "dtype", table.dtype)
    if table.dtype != dtype and dtype.is_floating_point:
        table = table.to(dtype)
    P = table.shape[0]
    kv = table.view(P, geo.num_layers * 2, geo.kv_heads, geo.head_dim).permute(1, 2, 0, 3)  # (2L, H, P, d)
    if cache is None:
        cache = DynamicCache(config=model.config)
    for layer in range(geo.num_layers):
        keys = kv[2 * layer].unsqueeze(0).expand(batch_size, -1, -1, -1)
        values = kv[2 * layer + 1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        cache.update(keys, values, layer)
    return cache


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The keyword a model class's forward takes its KV cache by: ``cache`` in newer transformers releases (5.24
    has it; generate passes it so), ``past_key_values`` before. Cached per class: the hook runs every call."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _prefix_hook(model: nn.Module, args: tuple, kwargs: dict):
    name = active_prefix(model)
    if name is None:
        return None
    if len(args) > 1:
        raise ConfigError("with a prefix adapter, pass the model's arguments by keyword (input_ids may be positional)")
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ConfigError("a prefix adapter needs input_ids or inputs_embeds to know the batch size")
    batch = tokens.shape[0]
    P = prefix_adapters(model)[name].num_virtual_tokens
    key = _cache_keyword(type(model))
    past = kwargs.get(key)
    if past is None and key == "cache":  # the old name, which such a model still takes
        past = kwargs.pop("past_key_values", None)
    if past is not None and not hasattr(past, "get_seq_length"):
        raise ConfigError(f"{key} must be a transformers Cache (legacy tuples are not supported)")
    if past is None or past.get_seq_length() == 0:  # a first call (or generate's prefill): start from the prefix
        kwargs[key] = build_cache(model, name, batch, past)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ConfigError(f"a prefix adapter needs a 2-D attention_mask (batch, tokens); got shape "
                              f"{tuple(mask.shape)}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P
    return (), kwargs


# ------------------------------------------------------------------------------------------ files
def prefix_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's on-disk state of a prefix adapter: {"prompt_embeddings": the folded table}."""
    return {PROMPT_KEY: prefix_table(model, name).detach()}


def save_prefix(model: nn.Module, directory, name: str = "default", base_model_name_or_path: str | None = None):
    """Write prefix adapter ``name`` as PEFT does (the MLP folded into the table); returns the folder."""
    from .io import FORMAT_VERSION, base_model_name, write_adapter_folder

    _require(model, name)
    config, geo = prefix_adapters(model)[name], _state(model)["geometry"]
    peft_cfg = {
        "peft_type": PREFIX_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name(model, base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": geo.kv_width,
        "num_transformer_submodules": 1,
        "num_attention_heads": geo.kv_heads,
        "num_layers": geo.num_layers,
        "encoder_hidden_size": config.encoder_hidden_size or geo.kv_width,
        "prefix_projection": False,  # the file holds the folded table, which PEFT can also go on training
        "init_weights": "zero" if config.init == "zero" else None,
        "modules_to_save": None,
    }
    kit_cfg = {"format_version": FORMAT_VERSION, "method": "prefix", **_config_dict(config), "head_dim": geo.head_dim}
    return write_adapter_folder(directory, prefix_state_dict(model, name), peft_cfg, kit_cfg)


def _config_dict(config: PrefixConfig) -> dict:
    d = asdict(config)
    d["dtype"] = str(config.dtype).removeprefix("torch.") if config.dtype is not None else None
    return d


def load_prefix(model: nn.Module, directory, name: str = "default", is_trainable: bool = False,
                dtype: torch.dtype | None = None) -> Summary:
    """Add the prefix adapter saved in ``directory`` (by lorakit or PEFT) to ``model`` under ``name``.

    Everything is checked (peft_type, layer count, heads, widths, the table's shape and values) before the model
    is touched. The loaded prefix is a plain table (a saved MLP is always folded); ``is_trainable`` leaves it
    trainable. Raises AdapterLoadError naming what does not fit.
    """
    from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    directory = Path(directory)
    cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{str(cfg_path)!r} cannot be read as JSON: {err}") from None
    if not isinstance(d, dict) or d.get("peft_type") != PREFIX_TYPE:
        raise AdapterLoadError(f"{str(cfg_path)!r} is not a prefix-tuning adapter (peft_type {PREFIX_TYPE})")
    if not weights.is_file():
        raise AdapterLoadError(f"{str(weights)!r} is missing (only safetensors files are read)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterLoadError(f"{str(weights)!r} is truncated or not a safetensors file: {err}") from None
    if set(tensors) != {PROMPT_KEY}:
        raise AdapterLoadError(f"{weights.name} must hold exactly the key {PROMPT_KEY!r}, found {sorted(tensors)}")
    table = tensors[PROMPT_KEY]
    geo = geometry(model)
    if d.get("num_transformer_submodules", 1) != 1:
        raise AdapterLoadError("encoder-decoder prefixes (num_transformer_submodules=2) are not supported")
    for key, want in (("num_layers", geo.num_layers), ("num_attention_heads", geo.kv_heads),
                      ("token_dim", geo.kv_width)):
        if key in d and d[key] is not None and d[key] != want:
            raise AdapterLoadError(f"adapter_config.json has {key}={d[key]}, this model needs {want}: a prefix for "
                                   "another base model?")
    P = d.get("num_virtual_tokens")
    if not isinstance(P, int) or P <= 0:
        raise AdapterLoadError(f"adapter_config.json has num_virtual_tokens={P!r}; expected a positive int")
    if tuple(table.shape) != (P, geo.row_width):
        raise AdapterLoadError(f"key {PROMPT_KEY!r}: the model expects shape {(P, geo.row_width)}, the file has "
                               f"{tuple(table.shape)}")
    if not table.dtype.is_floating_point or not torch.isfinite(table).all():
        raise AdapterLoadError(f"key {PROMPT_KEY!r} must hold finite floating-point values")
    config = PrefixConfig(num_virtual_tokens=P, init="zero" if d.get("init_weights") == "zero" else "random",
                          dtype=dtype or table.dtype)
    result = add_prefix(model, config, name)
    encoder = _encoders(model)[name]
    with torch.no_grad():
        encoder.embedding.weight.copy_(table)
    encoder.requires_grad_(is_trainable)
    return result if is_trainable else summary(model)


__all__ = [
    "Geometry", "PrefixConfig", "PrefixEncoder", "active_prefix", "add_prefix", "build_cache", "delete_prefix",
    "disable_prefix", "fold_prefix", "geometry", "load_prefix", "prefix_adapters", "prefix_state_dict",
    "prefix_table", "save_prefix", "set_active_prefix",
]
