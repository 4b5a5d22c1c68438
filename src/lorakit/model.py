"""Adapters on a whole model: find targets, inject, freeze, switch, disable, mix per row, summarise.

Targets are resolved once into a list of module paths; after that the code works with module objects.
The model is modified in place (each target replaced by a LoRA layer holding it); ``unload`` in
lorakit.merge puts the original modules back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from . import blocks, registry
from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterError, ConfigError, TargetError
from .layers import AdapterSpec, LoraLayer, MixedBatch, ModulesToSave

_CONFIGS_ATTR = "_lorakit_configs"


@dataclass
class Summary:
    """Trainable versus total parameters, and which modules carry adapters."""

    trainable: int
    total: int
    wrapped: list[str] = field(default_factory=list)
    adapter: str | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || wrapped modules: {len(self.wrapped)}"
        )


# ---------------------------------------------------------------------------------- walking the model
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of the model with its path."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def _adapter_modules(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(path, module, module whose type counts) for every module outside lorakit's own wrappers."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.append(name + ".")
            yield name, module, module.base_layer
        elif isinstance(module, ModulesToSave):
            inside.append(name + ".")
            yield name, module, module.original_module
        else:
            yield name, module, module


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The LoraConfig of every adapter injected into the model, by adapter name."""
    return model.__dict__.setdefault(_CONFIGS_ATTR, {})


def list_adapters(model: nn.Module) -> list[str]:
    return list(configs(model))


def _name_matches(spec: str, name: str) -> bool:
    return name == spec or name.endswith("." + spec)


def _matches(targets, name: str, module: nn.Module, head: str | None) -> bool:
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            kind = registry.lookup(module)
            return kind is not None and kind.kind == "linear" and name != head
        return re.fullmatch(targets, name) is not None
    for t in targets:
        if isinstance(t, str):
            if _name_matches(t, name):
                return True
        elif isinstance(t, type):
            if isinstance(module, t):
                return True
        elif t(name, module):
            return True
    return False


