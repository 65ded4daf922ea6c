"""A small Python client for loraserve: inference, adapters and usage.

    with LoraServeClient("127.0.0.1:50051", api_key="...") as c:
        print(c.generate("What is the capital of France?", chat=True, temperature=0).text)
        for delta in c.generate_stream("Tell me a story", chat=True, adapter="allcaps"):
            print(delta, end="", flush=True)
        c.upload_adapter("./my-adapter", name="support-bot")   # a PEFT save_pretrained directory
        print(c.get_usage())

Errors arrive as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.api.gen.loraserve.v1 import adapters_pb2_grpc as apb_grpc
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from service.api.gen.loraserve.v1 import usage_pb2 as upb
from service.api.gen.loraserve.v1 import usage_pb2_grpc as upb_grpc

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
UPLOAD_CHUNK_BYTES = 1 << 20
# A response may be larger than gRPC's default 4 MiB: a long prompt's prompt_logprobs with 20 alternatives each take
# ~450 bytes a token (a 32k-token prompt: ~14 MiB).
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 64 << 20),)
VISIBILITY = {"private": apb.VISIBILITY_PRIVATE, "shared": apb.VISIBILITY_SHARED, "public": apb.VISIBILITY_PUBLIC}
GROUP_BY = {"tenant": upb.USAGE_GROUP_BY_TENANT, "adapter": upb.USAGE_GROUP_BY_ADAPTER,
            "adapter_version": upb.USAGE_GROUP_BY_ADAPTER_VERSION}

_ROLES = {"system": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER, "assistant": pb.CHAT_ROLE_ASSISTANT,
          "tool": pb.CHAT_ROLE_TOOL}
_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "min_tokens", "ignore_eos", "logprobs", "prompt_logprobs", "speculation",
             "max_draft_tokens", "include_stop_str_in_output", "skip_special_tokens")
SPECULATION = {"off": pb.SPECULATION_OFF, "ngram": pb.SPECULATION_NGRAM, "draft": pb.SPECULATION_DRAFT}


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> pb.ChatMessages:
    """[{"role": "user", "content": "..."}, ...] -> ChatMessages. An assistant message may carry `tool_calls` (a
    response's `tool_calls` as they came, or dicts with id, name and arguments), a tool message the
    `tool_call_id` it answers."""
    out = pb.ChatMessages()
    for m in messages:
        if m["role"] not in _ROLES:
            raise ValueError(f"role {m['role']!r} is invalid: use one of {', '.join(_ROLES)}")
        msg = out.messages.add(role=_ROLES[m["role"]], content=m.get("content") or "",
                               tool_call_id=m.get("tool_call_id", ""))
        for c in m.get("tool_calls") or ():
            if isinstance(c, pb.ToolCall):
                msg.tool_calls.append(c)
            else:  # {"id", "name", "arguments"}, or OpenAI's {"id", "type", "function": {"name", "arguments"}}
                f = c.get("function", c)
                arguments = f.get("arguments", {})
                msg.tool_calls.add(id=c.get("id", ""), name=f["name"],
                                   arguments=arguments if isinstance(arguments, str) else json.dumps(arguments))
    return out


TOOL_MODES = {"auto": pb.TOOL_CHOICE_MODE_AUTO, "none": pb.TOOL_CHOICE_MODE_NONE,
              "required": pb.TOOL_CHOICE_MODE_REQUIRED}


def add_tools(out: pb.ChatMessages, tools: Sequence[Mapping[str, Any]], tool_choice: str | None = None,
              parallel_tool_calls: bool = True) -> None:
    """`tools`: {"name", "description", "parameters" (a JSON schema: a dict or its text)} each, or OpenAI's
    {"type": "function", "function": {...}}; `tool_choice`: "auto" (the default), "none", "required", or the
    name of the one tool to call."""
    for i, t in enumerate(tools):
        f = t.get("function", t)
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
            raise ValueError(f"tools[{i}] has no name: give {{\"name\": ..., \"parameters\": {{...}}}}")
        parameters = f.get("parameters")
        if parameters is not None and not isinstance(parameters, str):
            parameters = json.dumps(parameters)
        out.tools.add(name=f["name"], description=f.get("description") or "", parameters=parameters or "")
    if tool_choice is not None:
        if tool_choice in TOOL_MODES:
            out.tool_choice.mode = TOOL_MODES[tool_choice]
        else:
            out.tool_choice.mode = pb.TOOL_CHOICE_MODE_FUNCTION
            out.tool_choice.function = tool_choice
    if not parallel_tool_calls:
        out.tool_choice.single_call = True


def build_request(cls: type, prompt: str | None = None, *, chat: bool = False, system: str | None = None,
                  messages: Sequence[dict[str, str]] | None = None, token_ids: Sequence[int] | None = None,
                  adapter: str = "", stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                  client_request_id: str = "", priority: int = 0, labels: Mapping[str, str] | None = None,
                  json_schema: Mapping[str, Any] | str | None = None, json_object: bool = False,
                  regex: str | None = None, choice: Sequence[str] | None = None, grammar: str | None = None,
                  logit_bias: Mapping[int, float] | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
                  tool_choice: str | None = None, parallel_tool_calls: bool = True,
                  continue_final_message: bool = False, **sampling: Any) -> Any:
    """A GenerateRequest / GenerateStreamRequest. Give exactly one of `prompt` (raw text; with chat=True
    a user message, after an optional system message), `messages` or `token_ids`. `labels`: your own keys
    and values, recorded with the request's usage and trace. At most one response format: `json_schema` (a dict
    or its JSON text), `json_object=True` (any JSON object), `regex`, `choice` (the allowed strings) or `grammar`
    (xgrammar EBNF with a `root` rule). `logit_bias`: token id -> bias in [-100, 100], added to its logit.
    `tools`, `tool_choice`, `parallel_tool_calls`: functions a chat's answer may call (`add_tools`); the calls come
    back in the response's `tool_calls`. `continue_final_message`: the last message is the assistant's answer
    begun, which the answer goes on from (a prefill)."""
    unknown = set(sampling) - set(_SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
    req = cls(adapter=adapter, stop=list(stop), stop_token_ids=list(stop_token_ids),
              client_request_id=client_request_id, priority=priority, labels=dict(labels or {}))
    fmt = response_format(json_schema=json_schema, json_object=json_object, regex=regex, choice=choice,
                          grammar=grammar)
    if fmt is not None:
        req.response_format.CopyFrom(fmt)
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    if prompt is not None and chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if messages is not None:
        req.messages.CopyFrom(chat_messages(messages))
        if tools or tool_choice is not None:
            add_tools(req.messages, tools or (), tool_choice, parallel_tool_calls)
        req.messages.continue_final_message = continue_final_message
    elif tools or tool_choice is not None or continue_final_message:
        raise ValueError("tools and continue_final_message need a chat: give messages, or a prompt with chat=True")
    elif token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    else:
        req.text = prompt
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "speculation":  # "off", "ngram" or "draft" (None: the server's default)
            if value not in SPECULATION:
                raise ValueError(f"speculation={value!r} is invalid: use one of {', '.join(SPECULATION)}")
            value = SPECULATION[value]
        try:
            setattr(req.sampling, name, value)
        except (ValueError, TypeError) as e:  # protobuf's words ("Value out of range: -5") name no field
            raise ValueError(f"{name}={value!r} is invalid: {e} (see SamplingParams in "
                             "protos/loraserve/v1/inference.proto for its type and range)") from None
    if logit_bias:
        try:
            req.sampling.logit_bias.update(logit_bias)
        except (ValueError, TypeError) as e:
            raise ValueError(f"logit_bias is invalid: {e} (token id, an integer >= 0 -> bias, a number)") from None
    return req


def response_format(*, json_schema: Mapping[str, Any] | str | None = None, json_object: bool = False,
                    regex: str | None = None, choice: Sequence[str] | None = None,
                    grammar: str | None = None) -> pb.ResponseFormat | None:
    """The ResponseFormat of at most one of these (None when none is given)."""
    given = [name for name, v in (("json_schema", json_schema), ("json_object", json_object or None),
                                  ("regex", regex), ("choice", choice), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one response format, not {' and '.join(given)}")
    if not given:
        return None
    if json_schema is not None:
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return pb.ResponseFormat(json_schema=text)
    if json_object:
        return pb.ResponseFormat(json_object=pb.JsonObject())
    if regex is not None:
        return pb.ResponseFormat(regex=regex)
    if choice is not None:
        if isinstance(choice, str):
            raise TypeError("choice takes a list of strings, not one string")
        return pb.ResponseFormat(choice=pb.Choice(choices=list(choice)))
    return pb.ResponseFormat(grammar=grammar)


def upload_requests(directory: str | Path, name: str, *, description: str = "", visibility: str | None = None,
                    promote: bool | None = None, chunk_bytes: int = UPLOAD_CHUNK_BYTES
                    ) -> Iterator[apb.UploadAdapterRequest]:
    """The messages of an upload of a PEFT adapter directory: the manifest, then each file in chunks. The directory
    is read and checked here, before any message is sent: a missing file is a FileNotFoundError, a bad argument a
    ValueError, raised by this call (an error raised while gRPC iterates the messages would reach the caller as
    UNKNOWN, its words lost)."""
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist: give the directory peft's save_pretrained wrote "
                                f"({' and '.join(ADAPTER_FILES)})")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory: give the directory peft's save_pretrained wrote "
                                 f"({' and '.join(ADAPTER_FILES)})")
    if visibility is not None and visibility not in VISIBILITY:
        raise ValueError(f"visibility {visibility!r} is invalid: use {', '.join(VISIBILITY)}")
    files = []
    for f in ADAPTER_FILES:
        path = root / f
        if not path.is_file():
            pickle = f == "adapter_model.safetensors" and (root / "adapter_model.bin").is_file()
            raise FileNotFoundError(
                f"{path} is missing: " + ("this directory holds adapter_model.bin, a pickle file, which the service "
                                          "never loads; save with safe_serialization=True (peft's default) to "
                                          "write adapter_model.safetensors" if pickle else
                                          f"an adapter directory holds {' and '.join(ADAPTER_FILES)} (what peft's "
                                          "save_pretrained writes)"))
        files.append((f, path.read_bytes()))
    digest = hashlib.sha256()
    for _, data in files:
        digest.update(data)
    manifest = apb.UploadManifest(name=name, description=description, sha256=digest.hexdigest(),
                                  size=sum(len(d) for _, d in files))
    if visibility is not None:
        manifest.visibility = VISIBILITY[visibility]
    if promote is not None:
        manifest.promote = promote

    def messages() -> Iterator[apb.UploadAdapterRequest]:
        yield apb.UploadAdapterRequest(manifest=manifest)
        for f, data in files:
            for i in range(0, len(data), chunk_bytes):
                yield apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f, data=data[i:i + chunk_bytes]))

    return messages()


class LoraServeClient:
    def __init__(self, target: str, *, api_key: str | None = None, timeout: float | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, client_cert: bytes | None = None,
                 client_key: bytes | None = None, channel: grpc.Channel | None = None) -> None:
        """`api_key`: sent as `authorization: Bearer <key>` on every call. `timeout`: the default deadline of
        every call, in seconds (None: no deadline). `tls` (or any certificate given): a TLS channel;
        `client_cert` + `client_key` for mTLS."""
        if channel is None:
            if tls or root_certificates or client_cert:
                creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
                channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._channel = channel
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._adapters = apb_grpc.AdapterServiceStub(self._channel)
        self._usage = upb_grpc.UsageServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout = timeout

    def _t(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> pb.GenerateResponse:
        """The whole completion. kwargs: see `build_request` (chat, system, messages, token_ids, adapter,
        stop, max_tokens, temperature, top_p, seed, ...)."""
        req = build_request(pb.GenerateRequest, prompt, **kwargs)
        return self._stub.Generate(req, timeout=self._t(timeout), metadata=self._metadata)

    def generate_stream_messages(self, prompt: str | None = None, *, timeout: float | None = None,
                                 **kwargs: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Every streamed message (the last one carries finish reason, usage and timings)."""
        req = build_request(pb.GenerateStreamRequest, prompt, **kwargs)
        call = self._stub.GenerateStream(req, timeout=self._t(timeout), metadata=self._metadata)
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
        return list(self._stub.Tokenize(req, timeout=self._t(timeout), metadata=self._metadata).token_ids)

    # ---- adapters -----------------------------------------------------------------------
    def upload_adapter(self, directory: str | Path, name: str, *, description: str = "",
                       visibility: str | None = None, promote: bool | None = None,
                       timeout: float | None = None) -> apb.UploadAdapterResponse:
        """Upload a PEFT adapter directory as a new version of `name` (made current unless promote=False)."""
        reqs = upload_requests(directory, name, description=description, visibility=visibility, promote=promote)
        return self._adapters.UploadAdapter(reqs, timeout=self._t(timeout), metadata=self._metadata)

    def list_adapters(self, timeout: float | None = None) -> list[apb.Adapter]:
        """Every adapter the caller can see (all pages)."""
        out, token = [], ""
        while True:
            page = self._adapters.ListAdapters(apb.ListAdaptersRequest(page_size=1000, page_token=token),
                                               timeout=self._t(timeout), metadata=self._metadata)
            out.extend(page.adapters)
            token = page.next_page_token
            if not token:
                return out

    def get_adapter(self, name: str, timeout: float | None = None) -> apb.Adapter:
        return self._adapters.GetAdapter(apb.GetAdapterRequest(name=name), timeout=self._t(timeout),
                                         metadata=self._metadata).adapter

    def promote_adapter(self, name: str, version: str | int, timeout: float | None = None) -> apb.AdapterVersion:
        req = apb.PromoteAdapterRequest(name=name, version=str(version))
        return self._adapters.PromoteAdapter(req, timeout=self._t(timeout), metadata=self._metadata).current_version

    def delete_adapter(self, ref: str, timeout: float | None = None) -> list[str]:
        resp = self._adapters.DeleteAdapter(apb.DeleteAdapterRequest(adapter=ref), timeout=self._t(timeout),
                                            metadata=self._metadata)
        return list(resp.released_version_ids)

    def load_adapter(self, ref: str, *, wait: bool = True, timeout: float | None = None) -> apb.LoadAdapterResponse:
        return self._adapters.LoadAdapter(apb.LoadAdapterRequest(adapter=ref, wait=wait), timeout=self._t(timeout),
                                          metadata=self._metadata)

    def unload_adapter(self, ref: str, timeout: float | None = None) -> apb.AdapterVersion:
        return self._adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter=ref), timeout=self._t(timeout),
                                            metadata=self._metadata).version

    def share_adapter(self, name: str, *, grant: Sequence[str] = (), revoke: Sequence[str] = (),
                      timeout: float | None = None) -> apb.Adapter:
        req = apb.ShareAdapterRequest(name=name, grant=list(grant), revoke=list(revoke))
        return self._adapters.ShareAdapter(req, timeout=self._t(timeout), metadata=self._metadata).adapter

    # ---- usage --------------------------------------------------------------------------
    def get_usage(self, *, tenant: str = "", adapter: str = "", group_by: str = "adapter",
                  start_time: float | None = None, end_time: float | None = None, bucket_s: float | None = None,
                  timeout: float | None = None) -> list[upb.UsageRow]:
        """Usage rows (all pages). Times are unix seconds; tenant "*" = every tenant (admins)."""
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by {group_by!r} is invalid: use {', '.join(GROUP_BY)}")
        req = upb.GetUsageRequest(tenant=tenant, adapter=adapter, group_by=GROUP_BY[group_by], page_size=1000)
        if start_time is not None:
            req.start_time.FromNanoseconds(int(start_time * 1e9))
        if end_time is not None:
            req.end_time.FromNanoseconds(int(end_time * 1e9))
        if bucket_s is not None:
            req.bucket.FromNanoseconds(int(bucket_s * 1e9))
        rows = []
        while True:
            resp = self._usage.GetUsage(req, timeout=self._t(timeout), metadata=self._metadata)
            rows.extend(resp.rows)
            if not resp.next_page_token:
                return rows
            req.page_token = resp.next_page_token

    def get_fair_share(self, *, tenant: str = "", timeout: float | None = None) -> upb.GetFairShareResponse:
        """The scheduler's policy and where the tenant (default: the caller; "*" = every tenant, admins) stands:
        its weight, the weighted service it has received, its requests in the engine."""
        return self._usage.GetFairShare(upb.GetFairShareRequest(tenant=tenant), timeout=self._t(timeout),
                                        metadata=self._metadata)

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
