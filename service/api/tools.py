"""Tool calling (OpenAI's `tools` and `tool_choice`), for chat requests over either front.

A chat's tools reach the model in its chat template's own words when the template renders tools (it reads a
`tools` variable), else in a system message this module writes. Either way the model is asked to call a tool as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the format of Hermes-style and Qwen-style templates), and the request's output is constrained to it by an xgrammar
structural tag (`ToolSet.format`):
- auto: free text, but once the model writes `<tool_call>` it can only go on with the name of one of the tools and
  arguments that follow that tool's schema;
- required: one or more calls and nothing else;
- a named function: one call of that function;
- none: free text; nothing is parsed out.

The answer is read by `service.api.tool_parser.ToolCallParser`, which streams the calls as they are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from adapters.errors import quote
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.tool_parser import CALL_BEGIN, CALL_END, ToolCallParser
from service.engine.structured import MAX_FORMAT_BYTES, FormatKind, ResponseFormat
from service.runtime.structured import check_json_schema

MAX_TOOLS = 128
MAX_TOOL_CALLS = 64  # in one assistant message
MAX_CALL_ID = 256  # characters of a call's id (and of a tool message's tool_call_id)
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESPONSE_BEGIN = "<tool_response>"
RESPONSE_END = "</tool_response>"
# Consecutive whitespace characters the grammar allows inside a call's arguments: JSON's own spacing, but no
# run of blank lines a small model could loop in.
MAX_ARGUMENT_WHITESPACE = 2
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}
MODES = {pb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto", pb.TOOL_CHOICE_MODE_AUTO: "auto",
         pb.TOOL_CHOICE_MODE_NONE: "none", pb.TOOL_CHOICE_MODE_REQUIRED: "required",
         pb.TOOL_CHOICE_MODE_FUNCTION: "function"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """As OpenAI's tool object, which is what chat templates that take tools read."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolSet:
    """A chat request's tools and how the model may call them."""

    tools: tuple[Tool, ...]
    mode: str  # auto, none, required, function
    function: str = ""  # mode function: the tool's name
    single_call: bool = False

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    def format(self) -> ResponseFormat | None:
        """The structural tag the answer must follow (None for mode none)."""
        if self.mode == "none":
            return None
        if self.mode == "function":
            fmt: dict[str, Any] = _call_tag(next(t for t in self.tools if t.name == self.function))
        else:
            tags = [_call_tag(t) for t in self.tools]
            if self.mode == "required":
                # calls and nothing else; each call's line break is part of it, so after one the model chooses
                # between the end and another call (with a separator, the line break it writes after a call would
                # commit it to another)
                tags = [{**t, "end": t["end"] + "\n"} for t in tags]
                fmt = {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
                       "stop_after_first": self.single_call}
            else:
                fmt = {"type": "triggered_tags", "triggers": [CALL_BEGIN], "tags": tags,
                       "stop_after_first": self.single_call}
        text = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_FORMAT_BYTES:
            raise ValueError(f"messages.tools make a format of {size} bytes (their parameters' schemas); at most "
                             f"{MAX_FORMAT_BYTES} are allowed: send fewer tools or smaller schemas")
        return ResponseFormat(FormatKind.STRUCTURAL_TAG, text)

    def parser(self) -> ToolCallParser | None:
        """A parser for one answer (None for mode none: its text is all content)."""
        return None if self.mode == "none" else ToolCallParser(self.names)


def _call_tag(tool: Tool) -> dict[str, Any]:
    # The name is [A-Za-z0-9_-]: nothing in it needs escaping in JSON.
    return {"type": "tag", "begin": f'{CALL_BEGIN}\n{{"name": "{tool.name}", "arguments": ',
            "content": {"type": "json_schema", "json_schema": tool.parameters,
                        "max_whitespace_cnt": MAX_ARGUMENT_WHITESPACE},
            "end": f"}}\n{CALL_END}"}


