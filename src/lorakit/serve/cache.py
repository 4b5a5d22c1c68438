"""Adapters by name, in three tiers: accelerator slots (at most N), host memory (LRU), the adapter folder.

    folder on disk  --(loader threads: read, check, pad)-->  host copy  --(scheduler: copy)-->  device slot

Only the scheduler thread takes device slots (``acquire``/``release``), between decode steps. Reading from
disk happens on loader threads, so a request whose adapter is still loading waits without holding up the
requests of other adapters. A device slot held by a running request is never evicted; the least recently
used free slot is. Host copies beyond ``max_cpu`` are dropped least recently used first, except adapters
that queued requests are waiting for (the limit is soft for them).

Names map only to folders inside the adapter directory: a name is one path component of letters, digits,
``.``, ``_`` and ``-``; the folder and every file read from it must resolve (symbolic links followed) to a
place inside the directory; only safetensors weights are read (lorakit.io never unpickles).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterError, AdapterLoadError, ConfigError, LoraError
from ..io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORAKIT_CONFIG, PREFIX, read_adapter
from .decoder import Decoder

log = logging.getLogger("lorakit.serve")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What an adapter name may be: one path component, no leading dot, at most 128 characters."""


class AdapterNameError(ConfigError):
    """An adapter name is malformed or resolves outside the adapter directory (HTTP 400)."""

    status = 400


class AdapterNotFoundError(AdapterError):
    """No adapter of that name is served, or its folder does not exist (HTTP 404)."""

    status = 404


class AdapterExistsError(AdapterError):
    """An adapter of that name is already served (HTTP 409)."""

    status = 409


class AdapterMismatchError(AdapterLoadError):
    """The adapter does not fit the served base model; ``key`` names the offending tensor (HTTP 422)."""

    status = 422

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ------------------------------------------------------------------------------------------ names and paths
def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterNameError(f"adapter name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit (no '/', no '..')")
    return name


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def resolve_adapter_dir(root: str | os.PathLike, name: str) -> Path:
    """The folder of adapter ``name`` inside ``root``, symbolic links resolved, checked not to escape ``root``.

    Raises AdapterNameError (malformed name, or the folder or one of its adapter files resolves outside the
    directory) or AdapterNotFoundError (no such folder).
    """
    check_name(name)
    root_real = Path(os.path.realpath(root))
    real = Path(os.path.realpath(root_real / name))
    if not _inside(real, root_real):
        raise AdapterNameError(f"adapter {name!r} resolves outside the adapter directory; refused")
    if not real.is_dir():
        raise AdapterNotFoundError(f"no adapter folder named {name!r} in the adapter directory")
    for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, LORAKIT_CONFIG):
        if os.path.lexists(real / file) and not _inside(Path(os.path.realpath(real / file)), root_real):
            raise AdapterNameError(f"{file} of adapter {name!r} resolves outside the adapter directory; refused")
    return real


# ------------------------------------------------------------------------------------------ conversion
Groups = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def adapter_groups(decoder: Decoder, directory: Path) -> tuple[Groups, dict]:
    """Read a PEFT/lorakit adapter folder and lay it out as the decoder's padded stacks want it.

    Returns (groups, info). Raises AdapterMismatchError naming the first key that does not fit the served
    model (an unknown module, a wrong shape, a rank above ``max_rank``, a module the server cannot adapt).
    """
    config, tensors = read_adapter(directory)
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        body = key[len(PREFIX):]
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if body.endswith(suffix):
                path = body[: -len(suffix)]
                break
        else:
            raise AdapterMismatchError(
                f"key {key!r}: lorakit serve applies LoRA to the q/k/v/o/gate/up/down projections of the decoder "
                "layers only (no embedding LoRA, no modules_to_save, no trained biases)", key)
        if path not in decoder.targets:
            raise AdapterMismatchError(
                f"key {key!r}: the served base model has no projection {path!r} - an adapter for another base "
                "model?", key)
        by_path.setdefault(path, {})[part] = tensors[key]
    if not by_path:
        raise AdapterMismatchError(f"adapter in {str(directory)!r} holds no LoRA tensors")

    R = decoder.max_rank
    groups: Groups = {}
    ranks = set()
    for path, parts in by_path.items():
        t = decoder.targets[path]
        for part in ("A", "B"):
            if part not in parts:
                raise AdapterMismatchError(f"key {PREFIX}{path}.lora_{part}.weight is missing", f"{PREFIX}{path}."
                                           f"lora_{part}.weight")
        A, B = parts["A"], parts["B"]
        r = A.shape[0] if A.dim() == 2 else -1
        key_a, key_b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        if A.dim() != 2 or A.shape[1] != t.in_features:
            raise AdapterMismatchError(f"key {key_a!r}: the served model expects shape (r, {t.in_features}), the "
                                       f"file has {tuple(A.shape)} - an adapter for another base model?", key_a)
        if tuple(B.shape) != (t.out_features, r):
            raise AdapterMismatchError(f"key {key_b!r}: the served model expects shape ({t.out_features}, {r}), "
                                       f"the file has {tuple(B.shape)} - an adapter for another base model?", key_b)
        if r > R:
            raise AdapterMismatchError(f"key {key_a!r}: rank {r} exceeds the server's --max-lora-rank {R}", key_a)
        r_cfg = config.rank_for(path)
        if r != r_cfg:
            raise AdapterMismatchError(f"key {key_a!r}: the adapter config says rank {r_cfg} for {path!r}, the "
                                       f"tensor has rank {r}", key_a)
        alpha = float(config.alpha_for(path))
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        ranks.add(r)
        st = decoder.stacks[t.layer][t.group]
        if (t.layer, t.group) not in groups:
            groups[(t.layer, t.group)] = (torch.zeros(st.A.shape[1:], dtype=decoder.dtype),
                                          torch.zeros(st.B.shape[1:], dtype=decoder.dtype),
                                          torch.zeros(st.scales.shape[1:], dtype=torch.float32))
        A_pad, B_pad, scales = groups[(t.layer, t.group)]
        A_pad[t.slice * R: t.slice * R + r] = A.to(decoder.dtype)
        start = st.starts[t.slice]
        B_pad[start: start + t.out_features, :r] = B.to(decoder.dtype)
        scales[t.slice] = scale
    if decoder.device.type == "cuda":
        groups = {k: tuple(x.pin_memory() for x in v) for k, v in groups.items()}
    size = sum(x.numel() * x.element_size() for v in groups.values() for x in v)
    info = {"rank": max(ranks), "modules": len(by_path), "bytes": size,
            "base_model": _base_model_name(directory)}
    return groups, info


