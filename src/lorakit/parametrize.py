"""LoRA as a ``torch.nn.utils.parametrize`` parametrization of ``weight`` (the PyTorch-tutorial variant).

After ``parametrize(model, config)``, every targeted module keeps its class and its own forward; reading
``module.weight`` returns ``W + sum_i w_i * scale_i * B_i @ A_i`` (the active adapters, with their weights),
computed by the same helpers as the wrapper layers of ``inject`` (``linear_delta``, ``embedding_delta``,
``conv_delta`` over ``functional.lora_delta``), in fp32 and rounded once to the weight's dtype. The base
weight itself is never modified (it lives on as ``module.parametrizations.weight.original``).

When to use which:
    * ``inject`` (wrapper layers) never forms B @ A in forward, supports dropout, mixed-adapter batches,
      modules_to_save and fused projections. It is the default.
    * ``parametrize`` suits code that reads ``module.weight`` directly (custom forwards, weight-norm style
      tricks, functional calls) and teaching. It forms the (out, in) update on every access of the weight;
      wrap repeated inference forwards in ``torch.nn.utils.parametrize.cached()``.

Not applicable here, rejected with ConfigError rather than silently ignored: ``dropout`` (it acts on the
adapter's input, which a weight parametrization never sees), ``modules_to_save``, ``fused_slices``,
``merge_on_eval`` (the weight is always "merged" in effect), DoRA and inits other than kaiming / gaussian.
Mixed-adapter batches need ``inject``.

Tensors inside a parametrization: ``lora_A[name]`` and ``lora_B[name]`` (ParameterDicts), with the shapes
of the wrapper layers: Linear / Conv1D A (r, in), B (out, r); Embedding A (r, num_embeddings), B (dim, r);
conv A (r, in / groups, *kernel), B (out, r / groups, 1, ...). ``parametrized_state_dict`` exports them under
PEFT's keys (grouped conv A expanded block-diagonally, as ``layers.Conv`` does), so ``io`` writes the same
files.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize as P

from . import registry
from .config import LoraConfig
from .errors import AdapterError, AdapterLoadError, ConfigError, MergeError, TargetError
from .layers import AdapterSpec, LoraLayer, ModulesToSave
from .layers.base import init_A
from .layers.conv import conv_A_from_peft, conv_A_to_peft, conv_delta
from .layers.embedding import embedding_delta
from .layers.linear import linear_delta
from .model import Summary, find_targets, summary

_CONFIGS_ATTR = "_lorakit_parametrized_configs"
_PREFIX = "base_model.model."
_KINDS = ("linear", "embedding", "conv")


class LoraParametrization(nn.Module):
    """Maps a weight W to ``W + sum over active adapters of weight * scale * B @ A`` (fp32 maths, W's dtype).

    One instance per module holds every adapter of that module, keyed by adapter name.

    Args:
        kind: the registry kind of the module: "linear", "embedding" or "conv".
        in_shape: A's shape after the rank: (in,) for linear, (num_embeddings,) for embedding,
            (in / groups, *kernel) for conv.
        out_features: B's first dimension (out, embedding dim, or out channels).
        fan_in_fan_out: the linear weight is stored (in, out) (GPT-2's Conv1D).
        groups: conv groups (1 otherwise); the rank must be divisible by it.
    """

    def __init__(
        self,
        kind: str,
        in_shape: tuple[int, ...],
        out_features: int,
        fan_in_fan_out: bool = False,
        groups: int = 1,
    ):
        super().__init__()
        if kind not in _KINDS:
            raise TargetError(f"the parametrization variant handles kinds {_KINDS}, got {kind!r}")
        self.kind = kind
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_features = int(out_features)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.groups = int(groups)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scale = nn.ParameterDict()  # only adapters with learnable_scale
        self.specs: dict[str, AdapterSpec] = {}
        self.active: dict[str, float] = {}
        self.enabled = True

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, spec: AdapterSpec, dtype: torch.dtype, device: torch.device) -> None:
        """Create adapter ``name``: A initialised as ``spec.init`` says (as the wrapper layers do), B = 0."""
        if name in self.specs:
            raise AdapterError(f"adapter {name!r} already exists on this parametrization")
        if spec.r % self.groups:
            raise ConfigError(
                f"a conv with groups={self.groups} needs a rank divisible by {self.groups}, got r={spec.r}"
            )
        b_tail = (1,) * (len(self.in_shape) - 1) if self.kind == "conv" else ()
        A = nn.Parameter(torch.empty(spec.r, *self.in_shape, dtype=dtype, device=device))
        B = nn.Parameter(
            torch.zeros(self.out_features, spec.r // self.groups, *b_tail, dtype=dtype, device=device)
        )
        init_A(A, spec)
        self.lora_A[name], self.lora_B[name] = A, B
        if spec.learnable_scale:
            self.lora_scale[name] = nn.Parameter(torch.tensor(spec.scale, dtype=torch.float32, device=device))
        self.specs[name] = spec

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        del self.lora_A[name], self.lora_B[name]
        if name in self.lora_scale:
            del self.lora_scale[name]
        del self.specs[name]
        self.active.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """A, B and the learnable scale (if any) of one adapter."""
        self._require(name)
        params = [self.lora_A[name], self.lora_B[name]]
        return params + ([self.lora_scale[name]] if name in self.lora_scale else [])

    def scale(self, name: str) -> float | torch.Tensor:
        return self.lora_scale[name] if name in self.lora_scale else self.specs[name].scale

    def peft_rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, alpha) that reproduce this adapter's scale in PEFT; a learned scale is folded into alpha."""
        spec = self.specs[name]
        if name not in self.lora_scale:
            return spec.r, spec.alpha
        denom = math.sqrt(spec.r) if spec.use_rslora else spec.r
        return spec.r, float(self.lora_scale[name].detach().float().item()) * denom

    def _require(self, name: str) -> None:
        if name not in self.specs:
            raise AdapterError(
                f"no adapter named {name!r} on this parametrization; it has {sorted(self.specs)}"
            )

    # ------------------------------------------------------------------ maths
    def delta(self, name: str, weight: float = 1.0) -> torch.Tensor:
        """``weight * scale * B @ A`` in the base weight's layout, fp32 (differentiable in A, B and scale)."""
        A, B = self.lora_A[name], self.lora_B[name]
        scale = self.scale(name)
        coef = scale if weight == 1.0 else scale * weight
        if self.kind == "conv":
            return conv_delta(A, B, self.groups, coef)
        if self.kind == "embedding":
            return embedding_delta(A, B, coef)
        return linear_delta(A, B, self.fan_in_fan_out, coef)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not self.active:
            return W
        total = None
        for name, weight in self.active.items():
            d = self.delta(name, weight)
            total = d if total is None else total + d
        acc = torch.promote_types(
            W.dtype, total.dtype
        )  # fp32, or fp64 for an fp64 weight: one rounding at the end
        return (W.to(acc) + total.to(acc)).to(W.dtype)

    # ------------------------------------------------------------------ PEFT layout
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's local keys, as the wrapper layer of its kind gives them."""
        self._require(name)
        A, B = self.lora_A[name].detach(), self.lora_B[name].detach()
        if self.kind == "embedding":
            return {"lora_embedding_A": A, "lora_embedding_B": B}
        if self.kind == "conv":
            A = conv_A_to_peft(A, self.groups, self.in_shape[0] * self.groups)
        return {"lora_A.weight": A, "lora_B.weight": B}

    def peft_to_local(self, name: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in this parametrization's layout from PEFT-layout tensors (raises AdapterLoadError)."""
        if self.kind == "embedding":
            return tensors["lora_embedding_A"], tensors["lora_embedding_B"]
        A = tensors["lora_A.weight"]
        if self.kind == "conv":
            A = conv_A_from_peft(A, self.groups, self.specs[name].r)
        return A, tensors["lora_B.weight"]

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind}", f"adapters={sorted(self.specs)}", f"active={self.active}"]
        if not self.enabled:
            parts.append("disabled")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------- walking the model
def parametrized_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The LoraConfig of every parametrized adapter, by name (separate from ``inject``'s adapters)."""
    return model.__dict__.setdefault(_CONFIGS_ATTR, {})


def _lora_parametrization(module: nn.Module) -> tuple[int, LoraParametrization] | None:
    if not P.is_parametrized(module, "weight"):
        return None
    for index, p in enumerate(module.parametrizations["weight"]):
        if isinstance(p, LoraParametrization):
            return index, p
    return None


def parametrized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoraParametrization]]:
    """(path, module, its LoraParametrization) for every module whose weight carries one."""
    for path, module in model.named_modules():
        found = _lora_parametrization(module)
        if found is not None:
            yield path, module, found[1]


def _check_known(model: nn.Module, names) -> None:
    known = parametrized_configs(model)
    for n in names:
        if n not in known:
            raise AdapterError(f"no parametrized adapter named {n!r}; the model has {sorted(known)}")


# ---------------------------------------------------------------------------------- parametrize
def _check_config(config: LoraConfig) -> None:
    no_input = "dropout acts on the adapter's input, which a weight parametrization never sees; use inject"
    unsupported = {
        "dropout": (config.dropout > 0, no_input),
        "modules_to_save": (bool(config.modules_to_save), "use inject for fully trained extra modules"),
        "fused_slices": (bool(config.fused_slices), "use inject for LoRA on slices of fused projections"),
        "merge_on_eval": (config.merge_on_eval, "a parametrized weight is always merged in effect"),
        "use_dora": (bool(getattr(config, "use_dora", False)), "DoRA rescales the weight; use inject"),
        "init": (config.init not in ("kaiming", "gaussian"), "only 'kaiming' and 'gaussian' apply here"),
    }
    for field, (bad, why) in unsupported.items():
        if bad:
            raise ConfigError(
                f"LoraConfig.{field}={getattr(config, field)!r} is not supported by the parametrization "
                f"variant: {why}"
            )


def _spec(config: LoraConfig, path: str) -> AdapterSpec:
    return AdapterSpec(
        r=config.rank_for(path),
        alpha=float(config.alpha_for(path)),
        dropout=0.0,
        init=config.init,
        use_rslora=config.use_rslora,
        learnable_scale=config.learnable_scale,
        dtype=config.dtype,
    )


def _original_weight(module: nn.Module) -> torch.Tensor:
    if P.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def _new_parametrization(module: nn.Module, path: str, config: LoraConfig) -> LoraParametrization:
    """A LoraParametrization shaped for ``module``; geometry read from the layer the registry would build."""
    layer_type = registry.lookup(module)
    if layer_type is None or layer_type.kind not in _KINDS:
        raise TargetError(
            f"module {path!r} ({type(module).__name__}) cannot be parametrized; supported types: "
            f"{registry.supported_types()}"
        )
    probe = layer_type.build(module, path, config)  # the wrapper inject would use; only read, then dropped
    W = _original_weight(module)
    if layer_type.kind == "linear":
        in_f, out_f = probe.in_features, probe.out_features
        fifo = bool(getattr(probe, "fan_in_fan_out", False))
        want = (in_f, out_f) if fifo else (out_f, in_f)
        if tuple(W.shape) != want:
            raise TargetError(f"module {path!r}: weight shape {tuple(W.shape)} is not the expected {want}")
        return LoraParametrization("linear", (in_f,), out_f, fan_in_fan_out=fifo)
    if layer_type.kind == "embedding":
        num, dim = W.shape
        return LoraParametrization("embedding", (num,), dim)
    return LoraParametrization("conv", tuple(W.shape[1:]), W.shape[0], groups=probe.groups)


def parametrize(model: nn.Module, config: LoraConfig, name: str = "default") -> Summary:
    """Add adapter ``name`` as a parametrization of ``weight`` on every module ``config`` targets.

    Targets are resolved exactly as ``inject`` resolves them (``find_targets``). Everything else in the
    model is frozen; A, B (and the learnable scale) of the new adapter and the biases ``config.bias`` asks
    for are trainable. The model's first parametrized adapter becomes active; later ones are added inactive
    until ``set_parametrized_active`` selects them. B starts at zero, so the outputs are bit-identical to the
    base model's. On any error the model is left exactly as it was.

    Raises:
        ConfigError: an option the parametrization cannot honour (dropout, modules_to_save, fused_slices,
            merge_on_eval), a bad adapter name, or a rank that does not divide a conv's groups.
        TargetError: the targets match nothing, or a module already wrapped by ``inject``.
        AdapterError: ``name`` is taken.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parametrize needs an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without dots, got {name!r}")
    _check_config(config)
    if name in parametrized_configs(model):
        raise AdapterError(f"the model already has a parametrized adapter named {name!r}")

    modules = dict(model.named_modules())
    plan: list[tuple[str, nn.Module, LoraParametrization, bool]] = []
    for path in find_targets(model, config):
        module = modules[path]
        if isinstance(module, (LoraLayer, ModulesToSave)):
            raise TargetError(
                f"module {path!r} is already wrapped by inject; use one LoRA variant per module"
            )
        W = _original_weight(module)
        if not (isinstance(W, torch.Tensor) and W.dtype.is_floating_point):
            raise TargetError(
                f"module {path!r}: weight is not a floating-point tensor, it cannot be parametrized"
            )
        existing = _lora_parametrization(module)
        lp = existing[1] if existing else _new_parametrization(module, path, config)
        spec = _spec(config, path)
        if spec.r % lp.groups:
            raise ConfigError(
                f"module {path!r} is a conv with groups={lp.groups}: the rank must be divisible by it, "
                f"got r={spec.r}"
            )
        plan.append((path, module, lp, existing is None))

    done: list[tuple[nn.Module, LoraParametrization, bool]] = []
    try:
        for path, module, lp, is_new in plan:
            W = _original_weight(module)
            spec = _spec(config, path)
            lp.add_adapter(name, spec, spec.dtype or W.dtype, W.device)
            done.append((module, lp, is_new))
            if is_new:
                P.register_parametrization(module, "weight", lp)
    except Exception:
        for module, lp, is_new in reversed(done):
            if is_new and _lora_parametrization(module) is not None:
                _detach(module, merge=False)
            elif name in lp.specs:
                lp.delete_adapter(name)
        raise

    parametrized_configs(model)[name] = config
    if not parametrized_active(model):
        set_parametrized_active(model, name)
    mark_parametrized_trainable(model, name, bias=config.bias)
    counts = summary(model)
    wrapped = [path for path, _, lp in parametrized_layers(model) if name in lp.specs]
    return Summary(trainable=counts.trainable, total=counts.total, wrapped=wrapped, adapter=name)


def mark_parametrized_trainable(model: nn.Module, adapter: str | Sequence[str], bias: str = "none") -> None:
    """Freeze the whole model, then unfreeze the named parametrized adapters and the biases ``bias`` names.

    bias: "none", "all" (every bias in the model) or "lora_only" (biases of parametrized modules).
    """
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module, lp in parametrized_layers(model):
        for n in names:
            if n in lp.specs:
                for p in lp.adapter_parameters(n):
                    p.requires_grad_(True)
                if bias == "lora_only" and isinstance(getattr(module, "bias", None), nn.Parameter):
                    module.bias.requires_grad_(True)
    if bias == "all":
        for pname, p in model.named_parameters():
            if pname == "bias" or pname.endswith(".bias"):
                p.requires_grad_(True)


# ---------------------------------------------------------------------------------- adapter set
def set_parametrized_active(model: nn.Module, adapters: str | Sequence[str] | dict[str, float]) -> None:
    """Choose the parametrized adapters that act: one name, several (summed) or {name: weight}."""
    if isinstance(adapters, str):
        adapters = {adapters: 1.0}
    elif not isinstance(adapters, dict):
        adapters = {n: 1.0 for n in adapters}
    _check_known(model, adapters)
    for _, _, lp in parametrized_layers(model):
        lp.active = {k: float(w) for k, w in adapters.items() if k in lp.specs}


def parametrized_active(model: nn.Module) -> dict[str, float]:
    """The active parametrized adapters and their weights (union over modules)."""
    out: dict[str, float] = {}
    for _, _, lp in parametrized_layers(model):
        out.update(lp.active)
    return out


def set_parametrized_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA parametrization on or off (off: ``module.weight`` is the base weight, bit for bit).

    Inside ``torch.nn.utils.parametrize.cached()`` a switch takes effect at the next cache (after the block).
    """
    for _, _, lp in parametrized_layers(model):
        lp.enabled = bool(enabled)


@contextlib.contextmanager
def disable_parametrized(model: nn.Module):
    """Within the block every LoRA parametrization is off; each returns to its previous state afterwards."""
    layers = [lp for _, _, lp in parametrized_layers(model)]
    previous = [lp.enabled for lp in layers]
    for lp in layers:
        lp.enabled = False
    try:
        yield model
    finally:
        for lp, was in zip(layers, previous):
            lp.enabled = was


def delete_parametrized_adapter(model: nn.Module, name: str) -> None:
    """Remove one parametrized adapter; a module left with none gets its original weight back (unchanged)."""
    _check_known(model, [name])
    for _, module, lp in list(parametrized_layers(model)):
        if name in lp.specs:
            lp.delete_adapter(name)
            if not lp.specs:
                _detach(module, merge=False)
    del parametrized_configs(model)[name]


def _detach(module: nn.Module, merge: bool, tied: bool = False) -> None:
    """Take the LoRA parametrization off ``module.weight``, folding the active adapters in when ``merge``.

    ``tied``: another module holds the same original tensor (GPT-2's lm_head and wte); merging then gives this
    module a new Parameter and leaves the shared one, and so the other module, untouched.
    """
    index, lp = _lora_parametrization(module)
    plist = module.parametrizations["weight"]
    if len(plist) == 1:
        if merge and tied:
            with torch.no_grad():
                merged = module.weight.detach().clone()
            requires_grad = plist.original.requires_grad
            P.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight = nn.Parameter(merged, requires_grad=requires_grad)
        else:
            P.remove_parametrizations(module, "weight", leave_parametrized=merge)
        return
    if merge:
        if index != 0 or tied:
            raise MergeError(
                f"the LoRA parametrization of {type(module).__name__}.weight follows another parametrization "
                "or a tied weight; it cannot be folded into the stored weight (remove with merge=False)"
            )
        with torch.no_grad():
            plist.original.copy_(lp(plist.original))
    del plist[index]


def remove_parametrizations(model: nn.Module, merge: bool = True) -> nn.Module:
    """Take every LoRA parametrization off the model, in place; returns the model.

    merge=True leaves each weight parametrized, i.e. with its active adapters folded in (computed in fp32,
    rounded once; the Parameter object stays the same, so optimizers still hold it, except for a weight tied
    to another module, which gets a new Parameter so that the other module keeps the original); merge=False
    restores the original weights bit for bit. Like ``unload``, every parameter is left trainable afterwards.
    """
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    for _, module, _ in list(parametrized_layers(model)):
        tied = holders.get(id(module.parametrizations["weight"].original), 0) > 1
        _detach(module, merge=merge, tied=tied)
    parametrized_configs(model).clear()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------- PEFT-layout tensors
def parametrized_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's on-disk keys (``base_model.model.<path>.lora_A.weight``, ...),
    the same keys and layout ``io.adapter_state_dict`` gives for ``inject``'s layers."""
    _check_known(model, [name])
    state: dict[str, torch.Tensor] = {}
    for path, _, lp in parametrized_layers(model):
        if name in lp.specs:
            for key, tensor in lp.peft_state(name).items():
                state[f"{_PREFIX}{path}.{key}"] = tensor
    return state


def load_parametrized_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], name: str = "default"
) -> None:
    """Copy PEFT-layout tensors (as ``parametrized_state_dict`` returns them) into adapter ``name``.

    Every key is checked (missing, unexpected, shape, floating dtype) and converted before the first copy,
    so on error nothing has changed. Tensors are cast to the adapter's dtype.

    Raises:
        AdapterLoadError: naming the first offending key with the expected and found shapes.
    """
    expected = parametrized_state_dict(model, name)
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise AdapterLoadError(
            f"key {unexpected[0]!r} has no place in this model's parametrized adapter {name!r} "
            f"({len(unexpected)} such keys): an adapter for another base model?"
        )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterLoadError(f"key {missing[0]!r} is missing ({len(missing)} missing keys)")
    for key, want in expected.items():
        found = tensors[key]
        if not isinstance(found, torch.Tensor) or not found.dtype.is_floating_point:
            raise AdapterLoadError(
                f"key {key!r} must be a floating-point tensor, found {getattr(found, 'dtype', type(found))}"
            )
        if tuple(found.shape) != tuple(want.shape):
            raise AdapterLoadError(
                f"key {key!r}: the model expects shape {tuple(want.shape)}, found {tuple(found.shape)}"
            )
    staged = []
    for path, _, lp in parametrized_layers(model):
        if name in lp.specs:
            prefix = f"{_PREFIX}{path}."
            local = {k: tensors[prefix + k] for k in lp.peft_state(name)}
            staged.append((lp, *lp.peft_to_local(name, local)))
    with torch.no_grad():
        for lp, A, B in staged:
            lp.lora_A[name].copy_(A)
            lp.lora_B[name].copy_(B)


__all__ = [
    "LoraParametrization",
    "delete_parametrized_adapter",
    "disable_parametrized",
    "load_parametrized_state",
    "mark_parametrized_trainable",
    "parametrize",
    "parametrized_active",
    "parametrized_configs",
    "parametrized_layers",
    "parametrized_state_dict",
    "remove_parametrizations",
    "set_parametrized_active",
    "set_parametrized_enabled",
]
