"""Structured output in the torch-free engine: the response format's bounds, and how the engine drives a request's
matcher (advance on every sampled token, STOP when the format ends, ERROR for a token the format refuses, the same
matcher across a preemption)."""

from __future__ import annotations

import json

import pytest

from service.engine.outputs import ErrorKind
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.structured import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_FORMAT_BYTES,
    FormatKind,
    ResponseFormat,
)
from service.engine.types import FinishReason
from tests.engine.fake_runner import EOS, ScriptedRunner, make_engine, prompt, reference_tokens


class CountingMatcher:
    """Takes any token but `refuse`; ends after `length` tokens, on EOS (as a grammar ends on its stop token)."""

    def __init__(self, length: int, refuse: int | None = None, dead_end: bool = False) -> None:
        self.length, self.refuse, self.dead_end, self.accepted = length, refuse, dead_end, []

    def allows_any_token(self) -> bool:
        return not self.dead_end

    def accept_token(self, token_id: int) -> bool:
        if token_id == self.refuse:
            return False
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return bool(self.accepted) and self.accepted[-1] == EOS and len(self.accepted) == self.length


class FakeGrammar:
    def __init__(self, length: int, refuse: int | None = None, dead_end: bool = False) -> None:
        self.format = ResponseFormat(FormatKind.REGEX, "x")
        self.length, self.refuse, self.dead_end, self.matchers = length, refuse, dead_end, []

    def matcher(self) -> CountingMatcher:
        m = CountingMatcher(self.length, self.refuse, self.dead_end)
        self.matchers.append(m)
        return m


def test_format_bounds_are_checked_naming_the_field():
    with pytest.raises(ValueError, match=f"response_format.regex has {MAX_FORMAT_BYTES + 1} bytes"):
        ResponseFormat(FormatKind.REGEX, "a" * (MAX_FORMAT_BYTES + 1))
    with pytest.raises(ValueError, match="response_format.json_schema is empty"):
        ResponseFormat(FormatKind.JSON_SCHEMA, "")
    with pytest.raises(ValueError, match="response_format.json_object takes no text"):
        ResponseFormat(FormatKind.JSON_OBJECT, "{}")
    with pytest.raises(ValueError, match="choices is empty"):
        ResponseFormat.choice([])
    with pytest.raises(ValueError, match=f"choices has {MAX_CHOICES + 1} strings"):
        ResponseFormat.choice(["a"] * (MAX_CHOICES + 1))
    with pytest.raises(ValueError, match=r"choices\[1\]=.* is invalid"):
        ResponseFormat.choice(["a", ""])
    with pytest.raises(ValueError, match=r"choices\[0\]=.* is invalid"):
        ResponseFormat.choice(["x" * (MAX_CHOICE_CHARS + 1)])
    with pytest.raises(ValueError):
        ResponseFormat("yaml", "a: 1")


def test_formats_are_keyed_by_kind_and_text():
    a = ResponseFormat(FormatKind.REGEX, "[a-z]")
    assert a.key == ResponseFormat(FormatKind.REGEX, "[a-z]").key
    assert a.key != ResponseFormat(FormatKind.GRAMMAR, "[a-z]").key
    assert ResponseFormat.choice(["a", "b"]).key != ResponseFormat.choice(["b", "a"]).key
    assert ResponseFormat.choice(["ü", "b"]).choices == ["ü", "b"]
    assert json.loads(ResponseFormat.choice(["a"]).text) == ["a"]


def test_min_tokens_with_a_format_is_refused():
    with pytest.raises(ValueError, match="min_tokens=2 cannot be combined with a response format"):
        RequestSpec("r", (1, 2), SamplingParams(min_tokens=2), grammar=FakeGrammar(3))


def test_the_matcher_sees_every_token_and_the_format_end_stops_the_request():
    p = prompt(9)
    free = reference_tokens(p, 4)
    script = {"c": free[:2] + [EOS]}
    engine = make_engine(runner=ScriptedRunner(script))
    g = FakeGrammar(3)
    engine.add_request(RequestSpec("c", tuple(p), SamplingParams(max_tokens=10, ignore_eos=True), grammar=g))
    engine.add_request(RequestSpec("f", tuple(p), SamplingParams(max_tokens=4)))
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.final is not None:
                finals[o.request_id] = o.final
    # ignore_eos does not keep a finished format going: the format's end is the request's end
    assert finals["c"].finish_reason is FinishReason.STOP and list(finals["c"].token_ids) == free[:2] + [EOS]
    assert g.matchers[0].accepted == free[:2] + [EOS]
    assert finals["f"].finish_reason is FinishReason.LENGTH
    engine.check_idle_integrity()


@pytest.mark.parametrize(("dead_end", "kind", "says"), [
    (False, ErrorKind.INTERNAL, "internal error"),  # the format allowed other tokens: a runner that did not mask
    (True, ErrorKind.FORMAT_DEAD_END, "allows no token of this model's vocabulary after 0 output tokens"),
])
def test_a_token_the_format_refuses_fails_only_that_request(dead_end, kind, says):
    p = prompt(7)
    first = reference_tokens(p, 1)[0]
    engine = make_engine()
    g = FakeGrammar(9, refuse=first, dead_end=dead_end)
    engine.add_request(RequestSpec("bad", tuple(p), SamplingParams(max_tokens=5), grammar=g))
    engine.add_request(RequestSpec("ok", tuple(p), SamplingParams(max_tokens=5)))
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.final is not None:
                finals[o.request_id] = o.final
    assert finals["bad"].finish_reason is FinishReason.ERROR
    assert finals["bad"].error.kind is kind and says in finals["bad"].error.message
    assert finals["ok"].finish_reason is FinishReason.LENGTH and list(finals["ok"].token_ids) == reference_tokens(p, 5)
    engine.check_idle_integrity()


def test_a_preempted_request_keeps_its_matcher_in_step_with_its_output():
    """Two long requests in a pool too small for both: one is preempted and recomputed, and its one matcher
    has accepted exactly its output tokens."""
    engine = make_engine(num_blocks=10, block_size=4, max_model_len=40)
    grammars = [FakeGrammar(99), FakeGrammar(99)]
    prompts = [prompt(8, seed=1), prompt(8, seed=2)]
    for i, g in enumerate(grammars):
        engine.add_request(RequestSpec(f"r{i}", tuple(prompts[i]), SamplingParams(max_tokens=20), grammar=g))
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.final is not None:
                finals[o.request_id] = o.final
    assert engine.stats.preemptions > 0
    for i, g in enumerate(grammars):
        assert len(g.matchers) == 1
        assert g.matchers[0].accepted == list(finals[f"r{i}"].token_ids) == reference_tokens(prompts[i], 20)