def _base_model_name(directory: Path) -> str | None:
    import json

    try:
        return json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ the cache
@dataclass(eq=False)
class _Entry:
    name: str
    path: Path
    state: str = "disk"  # disk | loading | host | failed
    groups: Groups | None = None
    info: dict = field(default_factory=dict)
    error: LoraError | None = None
    slot: int | None = None
    refs: int = 0
    wanted: int = 0  # queued requests waiting for this adapter
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterCache:
    """Served adapters by name with device slots, an LRU of host copies and on-demand loads from disk.

    Args:
        decoder: whose stacks hold the device slots (``decoder.n_slots - 1`` of them).
        root: the adapter directory (None: no adapters can be loaded).
        max_cpu: host copies kept (soft limit, see the module docstring).
        on_ready: called (from a loader thread) whenever a load finishes, to wake the scheduler.
    """

    def __init__(self, decoder: Decoder, root: str | os.PathLike | None, max_cpu: int = 32,
                 on_ready: Callable[[], None] | None = None, workers: int = 2):
        if max_cpu < 1:
            raise ConfigError(f"max_cpu must be >= 1, got {max_cpu}")
        self.decoder = decoder
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"adapter directory {str(root)!r} does not exist")
        self.max_cpu = max_cpu
        self.on_ready = on_ready or (lambda: None)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self._slots: list[_Entry | None] = [None] * decoder.n_slots  # slot 0: the base, never assigned
        self._slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, decoder.n_slots))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorakit-adapter-load")
        self.stats = {"disk_loads": 0, "device_loads": 0, "load_failures": 0, "device_evictions": 0,
                      "host_evictions": 0}

    # -------------------------------------------------------------------------- registry
    @property
    def device_slots(self) -> int:
        return self.decoder.n_slots - 1

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def describe(self, name: str) -> dict:
        with self._lock:
            e = self._get(name)
            tier = "device" if e.slot is not None else ("host" if e.state == "host" else e.state)
            return {"name": e.name, "tier": tier, "created": e.created, **e.info}

    def scan(self) -> list[str]:
        """Register every adapter folder in the directory (loaded on first use); returns the names added."""
        if self.root is None:
            return []
        added = []
        for child in sorted(self.root.iterdir()):
            if not (child / ADAPTER_WEIGHTS).exists() and not (child / ADAPTER_CONFIG).exists():
                continue
            try:
                self.register(child.name, load=False)
                added.append(child.name)
            except LoraError as err:
                log.warning("skipping adapter folder %r: %s", child.name, err)
        return added

    def register(self, name: str, load: bool = True) -> dict:
        """Serve the adapter folder ``name``; with ``load``, read and check it now (raising on a bad file,
        in which case nothing is registered). Returns its description."""
        if self.root is None:
            raise AdapterNotFoundError("the server was started without an adapter directory")
        path = resolve_adapter_dir(self.root, name)
        entry = _Entry(name, path)
        if load:
            groups, info = adapter_groups(self.decoder, path)
            entry.groups, entry.info, entry.state = groups, info, "host"
        with self._lock:
            if load:
                self.stats["disk_loads"] += 1
            if name in self._entries:
                raise AdapterExistsError(f"an adapter named {name!r} is already served; DELETE it first")
            self._entries[name] = entry
            if entry.state == "host":
                self._host[id(entry)] = entry
                self._trim_host()
        return self.describe(name)

    def unregister(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404; running ones finish; its slot frees when they do."""
        with self._lock:
            entry = self._get(name)
            del self._entries[name]
            self._host.pop(id(entry), None)
            entry.groups = None
            if entry.slot is not None and entry.refs == 0:
                self._free_slot(entry)

    def _get(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is served; see GET /v1/models")
        return entry

    # -------------------------------------------------------------------------- demand (any thread)
    def want(self, name: str) -> None:
        """A request for ``name`` was queued: start loading it from disk if it is not in memory."""
        with self._lock:
            entry = self._get(name)
            entry.wanted += 1
            self._start_load(entry)

    def unwant(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.wanted > 0:
                entry.wanted -= 1
                if entry.wanted == 0:
                    self._trim_host()

    def _start_load(self, entry: _Entry) -> None:
        if entry.slot is None and entry.state == "disk":
            entry.state = "loading"
            self._pool.submit(self._load, entry)

    def _load(self, entry: _Entry) -> None:
        try:
            groups, info = adapter_groups(self.decoder, entry.path)
            with self._lock:
                entry.groups, entry.info, entry.state = groups, info, "host"
                self.stats["disk_loads"] += 1
                if self._entries.get(entry.name) is entry:
                    self._host[id(entry)] = entry
                    self._trim_host()
        except Exception as err:  # a bad file fails the requests for this adapter only  # noqa: BLE001
            if not isinstance(err, LoraError):
                err = AdapterLoadError(f"adapter {entry.name!r} could not be read: {err}")
            with self._lock:
                entry.state, entry.error = "failed", err
                self.stats["load_failures"] += 1
        finally:
            self.on_ready()

    def _trim_host(self) -> None:
        for key in list(self._host):
            if len(self._host) <= self.max_cpu:
                break
            entry = self._host[key]
            if entry.wanted > 0 and entry.slot is None:
                continue  # queued requests need it: keep it (soft limit)
            del self._host[key]
            entry.groups = None
            entry.state = "disk"
            self.stats["host_evictions"] += 1

    # -------------------------------------------------------------------------- device slots (scheduler)
    def acquire(self, name: str) -> int | None:
        """The device slot of ``name`` for one more running request, copying it in (evicting the least
        recently used idle slot) when needed; None while it is loading or every slot is busy. Raises the
        load error when its folder failed to load, AdapterNotFoundError when it is no longer served."""
        with self._lock:
            entry = self._get(name)
            if entry.slot is not None:
                entry.refs += 1
                self._slot_lru.pop(entry.slot, None)
                return entry.slot
            if entry.state == "failed":
                err, entry.state, entry.error = entry.error, "disk", None  # a later request retries the load
                raise err
            if entry.state != "host":
                self._start_load(entry)
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self.decoder.write_adapter(slot, entry.groups)
            self._slots[slot] = entry
            entry.slot, entry.refs = slot, 1
            self.stats["device_loads"] += 1
            if id(entry) in self._host:
                self._host.move_to_end(id(entry))
            return slot

    def _take_slot(self) -> int | None:
        for slot in self._slot_lru:  # least recently released first; only idle slots are in this list
            owner = self._slots[slot]
            if owner is not None:
                owner.slot = None
                self.stats["device_evictions"] += 1
            del self._slot_lru[slot]
            self._slots[slot] = None
            return slot
        return None

    def release(self, slot: int) -> None:
        """A request that ran on ``slot`` finished."""
        if slot == 0:
            return
        with self._lock:
            entry = self._slots[slot]
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs == 0:
                if self._entries.get(entry.name) is not entry:
                    self._free_slot(entry)  # unregistered while running
                else:
                    self._slot_lru[slot] = None
                    self._slot_lru.move_to_end(slot)

    def _free_slot(self, entry: _Entry) -> None:
        slot = entry.slot
        entry.slot = None
        self._slots[slot] = None
        self._slot_lru[slot] = None
        self._slot_lru.move_to_end(slot, last=False)  # reuse it first (no row reads it: left as is)

    # -------------------------------------------------------------------------- numbers
    def tiers(self) -> dict[str, int]:
        with self._lock:
            on_device = sum(1 for e in self._slots if e is not None)
            return {"registered": len(self._entries), "device": on_device, "host": len(self._host),
                    "loading": sum(1 for e in self._entries.values() if e.state == "loading")}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["AdapterCache", "AdapterExistsError", "AdapterMismatchError", "AdapterNameError",
           "AdapterNotFoundError", "adapter_groups", "check_name", "resolve_adapter_dir"]
