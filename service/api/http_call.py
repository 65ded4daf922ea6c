"""One generation call of the HTTP front, on the event loop: its deadline and cancellation (`HttpCall`, the
`CallContext` the request path takes) and its outputs followed without a thread of its own (`follow`)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import structlog
from starlette.requests import Request

from service.api.errors import DeadlineExceeded, RequestCancelled
from service.api.generation import POLL_S, RECORD_WAIT_S, Generation, GenerationPath, abandon, recorded_future
from service.engine.outputs import RequestOutput

log = structlog.get_logger("service.api")

TIMEOUT_HEADER = "x-request-timeout"  # seconds: the HTTP call's deadline (gRPC has its own); 504 past it
MAX_TIMEOUT_S = 86400.0


class HttpCall:
    """A `CallContext` for one HTTP call: its deadline from the timeout header, whether the client is still
    there, the callbacks to run when it ends, and `cancel` (the stall watchdog's, from another thread)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.active = True
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self.task: asyncio.Task | None = None  # the task writing the response, cancelled by `cancel`

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def cancel(self) -> None:
        self.active = False
        task = self.task
        if task is not None:
            self._loop.call_soon_threadsafe(task.cancel)


def call_timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"the {TIMEOUT_HEADER} header is {raw[:40]!r}: give the call's timeout in seconds, a "
                         f"number in (0, {MAX_TIMEOUT_S:g}]")
    return value


async def follow(path: GenerationPath, gen: Generation, call: HttpCall,
                 request: Request | None = None) -> AsyncIterator[RequestOutput]:
    """The request's outputs up to the final one, or the exception its end maps to, on the event loop: the
    engine loop sets `ready` after queueing an output. `request`: polled for a disconnect every POLL_S (a
    stream's disconnect cancels this generator instead)."""
    handle = gen.handle
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    handle.on_output = lambda: loop.call_soon_threadsafe(ready.set)
    checked = time.monotonic()
    try:
        while True:
            try:
                out = handle.get_nowait()
            except queue.Empty:
                remaining = call.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the deadline passed before the request finished; it was stopped") from None
                ready.clear()
                try:  # an output queued between the first look and clear() must not wait for the next one
                    out = handle.get_nowait()
                except queue.Empty:
                    # A timer rather than wait_for: no task per wait (one per output and stream, 64 streams).
                    timer = loop.call_later(POLL_S if remaining is None else min(remaining, POLL_S), ready.set)
                    try:
                        await ready.wait()
                    finally:
                        timer.cancel()
                    if request is not None and time.monotonic() - checked >= POLL_S:
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            call.active = False
                            raise RequestCancelled("the client disconnected") from None
                    continue
            if out.final is not None:
                path.log_finished(out.final)
                await _recorded(handle)
                path.check_final(handle, out.final, call)
            yield out
            if out.final is not None:
                return
    finally:
        handle.on_output = None
        abandon(handle, call)


async def _recorded(handle: Any) -> None:
    fut = recorded_future(handle)
    if fut is None:
        return
    try:
        # shielded: a cancelled waiter (a client gone, a choice's stream stopped) must not cancel the writer's future
        if not await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), RECORD_WAIT_S):
            log.error("usage_not_recorded_before_response")
    except (TimeoutError, FutureTimeout):
        log.error("usage_record_slow", waited_s=RECORD_WAIT_S)
