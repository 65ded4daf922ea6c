"""A fake `AdapterSlotsLike`: loads finish after a number of status polls, failures are injectable,
and a slot table maps each active slot to the adapter version it holds, which `FakeRunner` reads
(a request served from the wrong slot computes with the wrong adapter and yields wrong tokens)."""

from __future__ import annotations


class FakeAdapterSlots:
    def __init__(self, max_active: int = 2, load_polls: int | dict[str, int] = 0,
                 fail: dict[str, str] | None = None) -> None:
        self.max_active = max_active
        self.load_polls = load_polls  # status() polls a started load needs before it is done
        self.fail = dict(fail or {})  # version -> error message once its load is done
        self.slot_version: list[str | None] = [None] * max_active
        self.users = [0] * max_active
        self.last_used = [0] * max_active
        self.loads_started: list[str] = []
        self.activations: list[tuple[int, str]] = []  # (slot, version), every copy into a slot
        self._remaining: dict[str, int] = {}  # loads in flight
        self._done: set[str] = set()
        self._clock = 0

    # ---- AdapterSlotsLike ----------------------------------------------------------------
    def ensure_loading(self, version_id: str) -> None:
        if version_id in self._done or version_id in self._remaining:
            return
        self.loads_started.append(version_id)
        polls = self.load_polls if isinstance(self.load_polls, int) else self.load_polls.get(version_id, 0)
        self._remaining[version_id] = polls
        if polls == 0:
            self._finish_load(version_id)

    def status(self, version_id: str) -> str:
        if version_id in self._done:
            return "failed" if version_id in self.fail else "ready"
        if version_id in self._remaining:
            self._remaining[version_id] -= 1
            if self._remaining[version_id] <= 0:
                self._finish_load(version_id)
                return self.status(version_id)
        return "loading"  # also for a version nobody asked to load yet

    def error(self, version_id: str) -> str:
        assert version_id in self._done and version_id in self.fail, f"{version_id} did not fail"
        return self.fail[version_id]

    def acquire(self, version_id: str) -> int | None:
        assert self.status(version_id) == "ready", f"acquire of {version_id}, which is not ready"
        self._clock += 1
        if version_id in self.slot_version:
            slot = self.slot_version.index(version_id)
        else:
            free = [s for s in range(self.max_active) if self.users[s] == 0]
            if not free:
                return None
            # an empty slot first, else the least recently used one
            slot = min(free, key=lambda s: (self.slot_version[s] is not None, self.last_used[s]))
            self.slot_version[slot] = version_id
            self.activations.append((slot, version_id))
        self.users[slot] += 1
        self.last_used[slot] = self._clock
        return slot

    def release_slot(self, version_id: str) -> None:
        assert version_id in self.slot_version, f"release of {version_id}, which holds no slot"
        slot = self.slot_version.index(version_id)
        assert self.users[slot] > 0, f"release of {version_id} with no users"
        self.users[slot] -= 1
        self._clock += 1
        self.last_used[slot] = self._clock

    # ---- for the fake runner and the tests -----------------------------------------------
    def version_in(self, slot: int) -> str | None:
        return self.slot_version[slot]

    def held(self) -> dict[str, int]:
        return {v: n for v, n in zip(self.slot_version, self.users, strict=True) if v is not None and n}

    def _finish_load(self, version_id: str) -> None:
        del self._remaining[version_id]
        self._done.add(version_id)
