"""Rebuild a gRPC method handler of any of the four kinds around a wrapped behaviour (what every server
interceptor of ours needs). Only loraserve's own RPCs are wrapped unless asked: health and reflection need no
authentication and map no exceptions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

OWN_PREFIX = "/loraserve."

Wrapper = Callable[[Callable, str], Callable]  # (behaviour, method) -> behaviour


def rewrap(handler: grpc.RpcMethodHandler | None, method: str, unary: Wrapper, stream: Wrapper, *,
           request_deserializer: Callable | None = None, every_service: bool = False) -> Any:
    """`handler` with its behaviour wrapped: `unary` for unary-response kinds, `stream` for streaming ones; and
    with `request_deserializer` in place of its own, if given. Only loraserve's RPCs unless `every_service`."""
    if handler is None or not (every_service or method.startswith(OWN_PREFIX)):
        return handler
    kinds = (
        ("unary_unary", unary, grpc.unary_unary_rpc_method_handler),
        ("stream_unary", unary, grpc.stream_unary_rpc_method_handler),
        ("unary_stream", stream, grpc.unary_stream_rpc_method_handler),
        ("stream_stream", stream, grpc.stream_stream_rpc_method_handler),
    )
    for attr, wrap, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(wrap(behavior, method),
                        request_deserializer=request_deserializer or handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
