"""The one owner of every adapter version's lifetime in this process (torch-free).

A version lives in three tiers: the store (files) -> the host cache (loaded, in model layout) -> an active
slot the batch reads. `AdapterVersions` keeps, per version, everything that decides what happens to it:

- requests that hold it, from submit to finish (waiting and running): while any does, the version is
  *in use* and a delete is refused;
- `LoadAdapter` pins, one per tenant: a pinned version stays in host memory;
- its active slot, if any, and that slot's running users: a version in a slot stays in host memory too
  (the slot reads the host tensors), and a slot is re-used only when it has no running users.

It is the single loading entry point (`ensure_loading`), decides activation and which slot is re-used
(`acquire`), tells the host cache what it may evict (`protected`), and forgets a deleted version
(`forget`). The engine sees it through `service.engine.adapters.AdapterSlotsLike`; the server's
`AdapterManager` through hold / release / pin / unpin / forget.

Threads: hold / release / pin / unpin / forget / state come from RPC threads; the engine-side methods
from the engine loop only. One lock guards the shared state and is never held while calling the cache
(the cache calls `protected` under its own lock: the order is always cache, then this).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, Protocol

from adapters.cache import AdapterLoadFailed, CacheStats, HostAdapterCache

__all__ = ["AdapterVersions", "LoadState", "PinLimitReached", "SlotTable"]

LoadState = Literal["stored", "loading", "loaded", "failed"]


class PinLimitReached(Exception):
    """The tenant holds as many LoadAdapter pins as its limit allows (RESOURCE_EXHAUSTED)."""


class SlotTable(Protocol):
    """Where active adapters' weights are read from by the model (`service.runtime.lora.LoraSlots`)."""

    @property
    def max_active(self) -> int: ...

    def load(self, slot: int, weights: Any) -> None:
        """Put one version's loaded weights (what the cache holds) into `slot`."""
        ...


