"""lorakit.serve.cache: safe names and paths, adapters that do not fit, and the device / host / disk tiers."""

import os
import shutil
import threading
import time

import pytest
from serve_helpers import load_model, save_random_adapter, save_tiny_model

from lorakit.errors import AdapterLoadError
from lorakit.serve import cache as cache_mod
from lorakit.serve.cache import (
    AdapterCache,
    AdapterExistsError,
    AdapterMismatchError,
    AdapterNameError,
    AdapterNotFoundError,
    resolve_adapter_dir,
)
from lorakit.serve.decoder import Decoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model_dir = save_tiny_model(root / "model")
    other = save_tiny_model(root / "other", hidden_size=48, intermediate_size=96)
    adapters = root / "adapters"
    adapters.mkdir()
    for i in range(5):
        save_random_adapter(model_dir, adapters / f"a{i}", seed=i + 1)
    save_random_adapter(other, adapters / "other_base", seed=9)
    save_random_adapter(model_dir, adapters / "rank8", seed=10, r=8)
    save_random_adapter(model_dir, adapters / "embed", seed=11, targets=("q_proj", "embed_tokens"))
    outside = save_random_adapter(model_dir, root / "outside", seed=12)
    return model_dir, adapters, outside


def make_cache(model_dir, adapters, slots=2, max_cpu=3, **kw):
    dec = Decoder(load_model(model_dir), max_batch=2, max_len=16, adapter_slots=slots, max_rank=4)
    return AdapterCache(dec, adapters, max_cpu=max_cpu, **kw)


# ------------------------------------------------------------------------------------------ names and paths
@pytest.mark.parametrize("name", ["../outside", "..", ".", "a/b", "/etc", "", ".hidden", "a" * 129, "x\0y",
                                  "a..b", "ünï", 5, None])
def test_malformed_names_are_refused(setup, name):
    _, adapters, _ = setup
    with pytest.raises(AdapterNameError):
        resolve_adapter_dir(adapters, name)


def test_symlink_escapes_are_refused(setup, tmp_path):
    _, adapters, outside = setup
    root = tmp_path / "root"
    shutil.copytree(adapters / "a0", root / "a0")
    os.symlink(outside, root / "linked_dir")  # a folder link leaving the directory
    (root / "linked_file").mkdir()  # a folder inside whose weights link outside
    shutil.copy(outside / "adapter_config.json", root / "linked_file" / "adapter_config.json")
    os.symlink(outside / "adapter_model.safetensors", root / "linked_file" / "adapter_model.safetensors")
    os.symlink(root / "a0", root / "alias")  # a link that stays inside is fine
    with pytest.raises(AdapterNameError, match="outside"):
        resolve_adapter_dir(root, "linked_dir")
    with pytest.raises(AdapterNameError, match="adapter_model.safetensors .*outside"):
        resolve_adapter_dir(root, "linked_file")
    assert resolve_adapter_dir(root, "alias") == (root / "a0").resolve()
    with pytest.raises(AdapterNotFoundError):
        resolve_adapter_dir(root, "missing")


def test_only_safetensors_are_read(setup, tmp_path):
    model_dir, adapters, _ = setup
    root = tmp_path / "root"
    (root / "pickled").mkdir(parents=True)
    shutil.copy(adapters / "a0" / "adapter_config.json", root / "pickled")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    cache = make_cache(model_dir, root)
    with pytest.raises(AdapterLoadError, match="pickle files are never loaded"):
        cache.register("pickled")
    assert cache.names() == []


# ------------------------------------------------------------------------------------------ fit checks
def test_adapter_for_another_base_names_the_offending_key(setup):
    model_dir, adapters, _ = setup
    cache = make_cache(model_dir, adapters)
    with pytest.raises(AdapterMismatchError) as info:
        cache.register("other_base")
    assert info.value.key.startswith("base_model.model.model.layers.") and info.value.key in str(info.value)
    assert "expects shape" in str(info.value)
    with pytest.raises(AdapterMismatchError, match="max-lora-rank 4") as info:
        cache.register("rank8")
    assert info.value.key.endswith("lora_A.weight")
    with pytest.raises(AdapterMismatchError, match="embed_tokens"):
        cache.register("embed")
    assert cache.names() == []  # nothing half-registered


def test_scan_registers_folders_and_a_bad_one_fails_on_use(setup):
    model_dir, adapters, _ = setup
    cache = make_cache(model_dir, adapters)
    assert set(cache.scan()) >= {"a0", "a4", "other_base"}
    cache.want("other_base")
    for _ in range(200):  # the load runs on a loader thread
        if cache.describe("other_base")["tier"] == "failed":
            break
        time.sleep(0.01)
    with pytest.raises(AdapterMismatchError):
        cache.acquire("other_base")
    with pytest.raises(AdapterExistsError):
        cache.register("a0")


# ------------------------------------------------------------------------------------------ tiers
def wait_loaded(cache, name):
    for _ in range(500):
        slot = cache.acquire(name)
        if slot is not None:
            return slot
        time.sleep(0.01)
    raise AssertionError(f"{name} did not load")


def test_device_slots_lru_and_busy_slots_are_never_evicted(setup):
    model_dir, adapters, _ = setup
    cache = make_cache(model_dir, adapters, slots=2, max_cpu=2)
    for i in range(4):
        cache.register(f"a{i}", load=False)
    s0 = wait_loaded(cache, "a0")
    s1 = wait_loaded(cache, "a1")
    assert {s0, s1} == {1, 2}
    assert cache.acquire("a2") is None  # both slots busy (loading a2 from disk meanwhile)
    cache.release(s0)
    s2 = wait_loaded(cache, "a2")
    assert s2 == s0 and cache.describe("a0")["tier"] != "device"  # a0, idle, was evicted
    assert cache.acquire("a1") == s1  # a1 is still resident: a second request shares its slot
    cache.release(s1)
    cache.release(s1)
    cache.release(s2)
    assert cache.tiers()["device"] == 2
    assert cache.tiers()["host"] <= 2  # host LRU honours max_cpu once nobody waits
    stats = cache.stats
    assert stats["device_loads"] == 3 and stats["device_evictions"] == 1 and stats["disk_loads"] == 3


def test_a_slow_load_does_not_block_other_adapters(setup, monkeypatch):
    model_dir, adapters, _ = setup
    gate = threading.Event()
    real = cache_mod.adapter_groups

    def slow(decoder, directory):
        if directory.name == "a3":
            gate.wait(10)
        return real(decoder, directory)

    monkeypatch.setattr(cache_mod, "adapter_groups", slow)
    cache = make_cache(model_dir, adapters, slots=2)
    cache.register("a3", load=False)
    cache.register("a0", load=False)
    cache.want("a3")
    assert cache.acquire("a3") is None
    t0 = time.perf_counter()
    assert wait_loaded(cache, "a0") >= 1  # served while a3 is still stuck on disk
    assert time.perf_counter() - t0 < 5
    assert cache.describe("a3")["tier"] == "loading"
    gate.set()
    assert wait_loaded(cache, "a3") >= 1


def test_unregister_while_running_frees_the_slot_on_release(setup):
    model_dir, adapters, _ = setup
    cache = make_cache(model_dir, adapters, slots=1)
    cache.register("a0")
    slot = cache.acquire("a0")
    cache.unregister("a0")
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("a0")
    assert cache.tiers()["device"] == 1  # still serving the running request
    cache.release(slot)
    assert cache.tiers()["device"] == 0
    cache.register("a0")  # the name can be served again
    assert cache.acquire("a0") == slot
