"""HostAdapterCache: LRU by bytes and count, protected versions, one background load per id, failures;
LoaderFromStore."""

from __future__ import annotations

import json
import threading
from types import MappingProxyType

import pytest
import safetensors.torch
import torch

from adapters.cache import (
    AdapterLoadFailed,
    CacheFull,
    HostAdapterCache,
    LoaderFromStore,
    StoredAdapterCorrupt,
)
from adapters.identity import ID_HEX_CHARS, ID_PREFIX, adapter_version_id
from adapters.peft_config import AdapterError, LoraAdapterConfig, ModuleLora
from adapters.peft_format import LoraWeights, ParsedAdapter
from adapters.store import CONFIG_FILE, VERSION_ID_RE, WEIGHTS_FILE, FilesystemStore, NotInStore
from service.runtime.arch import ModelArch

BASE = "tiny@sha256:abcd"
UNIT = 64  # bytes of a rank-1 adapter below: A [1, 8] + B [8, 1] in fp32


def adapter(rank: int = 1) -> ParsedAdapter:
    """A ParsedAdapter of rank * UNIT bytes, built directly (no files, no parsing)."""
    config = LoraAdapterConfig(modules=MappingProxyType({(0, "q_proj"): ModuleLora(rank, 1.0, 1.0 / rank)}),
                               use_rslora=False)
    w = LoraWeights(A=torch.zeros(rank, 8), B=torch.zeros(8, rank), scale=1.0 / rank)
    return ParsedAdapter(config=config, weights=MappingProxyType({(0, "q_proj"): w}))


class FakeLoader:
    """Returns adapters by id; records calls; can block on a gate or fail."""

    def __init__(self, sizes: dict[str, int] | None = None, gate: threading.Event | None = None) -> None:
        self.sizes, self.gate = sizes or {}, gate
        self.calls: list[str] = []
        self.errors: dict[str, Exception] = {}
        self._lock = threading.Lock()

    def __call__(self, version_id: str) -> ParsedAdapter:
        with self._lock:
            self.calls.append(version_id)
        if self.gate is not None:
            assert self.gate.wait(10)
        if version_id in self.errors:
            raise self.errors[version_id]
        return adapter(self.sizes.get(version_id, 1))


def load(cache: HostAdapterCache, *ids: str) -> None:
    for vid in ids:
        cache.ensure_loading(vid)
        cache.wait(vid, timeout=10)


@pytest.fixture
def make_cache():
    caches: list[HostAdapterCache] = []

    def make(loader=None, max_bytes: int = 10**6, max_count: int = 100, **kw) -> HostAdapterCache:
        caches.append(HostAdapterCache(loader or FakeLoader(), max_bytes=max_bytes, max_count=max_count, **kw))
        return caches[-1]

    yield make
    for c in caches:
        c.close()


def test_lru_eviction_by_count(make_cache):
    cache = make_cache(max_count=2)
    load(cache, "a", "b")
    assert cache.get("a") is not None  # a is now more recently used than b
    load(cache, "c")
    assert [cache.status(v) for v in "abc"] == ["ready", "absent", "ready"]
    assert cache.get("b") is None
    stats = cache.stats()
    assert (stats.count, stats.evictions, stats.loads, stats.hits, stats.misses) == (2, 1, 3, 1, 1)
    assert len(stats.load_seconds) == 3 and all(s >= 0 for s in stats.load_seconds)


def test_lru_eviction_by_bytes(make_cache):
    cache = make_cache(FakeLoader({"big": 3}), max_bytes=4 * UNIT)
    load(cache, "a", "b", "c")
    assert cache.stats().nbytes == 3 * UNIT
    load(cache, "big")  # 3 units: a and b (least recent) go, c stays
    assert [cache.status(v) for v in ("a", "b", "c", "big")] == ["absent", "absent", "ready", "ready"]
    assert cache.stats().nbytes == 4 * UNIT and cache.stats().evictions == 2


def test_protected_adapters_are_never_evicted(make_cache):
    protected: set[str] = set()  # what the owner (adapters.lifecycle) says must stay
    cache = make_cache(max_count=2, protected=protected.__contains__)
    protected.add("a")  # protected before it loads: a pin holds it
    load(cache, "a", "b", "c", "d")
    assert cache.status("a") == "ready" and cache.status("d") == "ready"
    assert cache.stats().protected == 1 and cache.stats().evictions == 2
    assert not cache.discard("a")  # a delete cannot drop what the owner keeps

    protected.add("d")
    cache.ensure_loading("e")  # every slot is held: the load fails rather than exceed the bounds
    with pytest.raises(AdapterLoadFailed, match="no room for adapter e"):
        cache.wait("e", timeout=10)
    assert isinstance(cache.error("e"), CacheFull) and cache.error("e").transient
    assert cache.stats().count == 2 and cache.ensure_loading("e") == "failed"  # no room yet: not retried
    protected.discard("a")
    cache.room_freed()  # the owner let a go: the refused load is forgotten, so the next request retries at once
    assert cache.status("e") == "absent"
    load(cache, "e")  # a is evictable again
    assert cache.status("a") == "absent" and cache.status("d") == "ready"


def test_an_adapter_larger_than_the_cache_fails(make_cache):
    cache = make_cache(FakeLoader({"huge": 5}), max_bytes=4 * UNIT)
    cache.ensure_loading("huge")
    with pytest.raises(AdapterLoadFailed, match="more than the whole host adapter cache"):
        cache.wait("huge", timeout=10)
    assert cache.status("huge") == "failed" and not cache.error("huge").transient


