"""uvicorn serving the OpenAI-compatible app (`openai_app`) on its own thread and event loop, in the process of
the gRPC server: one engine, one registry, one ledger behind both fronts.

Bounds: a request body is at most `max_body_bytes` (the gRPC message bound; 413 past it, told by its
Content-Length or counted as it arrives); at most `max_connections` calls at once (uvicorn answers 503 past
it); an idle keep-alive connection is closed after a few seconds. Before a 413 the rest of the body is read and
dropped (up to DRAIN_MAX_BYTES, within DRAIN_TIMEOUT_S): closing a socket with unread bytes resets the
connection, and the client would lose the answer that says why.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import structlog
import uvicorn

from service.api.http_errors import HttpError
from service.api.openai_output import error_body

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5
DRAIN_MAX_BYTES = 64 * 2**20  # a refused body up to this size is read to its end before the 413 goes out
DRAIN_TIMEOUT_S = 5.0


async def drain(receive: Any, seen: int, more: bool) -> None:
    """Read and drop what is left of a request body, while it stays under DRAIN_MAX_BYTES and DRAIN_TIMEOUT_S."""
    async def rest() -> None:
        nonlocal seen, more
        while more and seen <= DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    try:
        await asyncio.wait_for(rest(), DRAIN_TIMEOUT_S)
    except asyncio.TimeoutError:
        pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 (by its declared length before
    any of it is read, else as soon as the bytes received pass the limit)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            body = json.dumps(error_body(self._message(declared.decode("latin-1")[:20]), 413)).encode()
            if declared.isdigit() and int(declared) <= DRAIN_MAX_BYTES:
                await drain(receive, 0, True)
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    await drain(receive, seen, message.get("more_body", False))
                    raise HttpError(413, self._message(f"more than {self.limit}"))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: str) -> str:
        return (f"the request body has {size} bytes; at most {self.limit} are allowed (server.max_message_mib "
                f"sets it)")


class HttpServer:
    """uvicorn on a thread. `start()` returns once it listens (the port bound, also for port 0)."""

    def __init__(self, app: Any, host: str, port: int, *, max_body_bytes: int, max_connections: int,
                 tls: dict[str, Any] | None = None) -> None:
        self.host, self.requested_port = host, port
        self.config = uvicorn.Config(BodyLimit(app, max_body_bytes), log_level="warning", access_log=False,
                                     lifespan="off", limit_concurrency=max_connections,
                                     timeout_keep_alive=KEEP_ALIVE_S, **(tls or {}))
        self.server = uvicorn.Server(self.config)
        self.port = 0
        self._thread: threading.Thread | None = None

    def start(self) -> HttpServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot serve HTTP on {self.host}:{self.requested_port}: {e.strerror or e} (choose "
                          "another --http-port, or 0 for any free one)") from None
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start (see the log)")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and the idle connections; calls still running get `timeout` to finish."""
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(5)
        self._thread = None
