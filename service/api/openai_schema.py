"""OpenAI's Chat Completions and Completions requests (and vLLM's /tokenize and /detokenize), as JSON bodies, -> the
same `GenerateRequest` the gRPC front receives. The engine's outputs -> OpenAI's objects: `openai_output`.

Only the shape is checked here (types, and ranges the proto's unsigned fields need); everything else (sampling
ranges, bounds, the tenant's limits, the adapter) is checked once, by the request path both fronts share, with
the same messages. A body becomes one request per choice: `n` of them per prompt (a completion may carry several
prompts), at most MAX_CHOICES in all. Fields this server does not implement are refused by name (functions, suffix,
best_of) rather than silently ignored; fields it does not know are ignored, as vLLM does. `echo` puts each
prompt before its completion, its tokens' logprobs (the first token has none) before the completion's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.convert import MAX_LABELS, MAX_MESSAGES, MAX_PRIORITY
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.tools import MAX_TOOL_CALLS, MAX_TOOLS
from service.engine.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS

U32 = 2**32 - 1
SEEDS = 2**63
# Choices of one call: `n` per prompt, for every prompt of a completion. Each is a request of its own to the engine
# (they share the prompt's KV through the prefix cache) and counts against the tenant's concurrent requests.
MAX_CHOICES = 64
# Token ids in one list of a body (a prompt's, /detokenize's): past it the body is refused before its items are
# checked, so a body of a million bad ids costs one error, not a million (the context window bounds them later).
MAX_LIST_IDS = 1 << 18
UInt = Annotated[int, Field(ge=0, le=U32)]
PosInt = Annotated[int, Field(ge=1, le=U32)]
ROLES = {"system": pb.CHAT_ROLE_SYSTEM, "developer": pb.CHAT_ROLE_SYSTEM, "user": pb.CHAT_ROLE_USER,
         "assistant": pb.CHAT_ROLE_ASSISTANT, "tool": pb.CHAT_ROLE_TOOL}
TOOL_CHOICE = {"none": pb.TOOL_CHOICE_MODE_NONE, "auto": pb.TOOL_CHOICE_MODE_AUTO,
               "required": pb.TOOL_CHOICE_MODE_REQUIRED}


class _Body(BaseModel):
    # strict: "0.5" is not a number, 1 is not a bool; unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallIn(_Body):
    """An earlier answer's call, as the response gave it."""

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments always follow the schema here


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class JsonSchemaFormat(_Body):
    name: str = "schema"
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Sampling(_Body):
    """What both endpoints take besides the prompt: OpenAI's fields, then vLLM's extras (`extra_body`)."""

    model: str
    max_tokens: PosInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # token id (a string, as JSON keys are) -> bias in [-100, 100]
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    # vLLM's extras
    top_k: UInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: UInt | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stop_token_ids: Annotated[list[UInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    # vLLM's structured output extras (the same formats as gRPC's response_format): `structured_outputs`, and the
    # older `guided_*` fields
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # ours: kept with the request's usage row and span, as over gRPC
    labels: Annotated[dict[str, str], Field(max_length=MAX_LABELS)] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)]
    max_completion_tokens: PosInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's: the last (assistant) message is the answer begun, which the answer goes on from
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    functions: list[Any] | None = None
    function_call: Any = None


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt or a conversation (with its tools), tokenized as a generation would see it."""

    model: str | None = None  # every adapter shares the base model's tokenizer
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


TokenIds = Annotated[list[UInt], Field(max_length=MAX_LIST_IDS)]


class DetokenizeRequest(_Body):
    """vLLM's /detokenize: token ids back to text."""

    model: str | None = None
    tokens: TokenIds


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(max_length=MAX_CHOICES)] | TokenIds | Annotated[
        list[TokenIds], Field(max_length=MAX_CHOICES)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def validation_message(e: ValidationError) -> str:
    """Pydantic's errors, at most three, each as `field.path: what is wrong`."""
    parts: dict[str, None] = {}  # distinct, in order
    errors = e.errors(include_url=False)
    for err in errors:
        # A union's branches add their type to the location (`stop.list[str]`): the field's name is enough.
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"] if not _type_tag(x))
        parts[f"{loc.lstrip('.') or 'body'}: {err['msg']}"] = None
    more = len(parts) - 3
    return "; ".join(list(parts)[:3]) + (f" (and {more} more)" if more > 0 else "")


def _type_tag(x: object) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x or "-" in x or x[:1].isupper())


def _refuse_unsupported(extra: dict[str, Any]) -> None:
    for name, value in extra.items():
        if value:
            raise ValueError(f"{name} is not supported by this server")