def output_head(model: nn.Module) -> str | None:
    """Path of the output head that "all-linear" skips: ``model.get_output_embeddings()`` when the model has
    that method (Hugging Face models); for a Hugging Face model without output embeddings (a classifier such
    as BertForSequenceClassification) the last Linear-like module outside its backbone ``model.base_model``
    (none for a bare backbone); otherwise the last Linear-like module registered."""
    getter = getattr(model, "get_output_embeddings", None)
    outside = ""
    if callable(getter):
        head = getter()
        if head is None:
            backbone = getattr(model, "base_model", model)
            outside = next((n for n, m in model.named_modules() if m is backbone and n), "")
            if not outside:
                return None
        else:
            for name, module, typed in _candidates(model):
                if head is module or head is typed:
                    return name
            return None
    last = None
    for name, _, typed in _candidates(model):
        if outside and (name == outside or name.startswith(outside + ".")):
            continue
        kind = registry.lookup(typed)
        if kind is not None and kind.kind == "linear":
            last = name
    return last


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config`` adapts. Raises TargetError, listing what exists, when it matches nothing."""
    head = output_head(model) if config.target_modules == ALL_LINEAR else None
    found: list[str] = []
    saved = set(config.modules_to_save)
    for name, module, typed in _candidates(model):
        if not name or not _matches(config.target_modules, name, typed, head):
            continue
        if config.exclude_modules is not None and _matches(config.exclude_modules, name, typed, None):
            continue
        if any(_name_matches(s, name) for s in saved):
            continue
        if registry.lookup(typed) is None:
            if any(True for _ in typed.children()):
                continue  # a container matched by a broad pattern: its adaptable children are matched on their own
            raise TargetError(
                f"module {name!r} of type {type(typed).__name__} matches target_modules={config.target_modules!r}, "
                f"but lorakit cannot adapt that type; supported types: {registry.supported_types()}"
            )
        found.append(name)
    if not found:
        adaptable = [f"{n} ({type(t).__name__})" for n, _, t in _candidates(model) if n and registry.lookup(t)]
        shown = ", ".join(adaptable[:40]) + (f", ... ({len(adaptable)} in all)" if len(adaptable) > 40 else "")
        raise TargetError(
            f"target_modules={config.target_modules!r} matched no adaptable module. "
            f"Adaptable modules of this model: {shown or 'none'}"
        )
    return found


# ---------------------------------------------------------------------------------- inject
def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> Summary:
    """Add adapter ``name`` to every module ``config`` targets, freeze everything else, return a summary.

    Works on any nn.Module. The first adapter of a model becomes active; later ones are added inactive
    (as in PEFT) until ``set_active_adapters`` selects them. Only the new adapter (plus its
    modules_to_save copies and the biases ``config.bias`` asks for) is left trainable. On any error the
    model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject needs an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
    from .prefix import prefix_adapters  # local: prefix builds on this module

    if name in configs(model) or name in prefix_adapters(model):
        raise AdapterError(f"the model already has an adapter named {name!r}; delete it or pick another name")

    targets = find_targets(model, config)
    saved = _resolve_saved(model, config)
    modules = dict(model.named_modules())
    new_layers: dict[str, LoraLayer] = {}
    extended: list[LoraLayer] = []
    try:
        for path in targets:
            module = modules[path]
            layer = registry.layer_for(module, path, config)  # the module itself, a new wrapper, or an upgrade
            layer.add_adapter(name, _spec(config, path))
            layer.merge_on_eval = config.merge_on_eval
            (extended.append(layer) if layer is module else new_layers.__setitem__(path, layer))
    except Exception:
        for layer in [*extended, *new_layers.values()]:  # new layers too: PiSSA changed their base weight
            if name in layer.specs:
                layer.delete_adapter(name)
        raise

    for path, layer in new_layers.items():
        _replace(model, path, layer)
    _mark_tied(model)
    for path in saved:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _replace(model, path, module)
        module.add_adapter(name)

    configs(model)[name] = config
    if not active_adapters(model):
        set_active_adapters(model, name)
    mark_trainable(model, name, bias=config.bias)
    for _, layer in lora_layers(model):
        if name in layer.specs:
            layer.train(layer.training)  # merge_on_eval: an adapter injected in eval mode merges now
    blocks.sync(model)
    return summary(model, name)


add_adapter = inject


def _spec(config: LoraConfig, path: str) -> AdapterSpec:
    return AdapterSpec(
        r=config.rank_for(path),
        alpha=float(config.alpha_for(path)),
        dropout=float(config.dropout),
        init=config.init,
        use_rslora=config.use_rslora,
        learnable_scale=config.learnable_scale,
        dtype=config.dtype,
        use_dora=config.use_dora,
    )


def _resolve_saved(model: nn.Module, config: LoraConfig) -> list[str]:
    paths = []
    for spec in config.modules_to_save:
        hits = [n for n, _, _ in _candidates(model) if n and _name_matches(spec, n)]
        if not hits:
            names = [n for n, _, _ in _candidates(model) if n]
            raise TargetError(f"modules_to_save entry {spec!r} matches no module; modules: {names[:40]}")
        paths.extend(hits)
    return paths


def _mark_tied(model: nn.Module) -> None:
    """Flag LoRA layers whose base weight another module also holds (tied input/output embeddings), so that
    merging does not change that other module."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    for _, layer in lora_layers(model):
        weight = layer.base_layer._parameters.get("weight")
        layer.weight_tied = layer.weight_tied or (weight is not None and holders.get(id(weight), 0) > 1)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------- trainability
def mark_trainable(model: nn.Module, adapter: str | Sequence[str], bias: str = "none") -> None:
    """Freeze the whole model, then unfreeze the named adapters, their modules_to_save copies and biases.

    bias: "none", "all" (every bias in the model) or "lora_only" (biases of adapted layers).
    """
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for n in names:
            if n in layer.specs:
                for p in layer.adapter_parameters(n):
                    p.requires_grad_(True)
                if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
    for _, saved in _saved_modules(model):
        for n in names:
            if n in saved.modules_to_save:
                for p in saved.modules_to_save[n].parameters():
                    p.requires_grad_(True)
    if bias == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)


def summary(model: nn.Module, adapter: str | None = None) -> Summary:
    """Trainable and total parameter counts (each shared tensor counted once) and the wrapped modules."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    wrapped = [n for n, layer in lora_layers(model) if adapter is None or adapter in layer.specs]
    return Summary(trainable=trainable, total=total, wrapped=wrapped, adapter=adapter)


