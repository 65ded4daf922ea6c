"""Exceptions -> HTTP statuses in OpenAI's error shape, through the same table that gives gRPC its status codes
(`service.api.errors.status_for`), so both fronts refuse the same input for the same reason and words."""

from __future__ import annotations

import math
import re

import grpc
import structlog

from service.api.errors import (
    QUEUE_FULL_RETRY_S,
    AdapterUnavailable,
    ErrorLogs,
    TooLarge,
    status_for,
)
from service.engine.scheduler import QueueFullError
from service.limits import LimitExceeded

log = structlog.get_logger("service.api")

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,  # the client went away: nobody reads it, but the log says why
    grpc.StatusCode.INTERNAL: 500,
}


_PROMPT_OF_SEVERAL = re.compile(r"(prompt\[\d+\]: )?(.*)", re.DOTALL)
_BODY_NAMES = (("token_ids.ids", "prompt"), ("text ", "prompt "), ("adapter is invalid", "model is invalid"))
# The tools' fields as the proto names them -> as OpenAI's body does
_TOOL_NAMES = ((re.compile(r"messages\.tools\[(\d+)\]\.(name|parameters)"), r"tools[\1].function.\2"),
               (re.compile(r"messages\.tool_choice\.function"), "tool_choice.function.name"),
               (re.compile(r"messages\.(tools|tool_choice|continue_final_message)\b"), r"\1"),
               (re.compile(r"(tool_calls\[\d+\])\.(name|arguments)"), r"\1.function.\2"),
               (re.compile(r"set tool_choice to TOOL_CHOICE_MODE_NONE"), 'set tool_choice to "none"'))


class HttpError(Exception):
    """A refusal of the HTTP front itself (a body that is not JSON, too large, a path that does not exist)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def http_error(exc: BaseException) -> tuple[int, str, str | None, dict[str, str]]:
    """(status, message, OpenAI error code, headers) for `exc`."""
    if isinstance(exc, HttpError):
        return exc.status, str(exc), exc.code, {}
    code, message = status_for(exc)
    status = HTTP_STATUS.get(code, 500)
    headers: dict[str, str] = {}
    error_code = code.name.lower()
    if isinstance(exc, TooLarge):
        status = 413
    elif isinstance(exc, AdapterUnavailable):
        status = 503  # the adapter exists, its files cannot be loaded now: retry later
    elif isinstance(exc, (QueueFullError, LimitExceeded)):
        retry = QUEUE_FULL_RETRY_S if isinstance(exc, QueueFullError) else getattr(exc, "retry_after_s", None)
        if retry is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry)))  # whole seconds, as HTTP has it
    if status == 404:
        error_code = "model_not_found"
    if status == 400:
        # The shared path names fields as the proto has them; OpenAI's body has its own names (sampling fields at
        # the top level, the prompt in `prompt`, the adapter in `model`).
        message = message.replace("sampling.", "").replace("messages.messages", "messages")
        for pattern, body_name in _TOOL_NAMES:
            message = pattern.sub(body_name, message)
        which, rest = _PROMPT_OF_SEVERAL.match(message).groups()  # "prompt[1]: " when the body had several
        for proto, body in _BODY_NAMES:
            if rest.startswith(proto):
                if which and body.startswith("prompt"):  # the prompt's index, then the token's: prompt[1][0]=900
                    body, which = which[:-2] + body[len("prompt"):], None
                message = (which or "") + body + rest[len(proto):]
                break
    return status, message, error_code, headers


def log_refusal(logs: ErrorLogs, exc: BaseException, status: int, message: str, path: str, ms: float) -> None:
    """Refusals at the same bounded rate as gRPC's; a 500 that is not the engine's own failure with its
    traceback."""
    if status == 500:
        logs.failures.emit("error", "http_failed", "500", path=path, status=status, ms=ms, exc_info=exc)
    else:
        logs.refusals.emit("info", "http_refused", str(status), path=path, status=status, message=message, ms=ms)
