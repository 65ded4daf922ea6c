"""response_format over gRPC on the tiny model (a word-level vocabulary t3..t127): constrained answers, each kind
of bad format refused with INVALID_ARGUMENT naming it, and a slow compile that neither holds up other requests nor
hurts the server.

The tiny tokenizer's decoder joins words with a space, so an answer's text may start with one: answers are compared
stripped (the default model's byte-level vocabulary has no such gap; tests/e2e checks its texts exactly). Its
formats avoid words with a shorter word as a prefix (t4 of t44): a format may allow such a prefix, whose rest no
word spells; a byte-level vocabulary can spell any rest."""

from __future__ import annotations

import json
import re
import threading
import time

import grpc
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.client import LoraServeClient, build_request
from service.engine.structured import MAX_CHOICES, MAX_FORMAT_BYTES
from tests.api.conftest import Server, rpc_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = Server(tiny[0], tmp_path_factory.mktemp("data"), adapter=tiny[1])
    yield s
    s.close()


def rf(**kw) -> pb.ResponseFormat:
    return pb.ResponseFormat(**kw)


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_choice_and_regex_answers_match_with_and_without_the_adapter(server, rpc):
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    cases = [(rf(choice=pb.Choice(choices=["t7", "t9", "t11"])), lambda t: t in {"t7", "t9", "t11"}),
             (rf(regex="t1[0-9]"), lambda t: re.fullmatch("t1[0-9]", t))]
    for fmt, check in cases:
        for adapter in ("", "tiny-lora"):
            for seed in range(3):
                req = cls(text="t5 t6", adapter=adapter, response_format=fmt,
                          sampling=pb.SamplingParams(temperature=1.0, seed=seed, max_tokens=8))
                if rpc == "Generate":
                    resp = server.stub.Generate(req, timeout=30)
                    text, reason = resp.text, resp.finish_reason
                else:
                    msgs = list(server.stub.GenerateStream(req, timeout=30))
                    text, reason = "".join(m.text for m in msgs), msgs[-1].finish_reason
                assert check(text.strip()), (fmt, adapter, text)
                assert reason == pb.FINISH_REASON_STOP
    server.wait_idle_and_intact()


def test_the_python_client_sends_each_format(server):
    client = LoraServeClient(server.target)
    try:
        assert client.generate("t5", choice=["t8", "t12"], temperature=1.0, seed=3).text.strip() in {"t8", "t12"}
        assert re.fullmatch("t2[0-9]", client.generate("t5", regex="t2[0-9]", max_tokens=4).text.strip())
        assert client.generate("t5", grammar='root ::= "t5" | "t8"').text.strip() in {"t5", "t8"}
    finally:
        client.close()
    req = build_request(pb.GenerateRequest, "t5", json_schema={"type": "integer"})
    assert json.loads(req.response_format.json_schema) == {"type": "integer"}
    assert build_request(pb.GenerateRequest, "t5", json_object=True).response_format.HasField("json_object")
    with pytest.raises(ValueError, match="at most one response format, not regex and choice"):
        build_request(pb.GenerateRequest, "t5", regex="a", choice=["b"])