def _common(req: _Sampling, base_model: str, max_tokens: int | None, logprobs: int | None) -> pb.GenerateRequest:
    out = pb.GenerateRequest(adapter="" if req.model == base_model else req.model, priority=req.priority)
    sp = out.sampling
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
                 "repetition_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output",
                 "skip_special_tokens"):
        value = getattr(req, name)
        if value is not None:
            setattr(sp, name, value)
    if max_tokens is not None:
        sp.max_tokens = max_tokens
    if logprobs is not None:
        sp.logprobs = logprobs
    if req.stop is not None:
        out.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    if req.stop_token_ids:
        out.stop_token_ids.extend(req.stop_token_ids)
    if req.logit_bias:
        out.sampling.logit_bias.update(_logit_bias(req.logit_bias))
    if req.labels:
        out.labels.update(req.labels)
    if req.user is not None:
        out.labels["user"] = req.user  # checked with the other labels: at most 256 printable characters
    return out


def _extra_format(req: _Sampling, out: pb.GenerateRequest) -> None:
    """vLLM's structured output extras -> the request's response format (at most one format in all)."""
    so = req.structured_outputs
    kinds = ("json", "regex", "choice", "grammar")
    named = {f"structured_outputs.{k}": getattr(so, "json_" if k == "json" else k) for k in kinds} if so else {}
    named |= {f"guided_{k}": getattr(req, f"guided_{k}") for k in kinds}
    given = [(name, value) for name, value in named.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(name for name, _ in given)} both set a format: give one of them")
    if so is not None and not given:
        raise ValueError("structured_outputs is empty: give one of json, regex, choice or grammar")
    if not given:
        return
    name, value = given[0]
    kind = name.rsplit(".", 1)[-1].removeprefix("guided_")
    rf = out.response_format
    if kind == "json":
        rf.json_schema = value if isinstance(value, str) else json.dumps(value)
    elif kind == "regex":
        rf.regex = value
    elif kind == "choice":
        rf.choice.choices.extend(value)
    else:
        rf.grammar = value


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as strings; the biases are checked with the other sampling
    fields."""
    out = {}
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit() or int(key) > U32:
            raise ValueError(f"logit_bias key {key[:40]!r} is invalid: each key must be a token id (an integer >= 0, "
                             "as a string)")
        if int(key) in out:
            raise ValueError(f"logit_bias has token id {int(key)} twice (as {key[:40]!r} too)")
        out[int(key)] = value
    return out


def _check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise ValueError(f"{prompts} prompts with n={n} make {prompts * n} choices; at most {MAX_CHOICES} are "
                         "allowed per call")


def _choices(per_prompt: list[pb.GenerateRequest], n: int) -> list[pb.GenerateRequest]:
    """`n` requests per prompt, in OpenAI's order of choices (prompt by prompt); with a seed, choice j of a prompt
    samples with seed + j, so the n choices differ and the call as a whole replays. (A chat has one prompt and `n`
    its bound; a completion's prompts are counted first, `_check_choices`.)"""
    if n == 1:
        return per_prompt
    out = []
    for req in per_prompt:
        for j in range(n):
            choice = pb.GenerateRequest()
            choice.CopyFrom(req)
            if req.sampling.HasField("seed"):
                choice.sampling.seed = (req.sampling.seed + j) % SEEDS
            out.append(choice)
    return out


def chat_request(req: ChatRequest, base_model: str) -> list[pb.GenerateRequest]:
    """The chat body -> one request per choice (`n`)."""
    if req.functions or req.function_call is not None:  # OpenAI's deprecated form of tools
        raise ValueError("functions and function_call are not supported by this server: send tools and tool_choice")
    if req.top_logprobs is not None and not req.logprobs:
        raise ValueError("top_logprobs needs logprobs=true")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    out = _common(req, base_model, max_tokens, logprobs)
    out.messages.CopyFrom(_conversation(req.messages, req))
    if req.continue_final_message:
        out.messages.continue_final_message = True  # no generation prompt then, whatever add_generation_prompt says
    elif not req.add_generation_prompt:
        raise ValueError("add_generation_prompt=false is supported only with continue_final_message=true (the "
                         "answer goes on from the last message); else the assistant's turn is always opened")
    _extra_format(req, out)
    fmt = req.response_format
    formatted = out.HasField("response_format") or (fmt is not None and fmt.type != "text")
    if formatted and req.tools and req.tool_choice != "none":
        raise ValueError("tools cannot be combined with a response format (response_format, structured_outputs or "
                         "guided_*): the answer's tool calls follow the tools' schemas (set tool_choice to \"none\" "
                         "to use a response format with tools shown to the model)")
    if formatted and req.continue_final_message:
        raise ValueError("continue_final_message cannot be combined with a response format (response_format, "
                         "structured_outputs or guided_*): the format would hold the continuation alone, not the "
                         "answer begun with it")
    if fmt is not None and fmt.type != "text" and out.HasField("response_format"):
        raise ValueError("response_format and a structured output extra both set a format: give one of them")
    if fmt is not None and fmt.type == "json_object":
        out.response_format.json_object.SetInParent()
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ValueError("response_format.json_schema is missing: give {\"name\": ..., \"schema\": {...}}")
        out.response_format.json_schema = json.dumps(fmt.json_schema.schema_)
    return _choices([out], req.n)


def _conversation(messages: list[ChatMessage], req: ChatRequest | TokenizeRequest) -> pb.ChatMessages:
    """The body's messages and tools -> the proto's ChatMessages."""
    out = pb.ChatMessages()
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            content = "".join(part.text for part in m.content)
        elif m.content is None and not m.tool_calls:
            raise ValueError(f"messages[{i}].content is missing: give the message's text")
        else:
            content = m.content or ""
        msg = out.messages.add(role=ROLES[m.role], content=content, tool_call_id=m.tool_call_id or "")
        for c in m.tool_calls or ():
            msg.tool_calls.add(id=c.id, name=c.function.name, arguments=c.function.arguments)
    _tools(req, out)  # (no messages: the request path refuses it, named as the body names it)
    return out


def tokenize_request(req: TokenizeRequest) -> pb.TokenizeRequest:
    """The /tokenize body -> the TokenizeRequest gRPC receives."""
    if (req.prompt is None) == (req.messages is None):
        raise ValueError("give one of prompt (text) or messages (a conversation) to tokenize")
    if not req.add_generation_prompt and not req.continue_final_message:
        raise ValueError("add_generation_prompt=false is supported only with continue_final_message=true: the "
                         "tokens are those a generation sees, with the assistant's turn opened")
    if not req.add_special_tokens and req.prompt is not None:  # a chat's rendering adds none anyway
        raise ValueError("add_special_tokens=false is not supported for a prompt by this server: the tokens are "
                         "those a generation sees")
    if req.prompt is not None:
        for name, value in (("tools", req.tools), ("tool_choice", req.tool_choice is not None),
                            ("continue_final_message", req.continue_final_message)):
            if value:
                raise ValueError(f"{name} needs a conversation: give messages, not prompt")
        return pb.TokenizeRequest(text=req.prompt)
    out = pb.TokenizeRequest(messages=_conversation(req.messages, req))
    out.messages.continue_final_message = req.continue_final_message
    return out


def _tools(req: ChatRequest | TokenizeRequest, out: pb.ChatMessages) -> None:
    for t in req.tools or ():
        f = t.function
        out.tools.add(name=f.name, description=f.description or "",
                      parameters=json.dumps(f.parameters) if f.parameters is not None else "")
    choice = req.tool_choice
    if choice is None:
        if not req.parallel_tool_calls and req.tools:
            out.tool_choice.single_call = True
        return
    if isinstance(choice, NamedToolChoice):
        out.tool_choice.mode = pb.TOOL_CHOICE_MODE_FUNCTION
        out.tool_choice.function = choice.function.name
    else:
        out.tool_choice.mode = TOOL_CHOICE[choice]
    out.tool_choice.single_call = not req.parallel_tool_calls


def completion_request(req: CompletionRequest, base_model: str) -> list[pb.GenerateRequest]:
    """The completion body -> one request per choice: `n` per prompt, prompt by prompt."""
    _refuse_unsupported({"suffix": req.suffix, "best_of": req.best_of if req.best_of not in (None, 1) else None})
    common = _common(req, base_model, req.max_tokens, req.logprobs)
    _extra_format(req, common)
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get their logprobs too
        common.sampling.prompt_logprobs = req.logprobs
    prompts = req.prompt
    if not (isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list))):
        prompts = [prompts]  # one text or one list of token ids
    _check_choices(len(prompts), req.n)  # counted before any per-prompt work
    per_prompt = []
    for i, prompt in enumerate(prompts):
        out = pb.GenerateRequest()
        out.CopyFrom(common)
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            out.text = prompt
        else:
            out.token_ids.ids.extend(prompt)
            if not prompt:
                raise ValueError(f"{where} is empty: give a text or at least one token id")
        per_prompt.append(out)
    return _choices(per_prompt, req.n)


# ---- responses -------------------------------------------------------------------------------------------
