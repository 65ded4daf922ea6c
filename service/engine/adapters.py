"""Multi-adapter admission: which LoRA adapter versions share one step's batch (torch-free).

`adapters.lifecycle.AdapterVersions` owns adapter weights (a host-memory cache filled by its loader
threads, and `max_active` active slots the model runner reads LoRA weights from) behind `AdapterSlotsLike`.
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
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from service.engine.admission import Verdict
from service.engine.outputs import ErrorKind, RequestError
from service.engine.request import Request

AdapterStatus = Literal["ready", "loading", "failed"]


class AdapterSlotsLike(Protocol):
    """The adapter versions of this process as the engine sees them (`adapters.lifecycle.AdapterVersions`).

    Only the engine thread calls these, and none of them blocks: loading happens on the owner's own
    threads, activation (putting host weights into a slot) is a bounded memory copy. The owner counts the
    running users of each slot; the engine keeps no count of its own.
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
        """Add a running user to the version and return the slot holding it, activating it into a free or
        least-recently-used slot with zero users if needed; None (and no user added) when every slot holds
        another version that has users."""
        ...

    def release_slot(self, version_id: str) -> None:
        """One running user fewer (the slot stays active, re-usable once it has no users)."""
        ...

    def held(self) -> Mapping[str, int]:
        """Running users of each active version that has any (for integrity checks and metrics)."""
        ...


class AdapterAdmission:
    """Admission policy that bounds and rotates the adapter versions of the running batch.

    Every `may_admit` that says yes to an adapter request takes one slot user (`slots.acquire`) until the
    scheduler's matching `on_release`; so between steps the slots' users are exactly the running requests
    of each version (`check_integrity`).
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

    # ---- AdmissionPolicy ----------------------------------------------------------------
    def begin_step(self, running: Sequence[Request]) -> None:
        self._step += 1
        self._barrier = None
        # Requests that finished while waiting (aborted, failed) leave the books here.
        if self._blocked:
            self._blocked = {rid: e for rid, e in self._blocked.items() if not e[0].is_finished}
        if self._load_waiters:
            self._load_waiters = {rid: r for rid, r in self._load_waiters.items() if not r.is_finished}

    def may_admit(self, request: Request) -> Verdict:
        version = request.extra_key
        if version is None:
            return True
        status = self.slots.status(version)
        if status == "failed":
            self._forget(request)
            return RequestError(ErrorKind.ADAPTER_UNAVAILABLE,
                                f"adapter version {version!r} failed to load: {self.slots.error(version)}")
        if status != "ready":
            self.slots.ensure_loading(version)
            if self._load_waiters.get(request.request_id) is not request:
                self._load_waiters[request.request_id] = request
                self.num_load_waits += 1
            return False
        if self._barrier is not None and version != self._barrier:
            return False  # a request ahead has been overtaken long enough: the busy adapters drain
        slot = self.slots.acquire(version)
        if slot is None:
            self._note_blocked(request, version)
            return False
        self._forget(request)
        request.lora_slot = slot
        return True

    def on_release(self, request: Request) -> None:
        if request.lora_slot >= 0:
            assert request.extra_key is not None, f"{request} holds a slot without an adapter"
            self.slots.release_slot(request.extra_key)
            request.lora_slot = -1

    # ---- bookkeeping --------------------------------------------------------------------
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
        """The slots' users are exactly the running adapter requests, each reading its version's slot."""
        counts = Counter(r.extra_key for r in running if r.extra_key is not None)
        held = dict(self.slots.held())
        assert counts == Counter(held), f"slot users {held} != running adapters {dict(counts)}"
        assert len(held) <= self.slots.max_active, f"{len(held)} adapters active"
        for r in running:
            assert (r.lora_slot >= 0) == (r.extra_key is not None), f"{r} runs with lora_slot={r.lora_slot}"
