"""One server interceptor: a request id and log context per RPC, and exceptions -> gRPC status codes.

Servicers raise plain exceptions (ValueError for bad input, the registry's errors, QueueFullError, ...)
and never pick status codes themselves. Bad input must never surface as UNKNOWN or INTERNAL; anything
unexpected becomes INTERNAL with a generic message and the request id, and is logged with its traceback.
Every status message is capped at 1 KiB, and refusals and failures are logged at a bounded rate (`ErrorLogs`).
"""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from adapters.lifecycle import PinLimitReached
from adapters.registry_types import (
    AdapterExists,
    AdapterInUse,
    AdapterNotFound,
    AdapterPermissionDenied,
    DatabaseUnavailable,
    VersionFilesMissing,
    VersionIsCurrent,
)
from adapters.store import NotInStore, StoreError
from service.api.auth import PermissionDenied, Unauthenticated, set_current_tenant
from service.api.handlers import rewrap
from service.api.log_budget import LogBudget
from service.engine.scheduler import QueueFullError
from service.limits import LimitExceeded
from service.loop import LoopClosed

log = structlog.get_logger("service.api")

QUEUE_FULL_RETRY_S = 0.5  # RetryInfo hint: about the time a short request spends in the batch
MAX_STATUS_MESSAGE_BYTES = 1024  # far below gRPC's 16 KiB of trailing metadata, even percent-encoded
REFUSALS_PER_S, REFUSALS_BURST = 20.0, 100  # rpc_refused / rpc_stream_ended lines: clients cause them
FAILURES_PER_S, FAILURES_BURST = 5.0, 20  # rpc_failed lines (with a traceback): a bug, but maybe one a client triggers

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("loraserve_request_id", default=None)


class DeadlineExceeded(Exception):
    """The client's deadline passed before the request finished (its sequence was aborted)."""


class RequestCancelled(Exception):
    """The client cancelled the call (its sequence was aborted)."""


class RequestFailed(Exception):
    """The engine failed the request; the message is the engine's, written for the caller."""


class TooLarge(Exception):
    """More bytes than the limit allows (an upload): RESOURCE_EXHAUSTED, and retrying will not help."""


class AdapterUnavailable(Exception):
    """The adapter exists but cannot be served now (its load failed): FAILED_PRECONDITION."""


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:20]


def set_request_id(rid: str | None) -> None:
    """Make `rid` this call's request id (the HTTP front's calls; gRPC's get theirs from the interceptor)."""
    _request_id.set(rid)


def current_request_id() -> str:
    """The id the interceptor gave this RPC (a fresh one outside an intercepted RPC)."""
    rid = _request_id.get()
    if rid is None:
        rid = new_request_id()
        _request_id.set(rid)
    return rid


# Most specific first: several of these also derive from ValueError / LookupError.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PinLimitReached, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdapterUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),  # the control-plane database is down: retry
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterExists, grpc.StatusCode.ALREADY_EXISTS),
    (AdapterPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (AdapterInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (VersionIsCurrent, grpc.StatusCode.FAILED_PRECONDITION),
    (VersionFilesMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LoopClosed, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (RequestFailed, grpc.StatusCode.INTERNAL),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # incl. the registry's InvalidRegistryArgument
    (NotInStore, grpc.StatusCode.FAILED_PRECONDITION),  # registered, but its files are gone from the store
    (StoreError, grpc.StatusCode.UNAVAILABLE),  # the adapter store (e.g. the bucket) is unreachable
)


def cap_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message`, cut to `limit` bytes of UTF-8 with its full length appended: gRPC sends it in trailing
    metadata (16 KiB at most, percent-encoded), and an overflow reaches the client as RESOURCE_EXHAUSTED
    "Stream removed" instead of the status meant."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return f"{data[:limit].decode('utf-8', 'ignore')}... ({len(message)} chars)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message an exception becomes (the message capped by `cap_message`)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, cap_message(str(exc) or cls.__name__)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {current_request_id()}); it was logged"


class ErrorLogs:
    """Where refusals and failures are logged, each under its own rate bound (`LogBudget`): a client that sends
    bad input in a loop gets every answer, but the log gets a bounded number of lines and a summary."""

    def __init__(self, refusals: LogBudget | None = None, failures: LogBudget | None = None) -> None:
        self.refusals = refusals or LogBudget(log, "rpc_refusals_suppressed", "refusals",
                                              rate_per_s=REFUSALS_PER_S, burst=REFUSALS_BURST)
        self.failures = failures or LogBudget(log, "rpc_failures_suppressed", "failures",
                                              rate_per_s=FAILURES_PER_S, burst=FAILURES_BURST)

    def close(self) -> None:
        self.refusals.close()
        self.failures.close()


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str, t0: float, logs: ErrorLogs) -> None:
    ms = round((time.perf_counter() - t0) * 1000, 1)
    if isinstance(exc, grpc.RpcError):  # the client's request stream broke (cancelled, too large): nothing to say
        logs.refusals.emit("info", "rpc_stream_ended", "stream_ended", method=method, ms=ms)
        raise exc
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, RequestFailed):
        logs.failures.emit("error", "rpc_failed", code.name, method=method, code=code.name, ms=ms, exc_info=exc)
    else:
        logs.refusals.emit("info", "rpc_refused", code.name, method=method, code=code.name, message=message, ms=ms)
    retry_s = QUEUE_FULL_RETRY_S if isinstance(exc, QueueFullError) else getattr(exc, "retry_after_s", None)
    if isinstance(exc, (QueueFullError, LimitExceeded)) and retry_s is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(retry_s, 0.0) * 1e9))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        if isinstance(exc, QueueFullError):
            message = f"{message} (retry after {QUEUE_FULL_RETRY_S} s)"
        status = status_pb2.Status(code=code.value[0], message=message, details=[retry])
        context.abort_with_status(rpc_status.to_status(status))
    context.abort(code, message)


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after setting the code: keep that code, don't remap it.
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code is not grpc.StatusCode.OK


def _begin(method: str) -> float:
    structlog.contextvars.clear_contextvars()  # worker threads are reused: nothing of the last RPC leaks
    rid = new_request_id()
    structlog.contextvars.bind_contextvars(request_id=rid, method=method)
    _request_id.set(rid)
    set_current_tenant(None)
    return time.perf_counter()


def _end() -> None:
    structlog.contextvars.clear_contextvars()
    _request_id.set(None)
    set_current_tenant(None)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every loraserve RPC handler (all four kinds): a request id and log context per call, and every
    exception mapped to its status. The outermost interceptor: authentication runs inside it."""

    def __init__(self, logs: ErrorLogs | None = None) -> None:
        self.logs = logs or ErrorLogs()

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = _begin(method)
            try:
                return behavior(request, context)
            except Exception as e:
                if _already_aborted(context):
                    raise
                _abort(context, e, method, t0, self.logs)
            finally:
                _end()
        return handler

    def _stream(self, behavior: Callable, method: str) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            t0 = _begin(method)
            try:
                yield from behavior(request, context)
            except Exception as e:
                if _already_aborted(context):
                    raise
                _abort(context, e, method, t0, self.logs)
            finally:
                _end()
        return handler

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return rewrap(continuation(handler_call_details), handler_call_details.method, self._unary, self._stream)
