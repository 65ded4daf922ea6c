"""Structured output, torch-free: what a request asks its output to obey (`ResponseFormat`), and what the engine
needs from a compiled grammar and its per-request matcher (the runtime's `service.runtime.structured` builds them
with xgrammar, off the engine loop).

The engine never compiles: a `RequestSpec` arrives with its grammar compiled (`spec.grammar`). Each request then
owns one matcher, made when the request is created and advanced by the engine on every sampled token, so a
preempted request (which keeps its output tokens and never re-samples them) keeps a matcher in step with its
output; the runner re-syncs a matcher that fell out of step by replaying the output into a fresh one.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adapters.errors import quote

# Bounds on what one request may ask for, checked before any compile work.
MAX_FORMAT_BYTES = 65536  # json_schema, regex, grammar: UTF-8 bytes of the text
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024


class FormatKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"
    # An xgrammar structural tag as JSON: free text with tagged parts that follow schemas (a chat's tool calls,
    # `service.api.tools`)
    STRUCTURAL_TAG = "structural_tag"


@dataclass(frozen=True)
class ResponseFormat:
    """One constraint: `kind` and its text (the schema's JSON, the regex, the grammar; for CHOICE the JSON list of
    choices, so every kind is keyed the same way). Build CHOICE with `ResponseFormat.choice`."""

    kind: FormatKind
    text: str = ""

    def __post_init__(self) -> None:
        kind = FormatKind(self.kind)
        object.__setattr__(self, "kind", kind)
        if not isinstance(self.text, str):
            raise TypeError(f"response_format text must be a string, not {type(self.text).__name__}")
        size = len(self.text.encode("utf-8", "surrogatepass"))
        if size > MAX_FORMAT_BYTES:
            raise ValueError(f"response_format.{kind.value} has {size} bytes (UTF-8); at most {MAX_FORMAT_BYTES} "
                             "are allowed")
        if kind is FormatKind.JSON_OBJECT:
            if self.text:
                raise ValueError("response_format.json_object takes no text")
        elif kind is FormatKind.CHOICE:
            _check_choices(json.loads(self.text) if self.text else [])
        elif not self.text:
            raise ValueError(f"response_format.{kind.value} is empty: give a {_WHAT[kind]}")

    @classmethod
    def choice(cls, choices: Sequence[str]) -> ResponseFormat:
        choices = list(choices)
        _check_choices(choices)
        return cls(FormatKind.CHOICE, json.dumps(choices, ensure_ascii=False))

    @property
    def choices(self) -> list[str]:
        """The allowed strings of a CHOICE format."""
        if self.kind is not FormatKind.CHOICE:
            raise ValueError(f"a {self.kind.value} format has no choices")
        return json.loads(self.text)

    @property
    def key(self) -> str:
        """What compiled grammars are cached by: a hash of (kind, text)."""
        return hashlib.sha256(f"{self.kind.value}\0{self.text}".encode("utf-8", "surrogatepass")).hexdigest()

    @property
    def field(self) -> str:
        """Where the format came from in the request, for messages (a chat's tools make a structural tag)."""
        return "messages.tools" if self.kind is FormatKind.STRUCTURAL_TAG else f"response_format.{self.kind.value}"

    def describe(self) -> str:
        """Short, for logs and error messages."""
        return f"{self.kind.value} {quote(self.text, 60)}" if self.text else self.kind.value


_WHAT = {FormatKind.JSON_SCHEMA: "JSON Schema document", FormatKind.REGEX: "regular expression",
         FormatKind.GRAMMAR: "grammar with a root rule", FormatKind.STRUCTURAL_TAG: "structural tag"}


def _check_choices(choices: Any) -> None:
    if not isinstance(choices, list) or not choices:
        raise ValueError("response_format.choice.choices is empty: give at least one string")
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"response_format.choice.choices has {len(choices)} strings; at most {MAX_CHOICES} "
                         "are allowed")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c or len(c) > MAX_CHOICE_CHARS:
            raise ValueError(f"response_format.choice.choices[{i}]={quote(c)} is invalid: each choice must be a "
                             f"non-empty string of at most {MAX_CHOICE_CHARS} characters")


class FormatDeadEnd(Exception):
    """A request's response format allows no token of the model's vocabulary here (e.g. it needs a word the
    vocabulary cannot spell): the request ends with this message, as INVALID_ARGUMENT."""


class GrammarMatcherLike(Protocol):
    """One request's position in its grammar."""

    def accept_token(self, token_id: int) -> bool:
        """Advance over the sampled token; False if the grammar does not allow it (the state is unchanged)."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete and its end (a stop token) was accepted: the request is done."""
        ...

    def allows_any_token(self) -> bool:
        """Some token of the vocabulary may come next (False: a dead end, where the sampler had nothing left)."""
        ...


class CompiledGrammarLike(Protocol):
    """A format compiled for this model's vocabulary, shared by every request that uses the same format."""

    format: ResponseFormat

    def matcher(self) -> GrammarMatcherLike:
        """A fresh matcher at the grammar's start."""
        ...