# ---- requests ------------------------------------------------------------------------------------------------
def check_counts(messages: pb.ChatMessages) -> None:
    """Counts only (no per-item work): for `check_bounds`, before the tenant's lease."""
    if len(messages.tools) > MAX_TOOLS:
        raise ValueError(f"messages.tools has {len(messages.tools)} tools; at most {MAX_TOOLS} are allowed")
    for i, m in enumerate(messages.messages):
        if len(m.tool_calls) > MAX_TOOL_CALLS:
            raise ValueError(f"messages.messages[{i}].tool_calls has {len(m.tool_calls)} calls; at most "
                             f"{MAX_TOOL_CALLS} are allowed")
        if len(m.tool_call_id) > MAX_CALL_ID:
            raise ValueError(f"messages.messages[{i}].tool_call_id has {len(m.tool_call_id)} characters; at most "
                             f"{MAX_CALL_ID} are allowed")
        for j, c in enumerate(m.tool_calls):
            if len(c.id) > MAX_CALL_ID:
                raise ValueError(f"messages.messages[{i}].tool_calls[{j}].id has {len(c.id)} characters; at most "
                                 f"{MAX_CALL_ID} are allowed")


def text_fields(messages: pb.ChatMessages) -> list[str]:
    """The tools' and the calls' strings that go into the prompt besides the messages' content (they count
    against the prompt's byte bound)."""
    out = [s for t in messages.tools for s in (t.description, t.parameters)]
    for m in messages.messages:
        out.extend(s for c in m.tool_calls for s in (c.id, c.arguments))
        if m.tool_call_id:
            out.append(m.tool_call_id)
    return out


def tool_set(messages: pb.ChatMessages) -> ToolSet | None:
    """The request's tools, checked (ValueError naming the field); None when it has none."""
    choice = messages.tool_choice
    if not messages.tools:
        if messages.HasField("tool_choice"):
            raise ValueError("messages.tool_choice is set but messages.tools is empty: give the tools the model may "
                             "call, or leave tool_choice unset")
        return None
    tools = []
    seen: set[str] = set()
    for i, t in enumerate(messages.tools):
        where = f"messages.tools[{i}]"
        if not TOOL_NAME.fullmatch(t.name):
            raise ValueError(f"{where}.name {quote(t.name, 70)} is invalid: 1-64 characters from a-z, A-Z, 0-9, "
                             "'_' and '-'")
        if t.name in seen:
            raise ValueError(f"{where}.name {t.name!r} is given twice: each tool needs a name of its own")
        seen.add(t.name)
        parameters = NO_ARGUMENTS
        if t.parameters:
            parameters = json.loads(check_json_schema(t.parameters, f"{where}.parameters"))
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise ValueError(f"{where}.parameters must be an object schema ({{\"type\": \"object\", "
                                 "\"properties\": {...}}): a call's arguments are a JSON object")
            # one without a type ({} or properties alone) would let the grammar write any JSON value as arguments
            parameters = {"type": "object", **parameters}
        tools.append(Tool(t.name, t.description, parameters))
    mode = MODES.get(choice.mode)
    if mode is None:
        allowed = ", ".join(pb.ToolChoiceMode.Name(m) for m in MODES)
        raise ValueError(f"messages.tool_choice.mode={choice.mode} is invalid: use one of {allowed}")
    if mode == "function":
        if choice.function not in seen:
            raise ValueError(f"messages.tool_choice.function {quote(choice.function, 70)} is not one of the "
                             f"request's tools ({', '.join(sorted(seen))})")
    elif choice.function:
        mode_name = pb.ToolChoiceMode.Name(choice.mode)
        raise ValueError(f"messages.tool_choice.function is set, but the mode is {mode_name}: name a function with "
                         "TOOL_CHOICE_MODE_FUNCTION")
    return ToolSet(tuple(tools), mode, choice.function, choice.single_call)


