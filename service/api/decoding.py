"""Request messages that do not parse are bad input, refused with INVALID_ARGUMENT like any other.

grpcio parses a request before any interceptor sees it and answers a parse failure with INTERNAL "Exception
deserializing request!", logging a traceback each time. `DecodeInterceptor` gives every loraserve RPC a
deserializer that never raises: bytes that do not parse become an `Undecodable` value, which the wrapped
behaviour turns into `UndecodableRequest` (a ValueError, so INVALID_ARGUMENT) when the servicer would get it:
at once for a unary request, at that message for a request stream (an upload that breaks in the middle is
refused there and keeps nothing).

It is the innermost interceptor, so authentication runs first: a caller without valid credentials is told
UNAUTHENTICATED whatever bytes it sent, and never sees the parser's words. Unlike the other interceptors it
also covers grpc.health.v1 and reflection, which need no credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from service.api.handlers import OWN_PREFIX, rewrap

MAX_REASON_CHARS = 200


class UndecodableRequest(ValueError):
    """A request message is not a valid serialization of its type (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer returns instead of raising: the bytes did not parse as `type_name`."""

    type_name: str
    reason: str

    def error(self) -> UndecodableRequest:
        return UndecodableRequest(f"the request is not a valid {self.type_name} message: {self.reason}")


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    cls = getattr(deserializer, "__self__", None)  # generated code passes Message.FromString
    desc = getattr(cls, "DESCRIPTOR", None)
    return getattr(desc, "full_name", None) or "request"


def _reason(exc: Exception, type_name: str) -> str:
    # upb says "Error parsing message with type 'loraserve.v1.X': Wire format was corrupt": keep the last part.
    text = str(exc).rpartition(": ")[2] if type_name in str(exc) else str(exc)
    text = " ".join(text.split())[:MAX_REASON_CHARS] or type(exc).__name__
    return text[0].lower() + text[1:]


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an `Undecodable` where it would raise. Never returns None (grpc's sign of a
    failed parse)."""
    if deserializer is None:
        return None
    type_name = _type_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, and whatever else a parser raises on hostile bytes
            return Undecodable(type_name, _reason(e, type_name))

    return deserialize


def _checked(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _checked(request)


def _passing(check: Callable[[Any], Any]) -> Callable:
    """For loraserve's RPCs: UndecodableRequest propagates to the error interceptor around them."""
    def wrap(behavior: Callable, method: str) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            return behavior(check(request), context)
        return handler
    return wrap


def _answering(check: Callable[[Any], Any]) -> Callable:
    """For health and reflection (no error interceptor around them): INVALID_ARGUMENT answered here."""
    def wrap(behavior: Callable, method: str) -> Callable:
        # *callback: grpc's send_response_callback for a non-blocking servicer (health Watch), which must stay
        # non-blocking, or every Watch would hold one of the server's RPC threads for as long as it lasts.
        def handler(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
            try:
                return behavior(check(request), context, *callback)
            except UndecodableRequest as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for hint in ("experimental_non_blocking", "experimental_thread_pool"):
            if hasattr(behavior, hint):
                setattr(handler, hint, getattr(behavior, hint))
        return handler
    return wrap


def _answering_stream(behavior: Callable, method: str) -> Callable:
    """Reflection: a request stream answered by a stream, so the error surfaces while the answer is iterated."""
    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(_checked_stream(requests), context)
        except UndecodableRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return handler


class DecodeInterceptor(grpc.ServerInterceptor):
    """Undecodable request messages -> UndecodableRequest, raised where the servicer would read them. Health and
    reflection too (no key is needed there, so anyone could make grpc log a traceback per call): their
    servicers are not ours and no error interceptor runs around them, so INVALID_ARGUMENT is answered here."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        check = _checked_stream if handler.request_streaming else _checked
        if handler_call_details.method.startswith(OWN_PREFIX):
            unary = stream = _passing(check)
        else:
            unary = _answering(check)
            stream = _answering_stream if handler.request_streaming else unary
        return rewrap(handler, handler_call_details.method, unary, stream, every_service=True,
                      request_deserializer=tolerant(handler.request_deserializer))
