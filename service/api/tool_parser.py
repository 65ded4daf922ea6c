"""An answer's tool calls, read as it streams (`ToolCallParser`), in the format `service.api.tools` asks for and
constrains the answer to:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import replace

from service.engine.outputs import RequestOutput, ToolCall, ToolCallDelta
from service.engine.types import FinishReason

CALL_BEGIN = "<tool_call>"
CALL_END = "</tool_call>"
# Finish reasons after which the text is the whole answer (an error or a cancellation has no answer to parse)
_ANSWERED = (FinishReason.STOP, FinishReason.EOS, FinishReason.LENGTH)


def split_calls(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """(what the text says besides its calls, the calls): every `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>` whose name is one of `names`, in order, each with a new id. From the first one that does not
    parse on, the rest is text."""
    decoder = json.JSONDecoder()
    parts: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while True:
        i = text.find(CALL_BEGIN, pos)
        if i < 0:
            parts.append(text[pos:])
            break
        parts.append(text[pos:i])
        call, end = _parse_call(text, i + len(CALL_BEGIN), decoder, names)
        if call is None:
            parts.append(text[i:])
            break
        calls.append(call)
        pos = end
    said = "".join(parts)
    return (said.strip() if calls and not said.strip() else said), calls


def _parse_call(text: str, pos: int, decoder: json.JSONDecoder, names: frozenset[str]
                ) -> tuple[ToolCall | None, int]:
    pos = _skip_space(text, pos)
    try:
        obj, pos = decoder.raw_decode(text, pos)
    except (json.JSONDecodeError, RecursionError):
        return None, pos
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None, pos
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None, pos
    pos = _skip_space(text, pos)
    if not text.startswith(CALL_END, pos):
        return None, pos
    call = ToolCall(f"call_{secrets.token_hex(12)}", obj["name"], json.dumps(arguments, ensure_ascii=False))
    return call, pos + len(CALL_END)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


# A call's opening as the format writes it, up to where its arguments begin (white space as the model may place
# it when a template's own format is followed without the grammar)
_HEADER = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')
_MAX_HEADER = 200  # characters after which a `<tool_call>` that has not opened a call is text
_CLOSE = re.compile(r"\s*\}\s*</tool_call>")  # what follows a call's arguments


class ToolCallParser:
    """One answer's outputs, read in order (`apply`), its calls streamed as they are written:
    - text outside calls goes out as it comes, held back only while its tail could be the start of `<tool_call>`;
    - once a call's opening (`<tool_call>` and `{"name": "...", "arguments": {`) is complete, the output carries a
      `ToolCallDelta` with the call's index, new id and name; then its arguments as they come, each piece in a
      delta of its own, up to where their JSON object ends (braces counted outside strings, so a `}` or a
      `</tool_call>` inside a string value is no end); then the call's close (`}` and `</tool_call>`);
    - the final output carries every call whole (`tool_calls`: their arguments are the pieces joined) and its text
      becomes what the answer says besides them, without the white space around them.
    An opening that does not come within 200 characters (text that only looks like a call, a name that is not one
    of the tools, arguments that are not an object) is text, held to the end and parsed there (`split_calls`: calls
    it finds then come whole in the final output's deltas too). A call cut short by max_tokens keeps the arguments
    it has; one cut right after its opening has none."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        # text; opening (a call's opening being written); arguments; closing (its `}` and `</tool_call>`); held (text
        # that opened no call, kept to the end)
        self._state = "text"
        self._buf = ""  # text not released in this state (short, but in state held)
        self._args: list[str] = []  # the current call's arguments released so far
        self._released: list[str] = []
        self._calls: list[ToolCall] = []
        self._open: ToolCallDelta | None = None  # the call whose arguments are being written
        self._scan = _JsonEnd()  # where its arguments end
        self._said = False  # text other than white space released since the last call
        self._deltas: list[ToolCallDelta] = []  # not handed out yet

    def feed(self, delta: str) -> str:
        """The answer's text that can go out now; the calls' pieces gathered for `apply`."""
        out: list[str] = []
        self._buf += delta
        while self._step(out):
            pass
        text = "".join(out)
        if text:
            self._released.append(text)
        return text

    def _step(self, out: list[str]) -> bool:
        """Advance through what is buffered; True when the state changed (go on), False to wait for more text."""
        buf = self._buf
        if self._state == "text":
            i = buf.find(CALL_BEGIN)
            if i < 0:
                cut = len(buf) - _partial_suffix(buf, CALL_BEGIN)
                if self._calls and not self._said and not buf[:cut].strip():
                    return False  # white space after a call: text only if more text follows it
                out.append(buf[:cut])
                self._said = self._said or bool(buf[:cut].strip())
                self._buf = buf[cut:]
                return False
            if not self._calls or self._said or buf[:i].strip():  # (the white space between calls is no text)
                out.append(buf[:i])
            self._buf, self._state = buf[i:], "opening"
            return True
        if self._state == "opening":
            m = _HEADER.match(buf)
            if m is not None and m.end() < len(buf) and m.group(1) in self._names and buf[m.end()] == "{":
                self._begin(m.group(1))
                self._buf = buf[m.end():]
                return True
            if m is not None and m.end() < len(buf) or len(buf) > _MAX_HEADER:
                self._state = "held"  # not one of the tools, arguments that are no object, or no opening at all
            return False
        if self._state == "arguments":  # the arguments' JSON, released as it comes, up to where the object ends
            end = self._scan.feed(buf)
            self._piece(buf if end < 0 else buf[:end])
            self._buf = "" if end < 0 else buf[end:]
            if end < 0:
                return False
            self._state = "closing"
            return True
        if self._state == "closing":  # `}` and `</tool_call>`, white space around them
            m = _CLOSE.match(buf)
            if m is None and _could_close(buf):
                return False
            self._close()  # (a close the grammar would not let through: the call ends anyway)
            self._buf, self._state = (buf[m.end():] if m is not None else buf), "text"
            return True
        return False  # held: everything waits for the end

    def _begin(self, name: str) -> None:
        """A call's opening is written: its delta (index, a new id, the name); its arguments come next."""
        self._open = ToolCallDelta(len(self._calls), f"call_{secrets.token_hex(12)}", name, "")
        self._deltas.append(self._open)
        self._args, self._scan, self._state = [], _JsonEnd(), "arguments"

    def _piece(self, text: str) -> None:
        if text:
            assert self._open is not None
            self._args.append(text)
            self._deltas.append(ToolCallDelta(self._open.index, "", "", text))

    def _close(self) -> None:
        self._said = False
        opened, self._open = self._open, None
        assert opened is not None
        self._calls.append(ToolCall(opened.id, opened.name, "".join(self._args)))

    def apply(self, out: RequestOutput) -> None:
        """Rewrite one output in place (the reader's thread, in order)."""
        out.new_text = self.feed(out.new_text)
        final = out.final
        if final is not None and final.finish_reason in _ANSWERED:
            self._finish(out)
        out.tool_call_deltas, self._deltas = (self._deltas or None), []
        if final is not None and final.finish_reason in _ANSWERED:
            said = "".join(self._released)
            out.final = replace(final, text=said.strip() if self._calls else said)
            out.tool_calls = self._calls

    def _finish(self, out: RequestOutput) -> None:
        """The answer ended: what is buffered is released, parsed, or ends the call it belongs to."""
        buf, self._buf = self._buf, ""
        tail = buf
        m = _HEADER.match(buf) if self._state == "opening" else None
        if m is not None and m.end() == len(buf) and m.group(1) in self._names:  # cut short right after its opening
            self._begin(m.group(1))
        if self._state in ("arguments", "closing"):  # cut short (max_tokens, a stop string): it keeps what it has
            self._close()
            tail = ""
        elif self._state in ("opening", "held"):
            tail, found = split_calls(buf, self._names)
            for call in found:
                self._deltas.append(ToolCallDelta(len(self._calls), call.id, call.name, call.arguments))
                self._calls.append(call)
        if self._calls and not self._said and not tail.strip():
            tail = ""
        if tail:
            self._released.append(tail)
        out.new_text += tail


class _JsonEnd:
    """Finds where a JSON object ends in text that comes in pieces: braces and brackets counted outside strings (a
    `}` or `</tool_call>` inside a string value is no end)."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> int:
        """The index in `text` just after the object's last character, or -1 if it goes on past `text`."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return -1


def _could_close(text: str) -> bool:
    """`text` could still grow into a call's close: white space, `}`, white space, a start of `</tool_call>`."""
    rest = text.lstrip()
    return not rest or (rest[0] == "}" and CALL_END.startswith(rest[1:].lstrip()))


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