class AdapterVersions:
    def __init__(self, loader: Callable[[str], Any], slots: SlotTable, *, max_bytes: int, max_count: int,
                 workers: int = 1) -> None:
        """`loader(version_id)`: reads, validates and lays out one version (run on the cache's threads)."""
        if slots.max_active < 1:
            raise ValueError(f"max_active_adapters={slots.max_active} is invalid: must be >= 1")
        self.slots = slots
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()  # version -> requests holding it (submit to finish)
        self._pins: dict[str, set[str]] = {}  # version -> tenants whose LoadAdapter pins it
        self._slot_of: dict[str, int] = {}  # version -> the active slot holding it
        self._slot_version: list[str | None] = [None] * slots.max_active
        # Engine thread only: running users of each slot, and when each slot was last let go (LRU re-use).
        self._users = [0] * slots.max_active
        self._last_used = [0] * slots.max_active
        self._clock = itertools.count(1)
        self.activations = 0
        self.cache = HostAdapterCache(loader, max_bytes=max_bytes, max_count=max_count, workers=workers,
                                      protected=self._protected)

    # ---- requests and pins (any thread) ---------------------------------------------------------------
    def hold(self, version_id: str) -> None:
        """A request on this version was submitted: until `release`, the version is in use."""
        with self._lock:
            self._requests[version_id] += 1

    def release(self, version_id: str) -> None:
        with self._lock:
            n = self._requests[version_id] - 1
            if n < 0:
                raise AssertionError(f"adapter {version_id} released more often than held")
            if n:
                self._requests[version_id] = n
            else:
                del self._requests[version_id]

    def requests_held(self) -> dict[str, int]:
        """Version -> how many requests hold it now."""
        with self._lock:
            return dict(self._requests)

    def in_use(self, version_id: str) -> bool:
        """Requests hold it (a delete must wait for them)."""
        with self._lock:
            return self._requests.get(version_id, 0) > 0

    def pin(self, tenant: str, version_id: str, max_pins: int | None = None) -> None:
        """Keep the version in host memory for `tenant` (idempotent per tenant) and start its load.
        PinLimitReached if the tenant already pins `max_pins` other versions."""
        with self._lock:
            holders = self._pins.get(version_id, set())
            if max_pins is not None and tenant not in holders:
                held = sum(tenant in h for h in self._pins.values())
                if held >= max_pins:
                    raise PinLimitReached(f"tenant {tenant!r} already holds {held} loaded adapter versions, its "
                                          f"limit (max_loaded_adapters); unload one first")
            self._pins.setdefault(version_id, set()).add(tenant)
        self.cache.ensure_loading(version_id)

    def unpin(self, tenant: str, version_id: str) -> bool:
        """Drop `tenant`'s pin (other tenants' pins keep the version); False if it had none."""
        with self._lock:
            holders = self._pins.get(version_id)
            if holders is None or tenant not in holders:
                return False
            holders.discard(tenant)
            if not holders:
                del self._pins[version_id]
            freed = version_id not in self._pins and version_id not in self._slot_of
        if freed:
            self.cache.room_freed()
        return True

    def pinned_by(self, version_id: str) -> frozenset[str]:
        """The tenants whose LoadAdapter pins the version."""
        with self._lock:
            return frozenset(self._pins.get(version_id, ()))

    def forget(self, version_id: str) -> None:
        """The version was deleted: drop every pin and its host copy (requests no longer hold it: the
        registry refuses to delete a version in use)."""
        with self._lock:
            self._pins.pop(version_id, None)
        self.cache.discard(version_id)  # kept only while an active slot still reads it
        self.cache.room_freed()

    def wait_loaded(self, version_id: str, timeout: float | None) -> None:
        """Block until the load started by `pin` ends (its outcome is in `state`)."""
        try:
            self.cache.wait(version_id, timeout)
        except (TimeoutError, LookupError, AdapterLoadFailed):
            pass

    def state(self, version_id: str) -> tuple[LoadState, str]:
        """(state, why it failed)."""
        s = self.cache.status(version_id)
        if s == "ready":
            return "loaded", ""
        if s == "failed":
            err = self.cache.error(version_id)
            return "failed", str(err) if err else "the load failed"
        return ("loading", "") if s == "loading" else ("stored", "")

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def _protected(self, version_id: str) -> bool:
        # Called by the cache under its lock.
        with self._lock:
            return version_id in self._pins or version_id in self._slot_of

    # ---- the engine's side (engine loop thread; AdapterSlotsLike) -------------------------------------
    @property
    def max_active(self) -> int:
        return self.slots.max_active

    def ensure_loading(self, version_id: str) -> None:
        if version_id not in self._slot_of:
            self.cache.ensure_loading(version_id)

    def status(self, version_id: str) -> Literal["ready", "loading", "failed"]:
        if version_id in self._slot_of:
            return "ready"
        s = self.cache.status(version_id)
        if s == "absent":  # evicted since it was requested: load it again
            s = self.cache.ensure_loading(version_id)
        return "loading" if s == "absent" else s

    def error(self, version_id: str) -> str:
        err = self.cache.error(version_id)
        return str(err) if err is not None else "unknown error"

    def acquire(self, version_id: str) -> int | None:
        slot = self._slot_of.get(version_id)
        if slot is None:
            free = [i for i in range(self.max_active) if self._users[i] == 0]
            if not free:
                return None
            slot = min(free, key=lambda i: (self._slot_version[i] is not None, self._last_used[i]))
            with self._lock:  # protected from here, so the cache cannot evict it between get and load
                old = self._slot_version[slot]
                if old is not None:
                    del self._slot_of[old]
                self._slot_of[version_id] = slot
                self._slot_version[slot] = version_id
            weights = self.cache.get(version_id)
            if weights is None:  # evicted between status() and now: back out, load it again
                with self._lock:
                    del self._slot_of[version_id]
                    self._slot_version[slot] = None
                self.cache.ensure_loading(version_id)
                return None
            self.slots.load(slot, weights)
            self.activations += 1
            if old is not None:
                self.cache.room_freed()
        self._users[slot] += 1
        return slot

    def release_slot(self, version_id: str) -> None:
        slot = self._slot_of[version_id]
        if self._users[slot] <= 0:
            raise AssertionError(f"adapter {version_id} released from its slot more often than acquired")
        self._users[slot] -= 1
        self._last_used[slot] = next(self._clock)

    def held(self) -> dict[str, int]:
        return {v: self._users[s] for v, s in self._slot_of.items() if self._users[s]}

    def active_versions(self) -> list[str]:
        return [v for v in self._slot_version if v is not None]

    def close(self) -> None:
        self.cache.close()