# ---------------------------------------------------------------------------------- adapter set
def _check_known(model: nn.Module, names) -> None:
    known = configs(model)
    for n in names:
        if n is not None and n not in known:
            raise AdapterError(f"no adapter named {n!r}; the model has {sorted(known)}")


def set_active_adapters(model: nn.Module, adapters: str | Sequence[str] | dict[str, float]) -> None:
    """Choose which adapters act in forward: one name, several (summed), or {name: weight} (weighted sum)."""
    if isinstance(adapters, str):
        adapters = {adapters: 1.0}
    elif not isinstance(adapters, dict):
        adapters = {n: 1.0 for n in adapters}
    from .prefix import prefix_adapters, set_active_prefix  # local: prefix builds on this module

    prefixes = prefix_adapters(model)
    named = [n for n in adapters if n in prefixes]
    if len(named) > 1 or any(adapters[n] != 1.0 for n in named):
        raise AdapterError(f"a forward uses one prefix adapter at a time, with weight 1; got {adapters}")
    adapters = {k: v for k, v in adapters.items() if k not in prefixes}
    _check_known(model, adapters)
    layers = list(_adapter_modules(model))
    for module in layers:
        if isinstance(module, LoraLayer) and module.merged:
            module.set_active({k: float(v) for k, v in adapters.items() if k in module.specs})  # raises if it conflicts
    for module in layers:
        if isinstance(module, LoraLayer):
            module.set_active({k: float(v) for k, v in adapters.items() if k in module.specs})
        else:
            module.set_active({k: float(v) for k, v in adapters.items()})
    if prefixes:
        set_active_prefix(model, named[0] if named else None)


def active_adapters(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights (the union over layers)."""
    out: dict[str, float] = {}
    for _, layer in lora_layers(model):
        out.update(layer.active)
    return out


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere; layers left with no adapter are replaced by their original module."""
    _check_known(model, [name])
    layers = list(lora_layers(model))
    for path, layer in layers:
        if name in layer.merged:
            raise AdapterError(f"adapter {name!r} is merged in {path!r}; unmerge before deleting it")
    for path, layer in layers:
        if name in layer.specs:
            layer.delete_adapter(name)
            if not layer.specs:
                _replace(model, path, layer.base_layer)
    for path, saved in list(_saved_modules(model)):
        saved.delete_adapter(name)
        if not len(saved.modules_to_save):
            _replace(model, path, saved.original_module)
    del configs(model)[name]
    blocks.sync(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base (merged adapters are unmerged, then merged back)."""
    modules = list(_adapter_modules(model))
    remerge = {}
    for m in modules:
        if isinstance(m, LoraLayer) and m.merged:
            remerge[m] = list(m.merged)
            m.unmerge()
    previous = {m: m.disabled for m in modules}
    for m in modules:
        m.disabled = True
    from .prefix import disable_prefix

    try:
        with disable_prefix(model):
            yield model
    finally:
        for m in modules:
            m.disabled = previous[m]
        for m, names in remerge.items():
            m.merge(names)


@contextlib.contextmanager
def adapter_per_sample(model: nn.Module, adapter_names: Sequence[str | None]):
    """Mixed-adapter batch: row i of every forward in the block uses ``adapter_names[i]`` (None: base model)."""
    _check_known(model, adapter_names)
    mixed = MixedBatch(adapter_names)
    modules = list(_adapter_modules(model))
    for m in modules:
        m.mixed = mixed
    try:
        yield model
    finally:
        for m in modules:
            m.mixed = None


def forward_mixed(model: nn.Module, *args, adapter_names: Sequence[str | None], **kwargs):
    """``model(*args, **kwargs)`` with one adapter per batch row (see adapter_per_sample)."""
    with adapter_per_sample(model, adapter_names):
        return model(*args, **kwargs)