BIG = "x" * (MAX_FORMAT_BYTES + 1)
# (what is bad, response_format, fragments the message must contain)
CASES = [
    ("response_format with no kind set", rf(), ["response_format is empty", "json_schema, json_object, regex"]),
    ("json_schema that is not JSON", rf(json_schema="{type: object"), ["json_schema is not JSON"]),
    ("json_schema that is a list", rf(json_schema="[1]"), ["json_schema must be a JSON object"]),
    ("json_schema with an unknown type", rf(json_schema='{"type": "strng"}'),
     ["json_schema is not a valid JSON Schema at type", "strng"]),
    ("json_schema with a remote $ref", rf(json_schema='{"$ref": "https://example.com/a.json"}'),
     ["$ref 'https://example.com/a.json'", "only references inside the schema"]),
    ("json_schema nested too deeply", rf(json_schema='{"items": ' * 2000 + "{}" + "}" * 2000),
     ["json_schema is nested too deeply"]),
    ("json_schema over the size bound", rf(json_schema=BIG),
     [f"response_format.json_schema has {MAX_FORMAT_BYTES + 1} bytes", f"at most {MAX_FORMAT_BYTES}"]),
    ("empty json_schema", rf(json_schema=""), ["response_format.json_schema is empty"]),
    ("regex that does not parse", rf(regex="(t5"), ["response_format.regex is invalid", "parenthesis is not closed"]),
    ("regex over the size bound", rf(regex=BIG), [f"response_format.regex has {MAX_FORMAT_BYTES + 1} bytes"]),
    ("grammar with an undefined rule", rf(grammar="root ::= answer"),
     ["response_format.grammar is invalid", 'Rule "answer" is not defined']),
    ("grammar with no root rule", rf(grammar='start ::= "t5"'), ["response_format.grammar is invalid"]),
    ("empty choice list", rf(choice=pb.Choice()), ["response_format.choice.choices is empty"]),
    ("empty choice string", rf(choice=pb.Choice(choices=["t5", ""])), ["response_format.choice.choices[1]=''"]),
    ("too many choices", rf(choice=pb.Choice(choices=["t5"] * (MAX_CHOICES + 1))),
     [f"choices has {MAX_CHOICES + 1} strings", f"at most {MAX_CHOICES}"]),
]


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize(("bad", "fmt", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_response_format(server, rpc, bad, fmt, fragments):
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    err = rpc_error(getattr(server.stub, rpc), cls(text="t5", response_format=fmt), timeout=30)
    assert err.code() == INVALID, f"{bad}: {err.code()} {err.details()}"
    for fragment in fragments:
        assert fragment in err.details(), f"{bad}: {fragment!r} not in {err.details()!r}"
    assert len(err.details().encode()) < 1024, bad


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_a_format_the_vocabulary_cannot_spell_is_refused(server, rpc):
    """Valid formats the tiny word-level vocabulary cannot follow: from the first token ("abc"), or after a word
    that is only a prefix of the format's ("t4" of "t4x"): INVALID_ARGUMENT naming the problem, never INTERNAL."""
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    for fmt in (rf(regex="abc"), rf(grammar='root ::= "t4x"')):
        err = rpc_error(getattr(server.stub, rpc), cls(text="t5", response_format=fmt), timeout=30)
        assert err.code() == INVALID, (fmt, err.details())
        assert f"response_format.{fmt.WhichOneof('format')} allows no token of this model's vocabulary" in \
            err.details()
    # a chat whose tools must be called: the vocabulary has no way to write `<tool_call>`
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5")],
                           tools=[pb.Tool(name="f")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED))
    err = rpc_error(getattr(server.stub, rpc), cls(messages=chat), timeout=30)
    assert err.code() == INVALID and "messages.tools allows no token of this model's vocabulary" in err.details()
    server.wait_idle_and_intact()


def test_min_tokens_with_a_response_format_is_refused(server):
    err = rpc_error(server.stub.Generate, pb.GenerateRequest(
        text="t5", response_format=rf(regex="t5"), sampling=pb.SamplingParams(min_tokens=2)))
    assert err.code() == INVALID and "sampling.min_tokens=2 cannot be combined with response_format" in err.details()
    server.wait_idle_and_intact()


def test_a_slow_compile_waits_alone_is_refused_after_the_bound_and_the_server_stays_healthy(tiny, tmp_path):
    """The compile of one request is held (as a slow grammar would be): meanwhile a free request runs to the end;
    after the bound the slow one gets INVALID_ARGUMENT, and the server keeps serving, constrained requests too."""
    s = Server(tiny[0], tmp_path / "data")
    structured = s.runtime.structured
    structured.compile_timeout_s = 2.0
    gate, started = threading.Event(), threading.Event()
    real = structured._compile_now

    def held(fmt):
        if fmt.text == "t4[0-9]":
            started.set()
            gate.wait(30)
        return real(fmt)

    structured._compile_now = held
    slow_result: dict = {}

    def slow_call():
        try:
            s.stub.Generate(pb.GenerateRequest(text="t5", response_format=rf(regex="t4[0-9]")), timeout=30)
        except grpc.RpcError as e:
            slow_result["code"], slow_result["details"] = e.code(), e.details()

    try:
        t = threading.Thread(target=slow_call)
        t0 = time.monotonic()
        t.start()
        assert started.wait(10)
        free = s.stub.Generate(pb.GenerateRequest(text="t5 t6", sampling=pb.SamplingParams(max_tokens=6, min_tokens=6)), timeout=30)
        assert len(free.token_ids) == 6 and time.monotonic() - t0 < 2.0  # served while the compile was held
        t.join(30)
        assert slow_result["code"] == INVALID
        assert "response_format.regex took longer than 2 s to compile" in slow_result["details"]
        client = LoraServeClient(s.target)
        assert client.health() == "SERVING"
        assert re.fullmatch("t1[0-9]", client.generate("t5", regex="t1[0-9]").text.strip())
        client.close()
    finally:
        gate.set()
        s.close()