def chat_messages(messages: list[pb.ChatMessage], roles: dict[int, str]) -> list[dict[str, Any]]:
    """The conversation as a chat template reads it (transformers' shape): an assistant message's calls under
    `tool_calls` with their arguments as objects, a tool message's `tool_call_id` and the `name` of the tool whose
    call it answers. ValueError naming a bad role or call."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> tool name, for the tool messages after it
    for i, m in enumerate(messages):
        role = roles.get(m.role)
        if role is None:
            name = pb.ChatRole.Name(m.role) if m.role in pb.ChatRole.values() else str(m.role)
            allowed = ", ".join(pb.ChatRole.Name(r) for r in roles)
            raise ValueError(f"messages.messages[{i}].role is {name}: must be one of {allowed}")
        d: dict[str, Any] = {"role": role, "content": m.content}
        if m.tool_calls:
            if role != "assistant":
                raise ValueError(f"messages.messages[{i}] has tool_calls but its role is {role}: only an assistant "
                                 "message calls tools")
            calls = []
            for j, c in enumerate(m.tool_calls):
                where = f"messages.messages[{i}].tool_calls[{j}]"
                if not TOOL_NAME.fullmatch(c.name):
                    raise ValueError(f"{where}.name {quote(c.name, 70)} is invalid: 1-64 characters from a-z, "
                                     "A-Z, 0-9, '_' and '-'")
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": _arguments(c.arguments, where)}})
                if c.id:
                    names[c.id] = c.name
            d["tool_calls"] = calls
        if m.tool_call_id:
            if role != "tool":
                raise ValueError(f"messages.messages[{i}] has a tool_call_id but its role is {role}: only a tool "
                                 "message answers a call")
            d["tool_call_id"] = m.tool_call_id
            if m.tool_call_id in names:
                d["name"] = names[m.tool_call_id]
        out.append(d)
    return out


def _arguments(text: str, where: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where}.arguments is not JSON ({e}): give the arguments object as JSON text") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}.arguments must be a JSON object, not {type(value).__name__}")
    return value


def template_calls_tools(source: str, reads_tools: bool) -> bool:
    """A chat template renders tools and calls in this module's format itself: it reads a `tools` variable and
    writes `<tool_call>` (Hermes-style and Qwen templates). Templates that read tools but ask for another format
    (Llama 3.1's bare JSON, Mistral's [TOOL_CALLS]) are handled as templates without tools: the model is told this
    module's format, which is the one its answer is held to."""
    return reads_tools and CALL_BEGIN in source


def for_template(messages: list[dict[str, Any]], tools: ToolSet | None, native: bool
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render. A template that renders tools (`native`, `template_calls_tools`) gets them and
    the earlier calls as they are. For one that does not, earlier calls are written into their messages' text as
    the model is asked to write them and tool results are wrapped in <tool_response> tags (in every turn, with tools
    or without: a conversation's last turn often offers none), and the request's tools, if any, and the call format
    are described in a system message (added to the first one, or put first)."""
    listed = [t.openai() for t in tools.tools] if tools is not None else None
    if native:
        return messages, listed
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            m = {**m, "content": f"{m['content']}\n{calls}" if m["content"] else calls}
        elif m["role"] == "tool":
            m = {**m, "content": f"{RESPONSE_BEGIN}\n{m['content']}\n{RESPONSE_END}"}
        out.append(m)
    if listed is None:
        return out, None
    preamble = _preamble(listed)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}" if out[0]["content"] else preamble}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out, None


def _call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"{CALL_BEGIN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_END}"


def _preamble(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions to help answer. Their signatures, as JSON, are between <tools> and </tools>:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call one, write its name and arguments as a JSON object between <tool_call> and </tool_call>:\n"
            f"{CALL_BEGIN}\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n{CALL_END}\n"
            f"A call's result comes back between {RESPONSE_BEGIN} and {RESPONSE_END}.")
