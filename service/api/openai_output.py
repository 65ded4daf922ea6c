"""The engine's outputs -> OpenAI's response, chunk and error objects (the requests' side: `openai_schema`)."""

from __future__ import annotations

import re
from typing import Any

from service.api.convert import ANSWERED
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.openai_schema import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from service.engine.outputs import FinalOutput, ToolCall, ToolCallDelta
from service.engine.types import FinishReason

FINISH = {FinishReason.STOP: "stop", FinishReason.EOS: "stop", FinishReason.LENGTH: "length"}


def usage(finals: list[FinalOutput], n: int = 1) -> dict[str, Any]:
    """The call's usage over its choices (`n` per prompt, prompt by prompt): each prompt counted once (its first
    choice's), every choice's completion tokens."""
    firsts = [f.usage for f in finals[::n]]
    prompt = sum(u.input_tokens for u in firsts)
    completion = sum(f.usage.output_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_input_tokens for u in firsts)}}


def finish_reason(final: FinalOutput | None, calls: list[ToolCall] | None = None) -> str | None:
    if final is None:
        return None
    if calls and final.finish_reason in ANSWERED:
        return "tool_calls"
    return FINISH.get(final.finish_reason, "stop")


def tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` of a message."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` of a chunk's delta: a call's opening with its index, id, type and name, then pieces of
    its arguments with its index alone (one entry per call and chunk: a chunk's pieces of a call are joined)."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if d.id:
            out.append({"index": d.index, "id": d.id, "type": "function",
                        "function": {"name": d.name, "arguments": d.arguments}})
        elif out and out[-1]["index"] == d.index:
            out[-1]["function"]["arguments"] += d.arguments
        else:
            out.append({"index": d.index, "function": {"arguments": d.arguments}})
    return out


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "replace"))


def chat_logprobs(items: list[pb.TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": _bytes(a.token)}
                                          for a in t.top_logprobs]} for t in items]}


def completion_logprobs(items: list[pb.TokenLogprob], offset: int = 0, first: str | None = None) -> dict[str, Any]:
    """`first`: an echoed prompt's first token, which has no logprob (null, as OpenAI's), before `items`."""
    offsets = []
    if first is not None:
        offsets.append(offset)
        offset += len(first)
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    lead = [first] if first is not None else []
    none = [None] if first is not None else []
    return {"tokens": lead + [t.token for t in items], "token_logprobs": none + [t.logprob for t in items],
            "top_logprobs": none + [{a.token: a.logprob for a in t.top_logprobs} for t in items],
            "text_offset": offsets}


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; a 400's `param` is the request field its message begins with (None when it names
    none: a body that is not JSON, a bound over several fields)."""
    if param is None and status == 400:
        param = error_param(message)
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": code}}


_FIELD = re.compile(r"[a-z_]+")


def error_param(message: str) -> str | None:
    """The body field a refusal's message starts with (`temperature=-1.0 is invalid` -> temperature)."""
    m = _FIELD.match(message)
    return m.group(0) if m and m.group(0) in _FIELDS else None


_FIELDS = frozenset().union(*(m.model_fields for m in (ChatRequest, CompletionRequest, TokenizeRequest,
                                                     DetokenizeRequest)))
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled", 500: "internal_error",
               503: "service_unavailable", 504: "timeout"}
