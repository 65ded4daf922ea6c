"""Multi-adapter admission: which LoRA adapter versions share one step's batch (torch-free).

The runtime owns adapter weights (a host-memory cache filled by its loader threads, and
`max_active` active slots the model runner reads LoRA weights from) behind `AdapterSlotsLike`.
This module only decides who runs, as the scheduler's admission policy:

- base-model requests (extra_key None) need no slot and are always admissible;
- a request whose adapter is still loading is skipped for the step (it keeps its place, so a load
  never holds up the batch); when the load failed, the request fails with the loader's message;
- at most `max_active` distinct adapter versions are held at once, i.e. run in one step's batch.
  An admitted request reads its weights from slot `request.lora_slot` until it stops running
  (finished, aborted, failed or preempted); a resumed request acquires a slot again;
- rotation: a ready request whose adapter finds every slot busy with other adapters is *blocked*.
  Requests of the busy adapters may overtake it for `max_overtake_steps` steps; after that nothing
  of another adapter is admitted past it, so the busy adapters drain, a slot loses its last user and
  the blocked request gets it. Base-model requests never need a slot, so they always go ahead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal, Protocol

from service.engine.request import Request

AdapterStatus = Literal["ready", "loading", "failed"]


class AdapterSlotsLike(Protocol):
    """The runtime's adapter weights as the engine sees them (implemented in `service.runtime`).

    Only the engine thread calls these, and none of them blocks: loading happens on the runtime's
    own threads, activation (copying host weights into a slot) is a bounded memory copy.
    """

    @property
    def max_active(self) -> int:
        """Number of active slots: slot indices are 0 .. max_active - 1."""
        ...

    def ensure_loading(self, version_id: str) -> None:
        """Start loading the version into host memory unless it is there or on its way (idempotent)."""
        ...

    def status(self, version_id: str) -> AdapterStatus:
        ...

    def error(self, version_id: str) -> str:
        """Why the load failed (when status is "failed")."""
        ...

    def acquire(self, version_id: str) -> int | None:
        """Add a user to the version and return the slot holding it, activating it into a free or
        least-recently-used slot with zero users if needed; None (and no user added) when every
        slot holds another version that has users."""
        ...

    def release(self, version_id: str) -> None:
        """One user fewer (the slot stays active, evictable once it has no users)."""
        ...


class AdapterAdmission:
    """Admission policy that bounds and rotates the adapter versions of the running batch.

    Every `may_admit` that says yes holds the request (and, for an adapter request, one user of its
    version's slot) until the scheduler's matching `on_release`; so between steps the holders are
    exactly the running requests and `_users` counts the running requests of each active version.
    """

    def __init__(self, slots: AdapterSlotsLike, max_overtake_steps: int = 8) -> None:
        if not isinstance(max_overtake_steps, int) or max_overtake_steps < 0:
            raise ValueError(f"max_overtake_steps={max_overtake_steps!r} is invalid: must be an integer >= 0")
        if slots.max_active < 1:
            raise ValueError(
                f"the adapter slots report max_active={slots.max_active}: at least 1 slot is needed"
            )
        self.slots = slots
        self.max_overtake_steps = max_overtake_steps
        self._holders: dict[str, str | None] = {}  # request id -> its version (None: base model)
        self._users: dict[str, int] = {}  # active version -> holders; len() <= max_active
        # Requests first blocked at step s, and requests that waited for a load (counted once each).
        # They hold the request itself so a reused id is never mistaken for the old request.
        self._blocked: dict[str, tuple[Request, int]] = {}
        self._load_waiters: dict[str, Request] = {}
        # The version of a request that was overtaken long enough: for the rest of this step's walk,
        # no request of another adapter is admitted behind it.
        self._barrier: str | None = None
        # Counts admission rounds (begin_step), not engine steps: a step that preempts admits
        # nobody, so it overtakes nobody either.
        self._step = 0
        self.num_load_waits = 0  # requests that had to wait for their adapter to load

    @property
    def active_versions(self) -> frozenset[str]:
        return frozenset(self._users)

    # ---- AdmissionPolicy ----------------------------------------------------------------
    def begin_step(self, running: Sequence[Request]) -> None:
        self._step += 1
        self._barrier = None
        # Requests that finished while waiting (aborted, failed) leave the books here.
        if self._blocked:
            self._blocked = {rid: e for rid, e in self._blocked.items() if not e[0].is_finished}
        if self._load_waiters:
            self._load_waiters = {rid: r for rid, r in self._load_waiters.items() if not r.is_finished}

    def may_admit(self, request: Request) -> bool:
        version = request.extra_key
        if version is None:
            self._hold(request, None)
            return True
        status = self.slots.status(version)
        if status == "failed":
            # The scheduler reports the request; the engine finishes it with ERROR and this message.
            request.error = f"adapter version {version!r} failed to load: {self.slots.error(version)}"
            request.error_kind = "adapter_unavailable"
            self._forget(request)
            return False
        if status != "ready":
            self.slots.ensure_loading(version)
            if self._load_waiters.get(request.request_id) is not request:
                self._load_waiters[request.request_id] = request
                self.num_load_waits += 1
            return False
        if self._barrier is not None and version != self._barrier:
            return False  # a request ahead has been overtaken long enough: the busy adapters drain
        slot = None
        if version in self._users or len(self._users) < self.slots.max_active:
            slot = self.slots.acquire(version)
        if slot is None:
            self._note_blocked(request, version)
            return False
        self._forget(request)
        request.lora_slot = slot
        self._hold(request, version)
        return True

    def on_admit(self, request: Request) -> None:
        pass  # the slot was taken in may_admit, which the scheduler balances with on_release

    def on_release(self, request: Request) -> None:
        rid = request.request_id
        assert rid in self._holders, f"{request} released without a matching admission"
        version = self._holders.pop(rid)
        request.lora_slot = -1
        if version is None:
            return
        n = self._users[version] - 1
        if n:
            self._users[version] = n
        else:
            del self._users[version]
        self.slots.release(version)

    # ---- bookkeeping --------------------------------------------------------------------
    def _hold(self, request: Request, version: str | None) -> None:
        assert request.request_id not in self._holders, f"{request} admitted twice without a release"
        self._holders[request.request_id] = version
        if version is not None:
            self._users[version] = self._users.get(version, 0) + 1

    def _forget(self, request: Request) -> None:
        self._blocked.pop(request.request_id, None)
        self._load_waiters.pop(request.request_id, None)

    def _note_blocked(self, request: Request, version: str) -> None:
        entry = self._blocked.get(request.request_id)
        if entry is None or entry[0] is not request:
            entry = self._blocked[request.request_id] = (request, self._step)
        if self._barrier is None and self._step - entry[1] >= self.max_overtake_steps:
            self._barrier = version

    def check_integrity(self, running: Sequence[Request]) -> None:
        """Holders are exactly the running requests, each adapter one holding a slot user."""
        assert set(self._holders) == {r.request_id for r in running}, "adapter holders != running requests"
        counts = Counter(r.extra_key for r in running if r.extra_key is not None)
        assert counts == Counter(self._users), f"slot users {self._users} != running adapters {dict(counts)}"
        assert len(self._users) <= self.slots.max_active, f"{len(self._users)} adapters active"
        for r in running:
            assert (r.lora_slot >= 0) == (r.extra_key is not None), f"{r} runs with lora_slot={r.lora_slot}"
