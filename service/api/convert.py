"""Proto <-> core types for inference: validate a request into the engine's `RequestSpec`, and turn engine
outputs into responses. Every message names the field and what is allowed, and quotes client input short.

Every free-size field has a bound, checked by `check_bounds` in O(number of fields) before any per-item work,
before the tenant's lease and before the tokenizer runs (the README lists them):
- prompt text, or the chat messages' content in total: at most `max_prompt_bytes` UTF-8 bytes (default:
  PROMPT_BYTES_PER_TOKEN per token of the context window; `server.max_prompt_bytes`);
- chat messages: at most MAX_MESSAGES; token_ids: fewer than the context window;
- stop: MAX_STOP_SEQUENCES of MAX_STOP_LENGTH characters; stop_token_ids: MAX_STOP_TOKEN_IDS entries;
  sampling.logit_bias: MAX_LOGIT_BIAS entries;
- client_request_id: MAX_CLIENT_REQUEST_ID characters; adapter: MAX_REF_CHARS characters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from adapters.errors import quote
from adapters.registry_types import MAX_REF_CHARS, InvalidAdapterName
from service.api import tools
from service.api.adapter_refs import AdapterResolver, ResolvedAdapter
from service.api.auth import PermissionDenied
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.tools import ToolSet
from service.engine.outputs import FinalOutput, Timings, ToolCall, Usage
from service.engine.request import RequestSpec
from service.engine.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_LENGTH,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from service.engine.speculative import SpecStats
from service.engine.structured import MAX_CHOICES, CompiledGrammarLike, FormatKind, ResponseFormat
from service.engine.types import FinishReason, SampleResult
from service.runtime.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 256
MAX_PRIORITY = 1000
MAX_CLIENT_REQUEST_ID = 128
MAX_MESSAGES = 1024
MAX_LABELS = 16
MAX_LABEL_VALUE = 256
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
# The default prompt byte bound per token of the context window. English runs ~3-4 UTF-8 bytes per token on
# common BPE vocabularies, CJK ~3, code a little more; 16 leaves room for whitespace- and symbol-heavy text
# while keeping the worst-case tokenizer work of one call small (the README gives the measured time).
PROMPT_BYTES_PER_TOKEN = 16

ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant",
         pb.CHAT_ROLE_TOOL: "tool"}
FINISH_REASONS = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.STOP: pb.FINISH_REASON_STOP,
                  FinishReason.EOS: pb.FINISH_REASON_EOS, FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
                  FinishReason.ERROR: pb.FINISH_REASON_ERROR}
ANSWERED = (FinishReason.STOP, FinishReason.EOS)  # the finish reasons an answer that calls tools reports as such
SPECULATION = {pb.SPECULATION_OFF: "off", pb.SPECULATION_NGRAM: "ngram", pb.SPECULATION_DRAFT: "draft"}
# The proto's optional sampling fields that map one to one onto SamplingParams.
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed", "min_tokens", "ignore_eos", "logprobs", "prompt_logprobs",
                    "include_stop_str_in_output", "skip_special_tokens")

GenerateLike = Any  # pb.GenerateRequest | pb.GenerateStreamRequest: the same fields, number for number


class RequestConverter:
    """Validates requests against this model: its tokenizer, vocabulary and context window."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int, resolver: AdapterResolver,
                 max_prompt_bytes: int | None = None, structured: GrammarCompiler | None = None) -> None:
        """`max_prompt_bytes`: the bound on a prompt's text (or its messages' content) before tokenizing;
        None: max_model_len * PROMPT_BYTES_PER_TOKEN. `structured`: compiles response formats (None: requests
        with one are refused)."""
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}  # token id -> its text (ids are below vocab_size: bounded)
        self.structured = structured
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.resolver = resolver
        # the chat template renders tools and calls itself (else `tools.for_template` writes them into the text)
        self._native_tools = tools.template_calls_tools(tokenizer.chat_template, tokenizer.template_takes_tools)
        if max_prompt_bytes is None:
            self.max_prompt_bytes = max_model_len * PROMPT_BYTES_PER_TOKEN
            self._prompt_bound = (f"{self.max_prompt_bytes} bytes ({PROMPT_BYTES_PER_TOKEN} per token of the "
                                  f"{max_model_len}-token context window; server.max_prompt_bytes sets it)")
        else:
            self.max_prompt_bytes = max_prompt_bytes
            self._prompt_bound = f"{max_prompt_bytes} bytes (server.max_prompt_bytes)"

    # ---- requests -----------------------------------------------------------------------
    def spec_and_tools(self, req: GenerateLike, tenant: Any, request_id: str, deadline: float | None = None
                       ) -> tuple[RequestSpec, ToolSet | None]:
        """The engine's request for a Generate / GenerateStream call, and the chat's tools (None without any: the
        caller parses the answer's calls with them). `tenant`: the caller (`service.tenants.Tenant`: id, admin,
        limits); `deadline`: the call's, in time.monotonic()."""
        self.check_bounds(req)  # cheap; the servicer runs it before taking a lease too
        client_id = _client_request_id(req.client_request_id)
        if not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
            raise ValueError(f"priority={req.priority} is invalid: must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}] "
                             "(lower runs sooner; default 0)")
        if req.priority < 0 and not tenant.admin:
            raise PermissionDenied(f"priority={req.priority} would run ahead of other tenants' requests; that "
                                   f"needs the admin role, which tenant {tenant.id!r} does not have (use 0 or more)")
        self.check_ids("stop_token_ids", req.stop_token_ids)  # at most MAX_STOP_TOKEN_IDS: check_bounds
        for t in req.sampling.logit_bias:  # at most MAX_LOGIT_BIAS: check_bounds
            if t >= self.vocab_size:
                raise ValueError(f"sampling.logit_bias has token id {t}, outside the vocabulary: token ids must be "
                                 f"in [0, {self.vocab_size - 1}]")
        toolset = tools.tool_set(req.messages) if req.WhichOneof("prompt") == "messages" else None
        ids = self._prompt_ids(req, toolset)
        limits = tenant.limits
        if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens; tenant {tenant.id!r} may send at most "
                             f"{limits.max_prompt_tokens} prompt tokens per request")
        sampling = self.sampling(req, len(ids), limits.max_output_tokens)
        grammar = self.grammar(req, sampling, toolset)  # compiled here, on the RPC's thread, never on the engine loop
        # Resolved last: the caller holds the version right after this returns (a delete then sees it in use).
        adapter = self._adapter(req.adapter, tenant) if req.adapter else None
        return RequestSpec(
            request_id, tuple(ids), sampling, tenant=tenant.id,
            adapter_version=adapter.version_id if adapter else None, adapter_name=adapter.name if adapter else "",
            priority=req.priority, cache_salt=tenant.id,  # KV is reused within a tenant, never across
            deadline=deadline, client_request_id=client_id, labels=_labels(req.labels), grammar=grammar), toolset

    def grammar(self, req: GenerateLike, sampling: SamplingParams, toolset: ToolSet | None = None
                ) -> CompiledGrammarLike | None:
        """The request's response format, or its tool calls' (`toolset`), compiled (None without either);
        ValueError naming what is wrong with it."""
        fmt = response_format(req)
        what = "response_format"
        calls = toolset.format() if toolset is not None else None
        if calls is not None:
            if fmt is not None:
                raise ValueError("response_format cannot be combined with messages.tools: the answer's tool calls "
                                 "follow the tools' schemas (set tool_choice to TOOL_CHOICE_MODE_NONE to use a "
                                 "response_format with tools shown to the model)")
            fmt, what = calls, "messages.tools"
        if fmt is None:
            return None
        if req.WhichOneof("prompt") == "messages" and req.messages.continue_final_message:
            raise ValueError(f"{what} cannot be combined with messages.continue_final_message: the format would hold "
                             "the continuation alone, not the answer begun with it")
        if self.structured is None:
            raise ValueError(f"{what} is not supported by this server (it has no structured output)")
        if sampling.min_tokens:
            raise ValueError(f"sampling.min_tokens={sampling.min_tokens} cannot be combined with {what}: "
                             "the format decides where the output ends")
        return self.structured.compile(fmt)

    def check_model(self, ref: str, tenant: Any) -> None:
        """NotFound unless `ref` names an adapter `tenant` may use (or is empty: the base model)."""
        if ref:
            self._adapter(ref, tenant)

    def _adapter(self, ref: str, tenant: Any) -> ResolvedAdapter:
        try:
            return self.resolver.resolve(tenant.id, ref, tenant.admin)
        except InvalidAdapterName as e:
            raise InvalidAdapterName(f"adapter is invalid: {e}; use name, name@version or owner/name[@version] "
                                     "(empty for the base model)") from None

    def check_bounds(self, req: Any) -> None:
        """Refuse (ValueError) a request with a field over its bound: the prompt's size, then for a
        Generate-like request its stop strings and ids, client_request_id, labels and adapter. Counts and lengths
        only, no per-item work, so it runs before the tenant's lease and before the tokenizer."""
        self._check_prompt_size(req)
        if isinstance(req, pb.TokenizeRequest):
            return
        if len(req.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop has {len(req.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
        for i, stop in enumerate(req.stop):
            if len(stop) > MAX_STOP_LENGTH:
                raise ValueError(f"stop[{i}]={quote(stop)} is invalid: each stop sequence must be a non-empty "
                                 f"string of at most {MAX_STOP_LENGTH} characters")
        if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(req.stop_token_ids)} entries; at most "
                             f"{MAX_STOP_TOKEN_IDS} are allowed")
        if len(req.sampling.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"sampling.logit_bias has {len(req.sampling.logit_bias)} entries; at most "
                             f"{MAX_LOGIT_BIAS} are allowed")
        _client_request_id(req.client_request_id)
        if len(req.labels) > MAX_LABELS:
            raise ValueError(f"labels has {len(req.labels)} entries; at most {MAX_LABELS} are allowed")
        response_format(req)  # sizes and counts; the compile comes later
        if len(req.adapter) > MAX_REF_CHARS:
            raise ValueError(f"adapter is invalid: {quote(req.adapter)} has more than {MAX_REF_CHARS} characters; "
                             "use name, name@version or owner/name[@version] (empty for the base model)")

    def _check_prompt_size(self, req: Any) -> None:
        kind = req.WhichOneof("prompt")
        if kind == "text":
            size = _utf8_len(req.text)
            if size > self.max_prompt_bytes:
                raise ValueError(f"text has {size} bytes (UTF-8); at most {self._prompt_bound} are allowed")
        elif kind == "messages":
            messages = req.messages.messages
            if len(messages) > MAX_MESSAGES:
                raise ValueError(f"messages has {len(messages)} messages; at most {MAX_MESSAGES} are allowed")
            tools.check_counts(req.messages)
            extra = sum(map(_utf8_len, tools.text_fields(req.messages)))
            size = sum(_utf8_len(m.content) for m in messages) + extra
            if size > self.max_prompt_bytes:
                what = "the messages' content" + (" (with their tool calls and the tools)" if extra else "")
                raise ValueError(f"{what} has {size} bytes (UTF-8) in total; at most {self._prompt_bound} are "
                                 "allowed")
        elif kind == "token_ids":
            self._check_num_tokens(len(req.token_ids.ids))

    def _check_num_tokens(self, n: int) -> None:
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens, too many for the context window of "
                             f"{self.max_model_len} tokens: at most {self.max_model_len - 1} prompt tokens fit "
                             "(and the prompt plus max_tokens must fit)")

    def prompt_ids(self, req: Any) -> list[int]:
        """Tokenize whichever prompt form `req` carries (GenerateRequest-like or TokenizeRequest). The
        prompt's size is checked first (check_bounds), so the tokenizer's work is bounded."""
        toolset = tools.tool_set(req.messages) if req.WhichOneof("prompt") == "messages" else None
        return self._prompt_ids(req, toolset)

    def _prompt_ids(self, req: Any, toolset: ToolSet | None) -> list[int]:
        self._check_prompt_size(req)
        kind = req.WhichOneof("prompt")
        if kind is None:
            forms = "text or messages" if isinstance(req, pb.TokenizeRequest) else "text, messages or token_ids"
            raise ValueError(f"the prompt is missing: set one of {forms}")
        if kind == "text":
            text = req.text
            if not text:
                raise ValueError("text is empty: give a prompt to complete")
            ids = self.tokenizer.encode(text)
        elif kind == "messages":
            if not req.messages.messages:
                raise ValueError("messages.messages is empty: give at least one chat message")
            messages = tools.chat_messages(req.messages.messages, ROLES)
            messages, listed = tools.for_template(messages, toolset, self._native_tools)
            if req.messages.continue_final_message:
                last = req.messages.messages[-1]
                if last.role != pb.CHAT_ROLE_ASSISTANT or not last.content.strip():
                    raise ValueError("messages.continue_final_message needs the last message to be the assistant's "
                                     "answer begun, with some text to go on from")
            ids = self.tokenizer.encode_chat(messages, tools=listed,
                                             continue_final_message=req.messages.continue_final_message)
        else:
            ids = list(req.token_ids.ids)  # fewer than max_model_len: checked above
            if not ids:
                raise ValueError("token_ids.ids is empty: give at least one token id")
            self.check_ids("token_ids.ids", ids)
        if not ids:
            raise ValueError(f"the prompt ({kind}) tokenizes to no tokens: give a prompt with some content")
        self._check_num_tokens(len(ids))
        return ids

    def check_ids(self, field: str, ids: Sequence[int]) -> None:
        for i, t in enumerate(ids):
            if t >= self.vocab_size:
                raise ValueError(f"{field}[{i}]={t} is outside the vocabulary: token ids must be in "
                                 f"[0, {self.vocab_size - 1}]")

    def sampling(self, req: GenerateLike, num_prompt_tokens: int, max_output: int | None = None) -> SamplingParams:
        """`max_output`: the tenant's cap on max_tokens (None: only the context window caps it)."""
        room = self.max_model_len - num_prompt_tokens  # >= 1: prompt_ids() refused longer prompts
        sp = req.sampling
        kwargs: dict[str, Any] = {f: getattr(sp, f) for f in _SAMPLING_FIELDS if sp.HasField(f)}
        if sp.HasField("max_tokens"):
            if sp.max_tokens > room:
                raise ValueError(
                    f"sampling.max_tokens={sp.max_tokens} is too large: the prompt has {num_prompt_tokens} tokens "
                    f"and the context window {self.max_model_len}, so at most {room} tokens can be generated")
            if max_output is not None and sp.max_tokens > max_output:
                raise ValueError(f"sampling.max_tokens={sp.max_tokens} is above this tenant's limit of "
                                 f"{max_output} output tokens per request")
            kwargs["max_tokens"] = sp.max_tokens
        else:
            kwargs["max_tokens"] = min(DEFAULT_MAX_TOKENS, room, max_output or DEFAULT_MAX_TOKENS)
        if sp.HasField("speculation") and sp.speculation != pb.SPECULATION_UNSPECIFIED:
            mode = SPECULATION.get(sp.speculation)
            if mode is None:
                allowed = ", ".join(pb.Speculation.Name(v) for v in SPECULATION)
                raise ValueError(f"sampling.speculation={sp.speculation} is invalid: use one of {allowed} (or leave it "
                                 "unset for the server's default)")
            kwargs["speculation"] = mode
        if sp.HasField("max_draft_tokens"):
            kwargs["max_draft_tokens"] = sp.max_draft_tokens
        if sp.logit_bias:
            kwargs["logit_bias"] = dict(sp.logit_bias)
        if "logprobs" in kwargs and kwargs["logprobs"] > MAX_LOGPROBS:
            raise ValueError(f"sampling.logprobs={kwargs['logprobs']} is invalid: must be in [0, {MAX_LOGPROBS}]")
        try:
            return SamplingParams(stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids), **kwargs)
        except ValueError as e:
            # SamplingParams names the field; say where it sits in the request.
            msg = str(e)
            where = "" if msg.startswith("stop") else "sampling."  # stop, stop_token_ids: top-level fields
            raise ValueError(where + msg) from None

    # ---- responses ----------------------------------------------------------------------
    def logprobs(self, results: Sequence[SampleResult]) -> list[pb.TokenLogprob]:
        out = []
        for r in results:
            tops = [pb.TopLogprob(token_id=t, token=self.piece(t), logprob=lp) for t, lp in (r.top_logprobs or [])]
            out.append(pb.TokenLogprob(token_id=r.token_id, token=self.piece(r.token_id),
                                       logprob=r.logprob if r.logprob is not None else 0.0, top_logprobs=tops))
        return out

    def piece(self, token_id: int) -> str:
        """The token's text, special tokens as they are (memoized per id: a long prompt's logprobs with
        alternatives name ~20 tokens a position)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return piece


class GrammarCompiler(Protocol):
    """Compiles a response format for this model (service.runtime.structured.StructuredOutput)."""

    def compile(self, fmt: ResponseFormat) -> CompiledGrammarLike: ...


def response_format(req: GenerateLike) -> ResponseFormat | None:
    """The request's `response_format` as the engine's type, bounds checked; None when unset."""
    if not req.HasField("response_format"):
        return None
    rf = req.response_format
    kind = rf.WhichOneof("format")
    if kind is None:
        raise ValueError("response_format is empty: set one of json_schema, json_object, regex, choice or grammar")
    if kind == "choice":
        choices = rf.choice.choices
        if len(choices) > MAX_CHOICES:  # counted before any per-string work
            raise ValueError(f"response_format.choice.choices has {len(choices)} strings; at most {MAX_CHOICES} "
                             "are allowed")
        return ResponseFormat.choice(list(choices))
    if kind == "json_object":
        return ResponseFormat(FormatKind.JSON_OBJECT)
    return ResponseFormat(FormatKind(kind), getattr(rf, kind))


def _client_request_id(value: str) -> str:
    if len(value) > MAX_CLIENT_REQUEST_ID or not all(" " <= c <= "~" for c in value):
        raise ValueError(f"client_request_id {quote(value, 40)} is invalid: at most {MAX_CLIENT_REQUEST_ID} "
                         "printable ASCII characters")
    return value


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"labels has {len(labels)} entries; at most {MAX_LABELS} are allowed")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(f"labels key {quote(key)} is invalid: 1 to 63 characters from a-z, 0-9, '_', '.', "
                             "'-', starting with a letter")
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise ValueError(f"labels[{key!r}] is invalid: at most {MAX_LABEL_VALUE} printable characters")
    return dict(labels)
def _utf8_len(text: str) -> int:
    # isascii() reads a flag of the string, so the common case costs no copy.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def finish_reason(final: FinalOutput, calls: Sequence[ToolCall] | None) -> int:
    """The proto's finish reason: TOOL_CALLS for an answer that calls tools and ended as it chose to."""
    if calls and final.finish_reason in ANSWERED:
        return pb.FINISH_REASON_TOOL_CALLS
    return FINISH_REASONS[final.finish_reason]


def tool_calls(calls: Sequence[ToolCall] | None) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls or ()]


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
                    output_tokens=u.output_tokens)


def speculation(s: SpecStats) -> pb.SpeculationStats:
    return pb.SpeculationStats(draft_tokens=s.draft_tokens, accepted_tokens=s.accepted_tokens)


def timings(t: Timings) -> pb.Timings:
    def ms(seconds: float | None) -> float:
        return round(seconds * 1000, 3) if seconds is not None else 0.0
    return pb.Timings(queue_ms=ms(t.queue_s), ttft_ms=ms(t.ttft_s), total_ms=ms(t.total_s))