def test_concurrent_ensure_loading_loads_once(make_cache):
    gate = threading.Event()
    loader = FakeLoader(gate=gate)
    cache = make_cache(loader, workers=2)
    barrier, statuses = threading.Barrier(8), []

    def ask():
        barrier.wait()
        statuses.append(cache.ensure_loading("a"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == ["loading"] * 8 and cache.status("a") == "loading"
    with pytest.raises(TimeoutError, match="still loading"):
        cache.wait("a", timeout=0.01)
    assert cache.get("a") is None  # not blocked by the load in flight
    gate.set()
    assert isinstance(cache.wait("a", timeout=10), ParsedAdapter)
    assert loader.calls == ["a"] and cache.ensure_loading("a") == "ready"


def test_failed_load_reports_status_and_message(make_cache):
    loader = FakeLoader()
    loader.errors["bad"] = AdapterError("tensor x holds 3 NaN or inf values")
    cache = make_cache(loader)
    cache.ensure_loading("bad")
    with pytest.raises(AdapterLoadFailed, match="loading adapter bad failed: tensor x holds 3 NaN") as info:
        cache.wait("bad", timeout=10)
    assert isinstance(info.value.__cause__, AdapterError)
    assert cache.status("bad") == "failed" and "NaN" in str(cache.error("bad"))
    assert cache.get("bad") is None and cache.error("good") is None
    assert cache.ensure_loading("bad") == "failed"  # a recent failure is not retried at once
    assert loader.calls == ["bad"] and cache.stats().load_failures == 1

    del loader.errors["bad"]
    assert cache.discard("bad") and cache.status("bad") == "absent"
    load(cache, "bad")
    assert cache.status("bad") == "ready" and cache.error("bad") is None


def test_failures_are_retried_after_the_backoff(make_cache):
    loader = FakeLoader()
    loader.errors["x"] = OSError("disk went away")
    cache = make_cache(loader, retry_failed_after_s=0.0)
    cache.ensure_loading("x")
    with pytest.raises(AdapterLoadFailed):
        cache.wait("x", timeout=10)
    del loader.errors["x"]
    assert cache.ensure_loading("x") in ("loading", "ready")
    cache.wait("x", timeout=10)
    assert loader.calls == ["x", "x"]


def test_wait_for_unknown_and_discard_while_loading(make_cache):
    gate = threading.Event()
    cache = make_cache(FakeLoader(gate=gate))
    with pytest.raises(LookupError, match="neither loaded nor loading"):
        cache.wait("nothing", timeout=1)
    cache.ensure_loading("a")
    assert cache.discard("a") and cache.status("a") == "absent"
    gate.set()
    cache.close()  # waits for the worker: its result was dropped
    assert cache.status("a") == "absent" and cache.stats().count == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.ensure_loading("a")


def test_invalid_bounds():
    with pytest.raises(ValueError, match="positive"):
        HostAdapterCache(FakeLoader(), max_bytes=0, max_count=1)


# --- LoaderFromStore ---------------------------------------------------------------------------------------


def tiny_arch() -> ModelArch:
    return ModelArch(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=64, tie_word_embeddings=False)


def adapter_files(seed: int) -> dict[str, bytes]:
    """A peft-format adapter (q_proj, rank 2) as the two files an upload carries."""
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(2, 16, generator=g),
               f"{prefix}.lora_B.weight": torch.randn(16, 2, generator=g)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: safetensors.torch.save(tensors)}


def test_loader_from_store_checks_the_content_id(tmp_path):
    from adapters.peft_format import parse_adapter

    store, arch = FilesystemStore(tmp_path), tiny_arch()
    good, other = adapter_files(0), adapter_files(1)
    good_id = adapter_version_id(parse_adapter(good, arch), BASE)
    other_id = adapter_version_id(parse_adapter(other, arch), BASE)
    store.put(good_id, good)
    store.put(other_id, good)  # the wrong files under other_id: a corrupted store
    garbled = "v-" + "0" * 24
    store.put(garbled, {CONFIG_FILE: good[CONFIG_FILE], WEIGHTS_FILE: b"not safetensors"})
    loader = LoaderFromStore(store, arch, BASE)

    parsed = loader(good_id)
    assert torch.equal(parsed.weights[(0, "q_proj")].A, safetensors.torch.load(good[WEIGHTS_FILE])[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    with pytest.raises(StoredAdapterCorrupt, match=f"now hashes to {good_id}"):
        loader(other_id)
    with pytest.raises(StoredAdapterCorrupt, match="another base model"):
        LoaderFromStore(store, arch, "another-base")(good_id)
    with pytest.raises(StoredAdapterCorrupt, match="does not load: adapter_model.safetensors is not a valid"):
        loader(garbled)
    with pytest.raises(NotInStore):
        loader("v-" + "1" * 24)

    with HostAdapterCache(loader, max_bytes=10**6, max_count=4) as cache:
        for vid in (good_id, other_id):
            cache.ensure_loading(vid)
        assert cache.wait(good_id, timeout=10).max_rank == 2
        with pytest.raises(AdapterLoadFailed, match="corrupt"):
            cache.wait(other_id, timeout=10)
        assert cache.status(other_id) == "failed" and "upload the adapter again" in str(cache.error(other_id))


def test_store_id_pattern_matches_identity():
    assert VERSION_ID_RE.pattern == f"{ID_PREFIX}[0-9a-f]{{{ID_HEX_CHARS}}}"
    assert VERSION_ID_RE.fullmatch(adapter_version_id(adapter(), BASE))
