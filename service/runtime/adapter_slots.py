"""The adapter tiers as the engine sees them: store -> host memory (LRU, pinning) -> active slots.

`RuntimeAdapterSlots` implements the engine's `AdapterSlotsLike`. Loads (read from the store, validate,
fuse into model layout) run on the host cache's worker thread, never on the engine loop; activation
puts a host-resident version into a free slot (least recently used first) and pins it there, so the
host cache never evicts what a running request reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from adapters.cache import HostAdapterCache
from adapters.peft_format import ParsedAdapter
from service.runtime.arch import ModelArch
from service.runtime.lora import FusedLora, LoraSlots, fuse_adapter


def fused_loader(load: Callable[[str], ParsedAdapter], arch: ModelArch, dtype: torch.dtype = torch.float32
                 ) -> Callable[[str], FusedLora]:
    """Wrap a version-id -> ParsedAdapter loader so the host tier holds model-layout weights.

    float32 whatever the model's dtype: the CPU path computes the small LoRA products in float32."""
    def _load(version_id: str) -> FusedLora:
        return fuse_adapter(load(version_id), arch, version_id, dtype)
    return _load


class RuntimeAdapterSlots:
    """Called from the engine loop only (the host cache does its own locking)."""

    def __init__(self, cache: HostAdapterCache, slots: LoraSlots) -> None:
        self.cache = cache
        self.slots = slots
        self._slot_of: dict[str, int] = {}
        self._users = [0] * slots.max_active
        self._last_used = [0] * slots.max_active
        self._clock = itertools.count(1)
        self.activations = 0

    @property
    def max_active(self) -> int:
        return self.slots.max_active

    def ensure_loading(self, version_id: str) -> None:
        if version_id not in self._slot_of:
            self.cache.ensure_loading(version_id)

    def status(self, version_id: str) -> str:
        if version_id in self._slot_of:
            return "ready"
        s = self.cache.status(version_id)
        if s == "absent":  # evicted since it was requested: load it again
            s = self.cache.ensure_loading(version_id)
        return s

    def error(self, version_id: str) -> str:
        err = self.cache.error(version_id)
        return str(err) if err is not None else "unknown error"

    def acquire(self, version_id: str) -> int | None:
        slot = self._slot_of.get(version_id)
        if slot is None:
            free = [i for i in range(self.max_active) if self._users[i] == 0]
            if not free:
                return None
            fused = self.cache.get(version_id)
            if fused is None:  # evicted between status() and now
                self.cache.ensure_loading(version_id)
                return None
            slot = min(free, key=lambda i: (self.slots.versions[i] is not None, self._last_used[i]))
            old = self.slots.versions[slot]
            if old is not None:
                del self._slot_of[old]
                self.cache.unpin(old)
            self.cache.pin(version_id)
            self.slots.load(slot, fused)
            self._slot_of[version_id] = slot
            self.activations += 1
        self._users[slot] += 1
        return slot

    def release(self, version_id: str) -> None:
        slot = self._slot_of[version_id]
        if self._users[slot] <= 0:
            raise AssertionError(f"adapter {version_id} released more often than acquired")
        self._users[slot] -= 1
        self._last_used[slot] = next(self._clock)

    def active_versions(self) -> list[str]:
        return [v for v in self.slots.versions if v is not None]
