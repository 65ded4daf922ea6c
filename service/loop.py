"""EngineLoop: the one thread that drives the single-threaded `LLMEngine` for a concurrent server.

Every engine call happens on the loop thread. Other threads talk to it through one inbox
(submit / abort / call); each request's outputs come back through its own `queue.Queue`, read by the
RPC thread that owns the `RequestHandle`. The loop blocks on the inbox when there is no work, so an
idle server uses no CPU; with work that cannot be scheduled yet (its adapter is loading) it waits
~1 ms per turn instead of spinning.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from service.engine.engine import LLMEngine
from service.engine.outputs import ErrorKind, FinalOutput, RequestError, RequestOutput
from service.engine.request import RequestSpec
from service.engine.types import FinishReason
from service.request_handle import RequestHandle

log = structlog.get_logger(__name__)

T = TypeVar("T")

STALL_WAIT_S = 0.001  # work exists but nothing was schedulable (adapter loading): re-check after this
UNHEALTHY_AFTER_FAILURES = 3  # consecutive failed steps before the loop reports itself unhealthy
MAX_FAILURE_BACKOFF_S = 0.5


class LoopClosed(Exception):
    """The loop is draining or stopped and takes no new requests (UNAVAILABLE: retry elsewhere)."""


@dataclass
class _Submit:
    spec: RequestSpec
    future: Future[RequestHandle]
    context: Any = None
    stream_interval: int | None = 1
    # When the submitter handed it over: the request's arrival. The loop takes requests in only between steps,
    # so its timings (queue, TTFT) then include the wait for the step in progress, as its client sees it.
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass
class _Abort:
    request_id: str
    by_drain: bool = False


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: Future[Any]


_STOP = object()
_WAKE = object()  # wakes a blocked loop so it sees a changed hold


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine-loop",
                 on_health: Callable[[bool], None] | None = None,
                 on_finished: Callable[[RequestHandle, FinalOutput], None] | None = None,
                 on_step: Callable[[LLMEngine, float], None] | None = None) -> None:
        """`on_finished(handle, final)` runs on the loop thread exactly once per request that reached
        the engine, however it ended (finished, cancelled, failed, drained): usage accounting hangs off it
        and must be quick. `on_step(engine, seconds)` runs after every model step (metrics)."""
        self.engine = engine  # touch only from the loop thread (use `call`)
        self._on_finished = on_finished
        self._on_step = on_step
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}  # loop thread only
        self._accepting = True
        self._accept_lock = threading.Lock()  # orders submit() against drain()/stop(); guards _submits
        self._submits = 0  # submitted, not yet added to (or refused by) the engine
        self._idle = threading.Event()  # set while no request is unfinished or on its way in
        self._idle.set()
        self._failures = 0
        self._last_steps = 0
        self._crashed = False
        self._integrity_ok = True
        self._on_health = on_health
        self._last_health: bool | None = None
        self._hold_cond = threading.Condition()
        self._steps_before_hold: int | None = None  # None: not holding; 0: held (see hold())
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self._thread.start()
        self._report_health()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def alive(self) -> bool:
        """The loop thread runs (it may still be failing steps: see `healthy`)."""
        return self._thread.is_alive() and not self._crashed

    @property
    def healthy(self) -> bool:
        """The thread runs, steps are not failing one after another, and the KV pool checked out when idle."""
        return (self._thread.is_alive() and not self._crashed and self._failures < UNHEALTHY_AFTER_FAILURES
                and self._integrity_ok)

    def drain(self, grace_s: float) -> bool:
        """Stop accepting, let unfinished requests run for up to `grace_s`, then abort the rest.
        True if everything finished within the grace period."""
        with self._accept_lock:
            self._accepting = False
        finished = self._idle.wait(timeout=max(grace_s, 0.0))
        if not finished:
            self._post(_Abort("", by_drain=True))  # "" = every unfinished request
            self._idle.wait(timeout=5.0)
        log.info("engine_drained", finished_in_grace=finished)
        return finished

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and end the thread."""
        with self._accept_lock:
            self._accepting = False
        if self._thread.is_alive():
            self._post(_Abort("", by_drain=True))
            self._post(_STOP)
            self._thread.join(timeout)

    # ---- requests (any thread) ----------------------------------------------------------
    def submit(self, spec: RequestSpec, context: Any = None, timeout: float | None = 30.0, *,
               stream_interval: int | None = 1) -> RequestHandle:
        """Hand a request to the engine and wait until it is queued. Raises what `add_request` raises
        (ValueError, QueueFullError) on this thread, or LoopClosed while draining. `context` is the
        submitter's own record, handed back to `on_finished`; `stream_interval`: see `RequestHandle`."""
        if stream_interval is not None and stream_interval < 1:
            raise ValueError(f"stream_interval={stream_interval} is invalid: must be >= 1, or None for the final "
                             "output alone")
        future: Future[RequestHandle] = Future()
        with self._accept_lock:
            if not self._accepting:
                raise LoopClosed("the server is shutting down and takes no new requests; retry on another replica")
            if not self._thread.is_alive():
                raise LoopClosed("the engine loop is not running")
            self._submits += 1
            self._idle.clear()  # before the loop can see the request, so a concurrent drain() waits for it
            self._post(_Submit(spec, future, context, stream_interval))
        try:
            return future.result(timeout)
        except FutureTimeout:
            if future.cancel():  # the loop never picked it up: nothing to undo
                raise LoopClosed(f"the engine loop did not take the request within {timeout} s") from None
            return future.result()

    def call(self, fn: Callable[[LLMEngine], T], timeout: float | None = 30.0) -> T:
        """Run `fn(engine)` on the loop thread between steps (stats, integrity checks) and return its result."""
        future: Future[T] = Future()
        self._post(_Call(fn, future))
        return future.result(timeout)

    def _post(self, command: Any) -> None:
        self._inbox.put(command)

    # ---- holding (any thread) -------------------------------------------------------------
    def hold(self, after_steps: int = 0) -> None:
        """Run no model step after `after_steps` more, until `resume()`: requests stay queued or running
        where they are, while submits, aborts (their final outputs included) and calls are still served.
        For maintenance, and for tests that need a request to stay in flight while they act."""
        with self._hold_cond:
            self._steps_before_hold = after_steps
        self._post(_WAKE)

    def resume(self) -> None:
        with self._hold_cond:
            self._steps_before_hold = None
        self._post(_WAKE)

    def wait_held(self, timeout: float = 10.0) -> bool:
        """Until the hold has taken effect (every step it allowed has run)."""
        with self._hold_cond:
            return self._hold_cond.wait_for(lambda: self._steps_before_hold == 0, timeout)

    def _held(self) -> bool:
        return self._steps_before_hold == 0

    def _count_step_against_hold(self) -> None:
        if not self._steps_before_hold:  # not holding (the common case): no lock on the step path
            return
        with self._hold_cond:
            if self._steps_before_hold:
                self._steps_before_hold -= 1
                if not self._steps_before_hold:
                    self._hold_cond.notify_all()

    # ---- the loop thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.exception("engine_loop_crashed")
            self._crashed = True
            self._fail_all("internal error: the engine loop stopped")
        finally:
            self._refuse_pending()
            self._report_health()

    def _refuse_pending(self) -> None:
        """The thread is ending: answer whatever is still in the inbox now, instead of letting submitters and
        callers wait out their timeouts (and a drain wait for submits that will never be added)."""
        with self._accept_lock:
            self._accepting = False
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit):
                if command.future.set_running_or_notify_cancel():
                    command.future.set_exception(LoopClosed("the engine loop stopped; retry on another replica"))
                with self._accept_lock:
                    self._submits -= 1
                    if not self._submits:
                        self._idle.set()
            elif isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(LoopClosed("the engine loop stopped"))

    def _serve(self) -> None:
        engine = self.engine
        while True:
            busy = engine.has_unfinished()
            if not busy:
                self._became_idle()
            held = busy and self._held()
            try:
                # Idle or held: block until a command arrives. Busy: take what is there without waiting.
                command = self._inbox.get(block=not busy or held)
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    self._fail_all("the engine loop stopped")
                    return
                self._handle(command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._held():
                self._deliver(engine.take_pending())  # aborts end at once, held or not
                continue
            if engine.has_unfinished() and not self._step():
                try:  # nothing could run (adapter loads): wait a little, but wake for new commands
                    command = self._inbox.get(timeout=STALL_WAIT_S)
                except queue.Empty:
                    continue
                if command is _STOP:
                    self._fail_all("the engine loop stopped")
                    return
                self._handle(command)

    def _handle(self, command: Any) -> None:
        if command is _WAKE:
            return
        if isinstance(command, _Submit):
            self._add(command)
        elif isinstance(command, _Abort):
            targets = list(self._handles) if command.request_id == "" else [command.request_id]
            for rid in targets:
                handle = self._handles.get(rid)
                if handle is not None and command.by_drain:
                    handle.stopped_by_drain = True
                self.engine.abort_request(rid)
        elif isinstance(command, _Call):
            if command.future.set_running_or_notify_cancel():
                try:
                    command.future.set_result(command.fn(self.engine))
                except BaseException as e:  # handed to the caller, who decides
                    command.future.set_exception(e)

    def _add(self, command: _Submit) -> None:
        try:
            self._add_to_engine(command)
        finally:
            with self._accept_lock:
                self._submits -= 1

    def _add_to_engine(self, command: _Submit) -> None:
        if not command.future.set_running_or_notify_cancel():
            return  # the submitter gave up waiting
        try:
            self.engine.add_request(command.spec, arrival_time=command.submitted_at)
        except BaseException as e:  # ValueError / QueueFullError / TypeError go back to the submitter
            command.future.set_exception(e)
            return
        handle = RequestHandle(command.spec, command.context, command.stream_interval,
                               abort=lambda rid: self._post(_Abort(rid)))
        self._handles[handle.request_id] = handle
        command.future.set_result(handle)

    def _step(self) -> bool:
        """One engine step, outputs delivered. False when it made no progress."""
        engine = self.engine
        t0 = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception:
            self._failures += 1
            log.exception("engine_step_failed", unfinished=len(self._handles), consecutive=self._failures)
            self._fail_all("internal error: the engine step failed")
            self._report_health()
            # A broken engine fails every step: back off so it does not flood the log and burn a core.
            time.sleep(min(STALL_WAIT_S * 2 ** self._failures, MAX_FAILURE_BACKOFF_S))
            return True
        # Outputs without a model step are possible (aborts), and a model step without outputs (a chunk
        # of a long prompt): progress is whether the engine ran the model.
        steps = engine.num_steps
        progressed, self._last_steps = steps != self._last_steps, steps
        if progressed:
            self._count_step_against_hold()
        if self._failures:
            self._failures = 0
            self._report_health()
        if self._on_step is not None:
            self._hook(self._on_step, engine, time.perf_counter() - t0)
        self._deliver(outputs)
        return progressed or bool(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue  # e.g. a request the engine ended while the loop was failing everything
            if out.final is not None:
                del self._handles[out.request_id]
                if self._on_finished is not None:
                    self._hook(self._on_finished, handle, out.final)
            ready = handle._gather(out)
            if not ready:
                continue  # gathered: queued with a later output
            for piece in ready:
                handle._outputs.put(piece)
            if handle.on_output is not None:
                self._hook(handle.on_output)

    @staticmethod
    def _hook(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # accounting or metrics must never take the loop down
            log.exception("engine_loop_hook_failed", hook=getattr(fn, "__name__", repr(fn)))

    def _fail_all(self, error: str) -> None:
        """End every unfinished request with ERROR (after a step blew up, or at stop), or CANCELLED for those
        the drain stopped."""
        for rid, handle in list(self._handles.items()):
            failure = None if handle.stopped_by_drain else RequestError(ErrorKind.INTERNAL, error)
            reason = FinishReason.CANCELLED if handle.stopped_by_drain else FinishReason.ERROR
            try:
                self.engine.abort_request(rid, reason, failure)
            except Exception:
                log.exception("abort_after_failure_failed", request_id=rid)
        self._deliver(self.engine.take_pending())
        lost = [RequestOutput(rid, [], "", final=FinalOutput.lost(handle.spec, RequestError(ErrorKind.INTERNAL, error)))
                for rid, handle in self._handles.items()]  # the engine could not end these: end them here
        if lost:
            log.error("requests_lost_by_engine", request_ids=[o.request_id for o in lost])
            self._deliver(lost)

    def _became_idle(self) -> None:
        with self._accept_lock:
            if self._idle.is_set() or self._submits:
                return  # already checked, or a request is on its way in (it is in the inbox)
        try:
            self.engine.check_idle_integrity()
            ok = True
        except AssertionError:
            log.exception("kv_integrity_check_failed")
            ok = False
        if ok != self._integrity_ok:
            self._integrity_ok = ok
            self._report_health()
        with self._accept_lock:
            if not self._submits:
                self._idle.set()

    def _report_health(self) -> None:
        healthy = self.healthy
        if healthy != self._last_health:
            self._last_health = healthy
            if self._on_health is not None:
                self._on_health(healthy)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout` passes (for shutdown paths and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
