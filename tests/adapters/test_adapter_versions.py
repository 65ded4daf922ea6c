"""AdapterVersions: one owner of holds, pins, host memory and slots (torch-free, milliseconds)."""

from __future__ import annotations

import threading

import pytest

from adapters.cache import CacheFull
from adapters.lifecycle import AdapterVersions, PinLimitReached


class Weights:
    """What the loader returns: the cache only needs `nbytes`."""

    def __init__(self, version_id: str, nbytes: int = 1) -> None:
        self.version_id, self.nbytes = version_id, nbytes


class Slots:
    def __init__(self, max_active: int) -> None:
        self.max_active = max_active
        self.loaded: list[tuple[int, str]] = []

    def load(self, slot: int, weights: Weights) -> None:
        self.loaded.append((slot, weights.version_id))


@pytest.fixture
def make():
    made: list[AdapterVersions] = []

    def build(max_active: int = 2, max_count: int = 4, fail: frozenset[str] = frozenset()) -> AdapterVersions:
        def loader(vid: str) -> Weights:
            if vid in fail:
                raise ValueError(f"{vid} is corrupt")
            return Weights(vid)

        v = AdapterVersions(loader, Slots(max_active), max_bytes=10**6, max_count=max_count)
        made.append(v)
        return v

    yield build
    for v in made:
        v.close()


def ready(v: AdapterVersions, *vids: str) -> None:
    for vid in vids:
        v.ensure_loading(vid)
        v.cache.wait(vid, timeout=10)


def test_requests_hold_a_version_in_use_until_each_releases(make):
    v = make()
    v.hold("a")
    v.hold("a")
    v.release("a")
    assert v.in_use("a") and not v.in_use("b")
    v.release("a")
    assert not v.in_use("a")
    with pytest.raises(AssertionError, match="released more often"):
        v.release("a")


def test_pins_are_per_tenant_bounded_and_keep_the_version_in_memory(make):
    v = make(max_count=2)
    v.pin("alice", "a", max_pins=1)
    v.pin("alice", "a", max_pins=1)  # idempotent per tenant: still one pin
    v.pin("bob", "a")
    with pytest.raises(PinLimitReached, match="alice.*max_loaded_adapters"):
        v.pin("alice", "b", max_pins=1)
    v.wait_loaded("a", timeout=10)
    assert v.pinned_by("a") == {"alice", "bob"} and v.state("a") == ("loaded", "")
    ready(v, "b", "c", "d")  # the cache holds two: LRU evicts around the pinned one
    assert v.cache.status("a") == "ready" and v.cache.status("b") == "absent"
    assert v.unpin("alice", "a") and not v.unpin("alice", "a")  # bob's pin keeps it
    ready(v, "e")
    assert v.cache.status("a") == "ready"
    assert v.unpin("bob", "a")
    ready(v, "b", "c")
    assert v.cache.status("a") == "absent" and v.state("a") == ("stored", "")


def test_slots_are_reused_only_when_no_running_request_reads_them(make):
    v = make(max_active=2)
    ready(v, "a", "b", "c")
    assert v.acquire("a") == 0 and v.acquire("b") == 1 and v.acquire("a") == 0
    assert v.held() == {"a": 2, "b": 1}
    assert v.acquire("c") is None  # both slots have users
    v.release_slot("b")
    assert v.acquire("c") == 1 and v.active_versions() == ["a", "c"]
    assert v.slots.loaded == [(0, "a"), (1, "b"), (1, "c")]
    assert v.status("b") == "ready"  # still in host memory: b's slot was re-used, not its cache entry


def test_a_version_in_a_slot_stays_in_host_memory(make):
    """(The server's config keeps the cache larger than the slots: AdapterConfig refuses otherwise.)"""
    v = make(max_active=1, max_count=1)
    ready(v, "a")
    assert v.acquire("a") == 0
    v.ensure_loading("b")  # the only cache entry is read by the slot: no room
    with pytest.raises(Exception, match="no room for adapter b"):
        v.cache.wait("b", timeout=10)
    assert isinstance(v.cache.error("b"), CacheFull) and v.status("b") == "failed"
    v.release_slot("a")
    assert v.status("b") == "failed"  # a still sits in the slot
    v.forget("a")  # deleted: its host copy stays only while the slot reads it
    assert v.cache.status("a") == "ready"


def test_forget_drops_pins_and_the_host_copy(make):
    v = make()
    v.pin("alice", "a")
    v.wait_loaded("a", timeout=10)
    v.forget("a")
    assert v.pinned_by("a") == frozenset() and v.cache.status("a") == "absent"


def test_a_failed_load_is_reported_with_its_reason(make):
    v = make(fail=frozenset({"bad"}))
    v.pin("alice", "bad")
    v.wait_loaded("bad", timeout=10)
    state, error = v.state("bad")
    assert state == "failed" and "bad is corrupt" in error
    assert v.status("bad") == "failed" and "bad is corrupt" in v.error("bad")


def test_holds_from_many_threads_balance(make):
    v = make()

    def churn() -> None:
        for _ in range(500):
            v.hold("a")
            v.release("a")

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not v.in_use("a")
