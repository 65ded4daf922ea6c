"""A small Python client for loraserve's InferenceService.

    with LoraServeClient("127.0.0.1:50051") as c:
        print(c.generate("What is the capital of France?", chat=True, temperature=0).text)
        for delta in c.generate_stream("Tell me a story", chat=True):
            print(delta, end="", flush=True)

Errors arrive as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc

_ROLES = {"system": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER, "assistant": pb.CHAT_ROLE_ASSISTANT,
          "tool": pb.CHAT_ROLE_TOOL}
_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "min_tokens", "ignore_eos", "logprobs")


def chat_messages(messages: Sequence[dict[str, str]]) -> pb.ChatMessages:
    """[{"role": "user", "content": "..."}, ...] -> ChatMessages."""
    out = pb.ChatMessages()
    for m in messages:
        if m["role"] not in _ROLES:
            raise ValueError(f"role {m['role']!r} is invalid: use one of {', '.join(_ROLES)}")
        out.messages.add(role=_ROLES[m["role"]], content=m["content"])
    return out


def build_request(cls: type, prompt: str | None = None, *, chat: bool = False, system: str | None = None,
                  messages: Sequence[dict[str, str]] | None = None, token_ids: Sequence[int] | None = None,
                  adapter: str = "", stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                  client_request_id: str = "", priority: int = 0, **sampling: Any) -> Any:
    """A GenerateRequest / GenerateStreamRequest. Give exactly one of `prompt` (raw text; with chat=True
    a user message, after an optional system message), `messages` or `token_ids`."""
    unknown = set(sampling) - set(_SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
    req = cls(adapter=adapter, stop=list(stop), stop_token_ids=list(stop_token_ids),
              client_request_id=client_request_id, priority=priority)
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    if prompt is not None and chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if messages is not None:
        req.messages.CopyFrom(chat_messages(messages))
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.text = prompt
    for name, value in sampling.items():
        if value is not None:
            setattr(req.sampling, name, value)
    return req


class LoraServeClient:
    def __init__(self, target: str, *, timeout: float | None = None, channel: grpc.Channel | None = None) -> None:
        """`timeout`: the default deadline of every call, in seconds (None: no deadline)."""
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> pb.GenerateResponse:
        """The whole completion. kwargs: see `build_request` (chat, system, messages, token_ids, adapter,
        stop, max_tokens, temperature, top_p, seed, ...)."""
        req = build_request(pb.GenerateRequest, prompt, **kwargs)
        return self._stub.Generate(req, timeout=timeout if timeout is not None else self.timeout)

    def generate_stream_messages(self, prompt: str | None = None, *, timeout: float | None = None,
                                 **kwargs: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Every streamed message (the last one carries finish reason, usage and timings)."""
        req = build_request(pb.GenerateStreamRequest, prompt, **kwargs)
        call = self._stub.GenerateStream(req, timeout=timeout if timeout is not None else self.timeout)
        try:
            yield from call
        finally:
            call.cancel()  # a consumer that stops early stops generation on the server too

    def generate_stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[str]:
        """The completion's text deltas as they are generated."""
        for msg in self.generate_stream_messages(prompt, **kwargs):
            if msg.text:
                yield msg.text

    def tokenize(self, text: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                 timeout: float | None = None) -> list[int]:
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of text or messages")
        req = pb.TokenizeRequest(text=text) if text is not None else pb.TokenizeRequest(messages=chat_messages(messages))
        return list(self._stub.Tokenize(req, timeout=timeout if timeout is not None else self.timeout).token_ids)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / SERVICE_UNKNOWN of the server (or of one service)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoraServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
