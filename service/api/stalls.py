"""Bounds on what a slow or stalled client can hold: server threads, per call.

A sync gRPC server gives every call a thread for its whole life. A streaming call whose client stops
reading blocks that thread in a write (HTTP/2 flow control), and a client stream whose client stops sending
blocks it in a read; neither has a timeout of its own. So:

- `StallWatchdog` cancels a call that has waited on its client (a write not taken, a message not sent) for
  longer than `timeout_s`; the call then ends, its thread returns to the pool, and its sequence is aborted.
  Every firing is logged and counted (`on_stall`).
- `CallSlots` bounds how many long calls (generations, uploads) run at once, below the size of the RPC
  thread pool, so health checks and short calls always find a thread whatever tenants do.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import structlog

from service.limits import LimitExceeded

log = structlog.get_logger(__name__)

T = TypeVar("T")
CALL_SLOT_RETRY_S = 1.0


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Wait:
    """One call under watch: `waiting()` / `done()` around every wait on the client."""

    __slots__ = ("_dog", "_key", "what", "since")

    def __init__(self, dog: StallWatchdog, key: int, what: str) -> None:
        self._dog, self._key, self.what = dog, key, what
        self.since: float | None = None

    def waiting(self) -> None:
        self.since = self._dog.clock()

    def done(self) -> None:
        self.since = None

    def close(self) -> None:
        self._dog._forget(self._key)

    def iterate(self, items: Iterator[T]) -> Iterator[T]:
        """`items` (a client's request stream), each read under watch."""
        while True:
            self.waiting()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.done()
            yield item


class StallWatchdog:
    def __init__(self, timeout_s: float, on_stall: Callable[[str], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, interval_s: float | None = None) -> None:
        """`on_stall(what)` runs once per cancelled call (what: "write" or "read")."""
        if not timeout_s > 0:
            raise ValueError(f"stream stall timeout {timeout_s!r} is invalid: must be > 0 seconds")
        self.timeout_s = timeout_s
        self.clock = clock
        self._on_stall = on_stall
        self._interval = interval_s if interval_s is not None else min(1.0, timeout_s / 4)
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[Wait, Cancellable]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, call: Cancellable, what: str) -> Wait:
        """Watch `call` (its ServicerContext); `what` names the wait ("write" for a response stream, "read"
        for a request stream). Close the returned Wait when the call's handler ends."""
        key = next(self._ids)
        wait = Wait(self, key, what)
        with self._lock:
            self._watched[key] = (wait, call)
        return wait

    def _forget(self, key: int) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def check(self) -> int:
        """Cancel every call stalled past the timeout; returns how many (the thread calls this)."""
        now = self.clock()
        with self._lock:
            stalled = [(k, w, c) for k, (w, c) in self._watched.items()
                       if w.since is not None and now - w.since > self.timeout_s]
            for k, _, _ in stalled:
                del self._watched[k]
        for _, wait, call in stalled:
            log.warning("client_stalled", waited_on=wait.what, timeout_s=self.timeout_s)
            call.cancel()
            if self._on_stall is not None:
                self._on_stall(wait.what)
        return len(stalled)

    @property
    def num_watched(self) -> int:
        with self._lock:
            return len(self._watched)

    def start(self) -> StallWatchdog:
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # never let the watchdog die
                log.exception("stall_watchdog_failed")


class CallSlots:
    """At most `capacity` long calls at once; past it, RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is invalid: at least one long call must be able to run")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._used = 0

    def acquire(self, what: str) -> Callable[[], None]:
        """Take a slot for a call of kind `what`; returns its release (idempotent)."""
        with self._lock:
            if self._used >= self.capacity:
                raise LimitExceeded(f"the server is running its limit of {self.capacity} generation and upload "
                                    f"calls at once, so this {what} was not started; retry after "
                                    f"{CALL_SLOT_RETRY_S:g} s", CALL_SLOT_RETRY_S)
            self._used += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._used -= 1

        return release

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._used
