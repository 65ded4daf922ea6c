"""Every kind of bad input gets a clear status: the right code, a message naming the field and what is
allowed. Never UNKNOWN or INTERNAL. Each case is checked over unary and streaming."""

from __future__ import annotations

import grpc
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from tests.api.conftest import Server, rpc_error

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
USER = pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = Server(tiny[0], tmp_path_factory.mktemp("data"), adapter=tiny[1])
    yield s
    s.close()


def sp(**kw) -> pb.SamplingParams:
    return pb.SamplingParams(**kw)


def tool(name: str, parameters: str = "", description: str = "") -> pb.Tool:
    return pb.Tool(name=name, parameters=parameters, description=description)


def chat(*messages: pb.ChatMessage, **kw) -> pb.ChatMessages:
    return pb.ChatMessages(messages=list(messages) or [USER], **kw)


def calling(name: str = "f", arguments: str = "{}") -> pb.ChatMessage:
    return pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="c1", name=name,
                                                                               arguments=arguments)])


USER_CALLING = pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5", tool_calls=[pb.ToolCall(id="c1", name="f")])


# (what is bad, request fields, code, fragments the message must contain)
CASES = [
    ("no prompt at all", {}, INVALID, ["prompt is missing", "text, messages or token_ids"]),
    ("empty text", {"text": ""}, INVALID, ["text is empty"]),  # a oneof member is sent even when ""
    ("text with no tokens", {"text": "   "}, INVALID, ["tokenizes to no tokens"]),
    ("empty token ids", {"token_ids": pb.TokenIds()}, INVALID, ["token_ids.ids is empty"]),
    ("token id past the vocabulary", {"token_ids": pb.TokenIds(ids=[5, 500])}, INVALID,
     ["token_ids.ids[1]=500", "[0, 127]"]),
    ("prompt longer than the context", {"text": " ".join(["t9"] * 600)}, INVALID,
     ["600 tokens", "context window of 512", "at most 511"]),
    ("max_tokens beyond the context", {"text": "t5 t6", "sampling": sp(max_tokens=100000)}, INVALID,
     ["sampling.max_tokens=100000", "at most 510"]),
    ("max_tokens zero", {"text": "t5", "sampling": sp(max_tokens=0)}, INVALID, ["sampling.max_tokens=0", ">= 1"]),
    ("negative temperature", {"text": "t5", "sampling": sp(temperature=-1)}, INVALID,
     ["sampling.temperature=-1", ">= 0"]),
    ("NaN temperature", {"text": "t5", "sampling": sp(temperature=float("nan"))}, INVALID,
     ["sampling.temperature=nan"]),
    ("top_p above 1", {"text": "t5", "sampling": sp(top_p=1.5)}, INVALID, ["sampling.top_p=1.5", "(0, 1]"]),
    ("top_p zero", {"text": "t5", "sampling": sp(top_p=0)}, INVALID, ["sampling.top_p=0", "(0, 1]"]),
    ("min_p above 1", {"text": "t5", "sampling": sp(min_p=2)}, INVALID, ["sampling.min_p=2", "[0, 1]"]),
    ("repetition_penalty zero", {"text": "t5", "sampling": sp(repetition_penalty=0)}, INVALID,
     ["sampling.repetition_penalty=0", "> 0"]),
    ("presence_penalty out of range", {"text": "t5", "sampling": sp(presence_penalty=3)}, INVALID,
     ["sampling.presence_penalty=3", "[-2, 2]"]),
    ("frequency_penalty out of range", {"text": "t5", "sampling": sp(frequency_penalty=-5)}, INVALID,
     ["sampling.frequency_penalty=-5", "[-2, 2]"]),
    ("seed too large", {"text": "t5", "sampling": sp(seed=2**63)}, INVALID, ["sampling.seed", "2**63"]),
    ("min_tokens above max_tokens", {"text": "t5", "sampling": sp(max_tokens=10, min_tokens=20)}, INVALID,
     ["sampling.min_tokens=20", "max_tokens=10"]),
    ("too many logprobs", {"text": "t5", "sampling": sp(logprobs=21)}, INVALID, ["sampling.logprobs=21", "[0, 20]"]),
    ("too many prompt logprobs", {"text": "t5", "sampling": sp(prompt_logprobs=21)}, INVALID,
     ["sampling.prompt_logprobs=21", "[0, 20]"]),
    ("unknown speculation", {"text": "t5", "sampling": sp(speculation=9)}, INVALID,
     ["sampling.speculation=9", "SPECULATION_OFF, SPECULATION_NGRAM, SPECULATION_DRAFT"]),
    ("draft speculation without a draft model", {"text": "t5", "sampling": sp(speculation=pb.SPECULATION_DRAFT)},
     INVALID, ["sampling.speculation='draft' is not available", "no draft model"]),
    ("max_draft_tokens zero", {"text": "t5", "sampling": sp(max_draft_tokens=0)}, INVALID,
     ["sampling.max_draft_tokens=0", "[1, 16]"]),
    ("max_draft_tokens too large", {"text": "t5", "sampling": sp(max_draft_tokens=17)}, INVALID,
     ["sampling.max_draft_tokens=17", "[1, 16]"]),
    ("logit bias token id past the vocabulary", {"text": "t5", "sampling": sp(logit_bias={5: 1.0, 300: -100})},
     INVALID, ["sampling.logit_bias has token id 300, outside the vocabulary", "[0, 127]"]),
    ("logit bias over 100", {"text": "t5", "sampling": sp(logit_bias={5: 150})}, INVALID,
     ["sampling.logit_bias[5]=150.0 is invalid", "[-100, 100]"]),
    ("logit bias NaN", {"text": "t5", "sampling": sp(logit_bias={5: float("nan")})}, INVALID,
     ["sampling.logit_bias[5]=nan is invalid"]),
    ("1025 logit bias entries", {"text": "t5", "sampling": sp(logit_bias={i: 1.0 for i in range(1025)})}, INVALID,
     ["sampling.logit_bias has 1025 entries", "at most 1024"]),
    ("empty stop string", {"text": "t5", "stop": [""]}, INVALID, ["stop=''", "non-empty"]),
    ("too many stop strings", {"text": "t5", "stop": [f"s{i}" for i in range(17)]}, INVALID,
     ["stop", "at most 16"]),
    ("stop token id past the vocabulary", {"text": "t5", "stop_token_ids": [1000]}, INVALID,
     ["stop_token_ids[0]=1000", "[0, 127]"]),
    ("priority out of range", {"text": "t5", "priority": 5000}, INVALID, ["priority=5000", "[-1000, 1000]"]),
    ("client request id too long", {"text": "t5", "client_request_id": "x" * 200}, INVALID,
     ["client_request_id", "128 printable ASCII"]),
    ("client request id not printable", {"text": "t5", "client_request_id": "a\nb"}, INVALID,
     ["client_request_id"]),
    ("no chat messages", {"messages": pb.ChatMessages()}, INVALID, ["messages.messages is empty"]),
    ("chat role unset", {"messages": pb.ChatMessages(messages=[pb.ChatMessage(content="t5")])}, INVALID,
     ["messages.messages[0].role is CHAT_ROLE_UNSPECIFIED", "CHAT_ROLE_USER"]),
    ("chat role unknown number", {"messages": pb.ChatMessages(messages=[USER, pb.ChatMessage(role=9, content="x")])},
     INVALID, ["messages.messages[1].role is 9"]),
    *[(bad, {"messages": messages}, INVALID, fragments) for bad, messages, fragments in [
        ("tool name with a space", chat(tools=[tool("get weather")]),
         ["messages.tools[0].name 'get weather' is invalid", "1-64 characters from a-z, A-Z, 0-9, '_' and '-'"]),
        ("two tools of one name", chat(tools=[tool("f"), tool("f")]),
         ["messages.tools[1].name 'f' is given twice"]),
        ("tool parameters that are not JSON", chat(tools=[tool("f", "{type")]),
         ["messages.tools[0].parameters is not JSON"]),
        ("tool parameters that are not a valid schema", chat(tools=[tool("f", '{"type": 5}')]),
         ["messages.tools[0].parameters is not a valid JSON Schema"]),
        ("tool parameters that are not an object schema", chat(tools=[tool("f", '{"type": "array"}')]),
         ["messages.tools[0].parameters must be an object schema"]),
        ("129 tools", chat(tools=[tool(f"f{i}") for i in range(129)]),
         ["messages.tools has 129 tools; at most 128 are allowed"]),
        ("tool_choice without tools", chat(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
         ["messages.tool_choice is set but messages.tools is empty"]),
        ("tool_choice naming a function the request lacks",
         chat(tools=[tool("f")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="g")),
         ["messages.tool_choice.function 'g' is not one of the request's tools (f)"]),
        ("tool_choice function with mode auto",
         chat(tools=[tool("f")], tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO, function="f")),
         ["messages.tool_choice.function is set, but the mode is TOOL_CHOICE_MODE_AUTO"]),
        ("tool_choice mode of unknown number", chat(tools=[tool("f")], tool_choice=pb.ToolChoice(mode=9)),
         ["messages.tool_choice.mode=9 is invalid", "TOOL_CHOICE_MODE_REQUIRED"]),
        ("a user message with tool calls", chat(USER_CALLING),
         ["messages.messages[0] has tool_calls but its role is user"]),
        ("a user message answering a call", chat(pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5",
                                                                tool_call_id="c1")),
         ["messages.messages[0] has a tool_call_id but its role is user"]),
        ("a call's arguments that are not JSON", chat(USER, calling(arguments="{oops")),
         ["messages.messages[1].tool_calls[0].arguments is not JSON"]),
        ("a call's arguments that are a list", chat(USER, calling(arguments="[1]")),
         ["messages.messages[1].tool_calls[0].arguments must be a JSON object, not list"]),
        ("a call of a badly named tool", chat(USER, calling(name="f()")),
         ["messages.messages[1].tool_calls[0].name 'f()' is invalid"]),
        ("a call id of 257 characters", chat(USER, pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, tool_calls=[
            pb.ToolCall(id="c" * 257, name="f")])),
         ["messages.messages[1].tool_calls[0].id has 257 characters; at most 256 are allowed"]),
        ("a tool_call_id of 257 characters", chat(pb.ChatMessage(role=pb.CHAT_ROLE_TOOL, content="t5",
                                                                 tool_call_id="c" * 257)),
         ["messages.messages[0].tool_call_id has 257 characters; at most 256 are allowed"]),
        ("65 calls in one message", chat(USER, pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT,
                                                              tool_calls=[pb.ToolCall(name="f")] * 65)),
         ["messages.messages[1].tool_calls has 65 calls; at most 64 are allowed"]),
        ("continuing a final message that is the user's", pb.ChatMessages(messages=[USER],
                                                                          continue_final_message=True),
         ["messages.continue_final_message needs the last message to be the assistant's answer begun"]),
        ("continuing an empty final message", pb.ChatMessages(messages=[USER, pb.ChatMessage(
            role=pb.CHAT_ROLE_ASSISTANT, content=" ")], continue_final_message=True),
         ["messages.continue_final_message needs", "with some text to go on from"]),
        ("tool descriptions over the prompt byte bound", chat(tools=[tool("f", description="x" * 9000)]),
         ["the messages' content (with their tool calls and the tools) has 9002 bytes", "at most 8192 bytes"]),
    ]],
    ("tools with a response format", {"messages": chat(tools=[tool("f")]), "response_format": pb.ResponseFormat(
        json_object=pb.ResponseFormat().json_object)}, INVALID,
     ["response_format cannot be combined with messages.tools", "TOOL_CHOICE_MODE_NONE"]),
    ("a response format for a continued final message",
     {"messages": pb.ChatMessages(messages=[USER, pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content="t9")],
                                  continue_final_message=True),
      "response_format": pb.ResponseFormat(regex="t1[0-9]")}, INVALID,
     ["response_format cannot be combined with messages.continue_final_message"]),
    ("required tool calls for a continued final message",
     {"messages": pb.ChatMessages(messages=[USER, pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, content="t9")],
                                  continue_final_message=True, tools=[tool("f")])}, INVALID,
     ["messages.tools cannot be combined with messages.continue_final_message"]),
    ("tools with min_tokens", {"messages": chat(tools=[tool("f")]), "sampling": sp(min_tokens=3)}, INVALID,
     ["sampling.min_tokens=3 cannot be combined with messages.tools"]),
    ("adapter path traversal", {"text": "t5", "adapter": "../x"}, INVALID, ["adapter is invalid", "'..'"]),
    ("adapter with two slashes", {"text": "t5", "adapter": "a/b/c"}, INVALID, ["adapter is invalid", "a/b"]),
    ("adapter name in capitals", {"text": "t5", "adapter": "Tiny-Lora"}, INVALID,
     ["adapter is invalid", "lowercase"]),
    ("adapter version malformed", {"text": "t5", "adapter": "tiny-lora@latest"}, INVALID,
     ["adapter is invalid", "version"]),
    ("unknown adapter", {"text": "t5", "adapter": "nope"}, NOT_FOUND, ["'nope' not found"]),
    ("adapter of another owner", {"text": "t5", "adapter": "acme/tiny-lora"}, NOT_FOUND, ["not found"]),
    ("unknown adapter version", {"text": "t5", "adapter": "tiny-lora@2"}, NOT_FOUND, ["has no version '2'"]),
    # Bounds on free-size fields (the tiny model's context is 512 tokens: 8192 prompt bytes by default).
    ("text over the prompt byte bound", {"text": "t5 " * 3000}, INVALID,
     ["text has 9000 bytes", "at most 8192 bytes", "16 per token", "512-token context window",
      "server.max_prompt_bytes"]),
    ("non-ASCII text over the prompt byte bound", {"text": "é" * 4100}, INVALID,
     ["text has 8200 bytes", "at most 8192 bytes"]),
    ("chat messages over the prompt byte bound", {"messages": pb.ChatMessages(messages=[
        pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5 " * 1000)] * 3)}, INVALID,
     ["messages' content has 9000 bytes (UTF-8) in total", "at most 8192 bytes"]),
    ("too many chat messages", {"messages": pb.ChatMessages(messages=[USER] * 1025)}, INVALID,
     ["messages has 1025 messages", "at most 1024"]),
    ("token ids over the context are counted before each id is checked",
     {"token_ids": pb.TokenIds(ids=[500] * 600)}, INVALID, ["600 tokens", "context window of 512"]),
    ("65 stop token ids", {"text": "t5", "stop_token_ids": list(range(65))}, INVALID,
     ["stop_token_ids has 65 entries", "at most 64"]),
    ("stop string too long", {"text": "t5", "stop": ["ok", "x" * 257]}, INVALID,
     ["stop[1]='xxx", "(257 chars)", "at most 256 characters"]),
    ("adapter reference too long", {"text": "t5", "adapter": "a" * 300}, INVALID,
     ["adapter is invalid", "more than 256 characters"]),
]


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
@pytest.mark.parametrize(("bad", "fields", "code", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_generate_request(server, rpc, bad, fields, code, fragments):
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    err = rpc_error(getattr(server.stub, rpc), cls(**fields), timeout=30)
    assert err.code() == code, f"{bad}: {err.code()} {err.details()}"
    for fragment in fragments:
        assert fragment in err.details(), f"{bad}: {fragment!r} not in {err.details()!r}"


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_a_1_mib_stop_string_gets_a_short_message(server, rpc):
    """The message quotes a bounded prefix: quoted whole it would overflow gRPC's trailing metadata."""
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    err = rpc_error(getattr(server.stub, rpc), cls(text="t5", stop=["x" * 2**20]), timeout=30)
    assert err.code() == INVALID, err.details()
    assert len(err.details().encode()) < 1024 and f"({2**20} chars)" in err.details()


def test_a_1_mib_client_request_id_gets_a_short_message(server):
    err = rpc_error(server.stub.Generate, pb.GenerateRequest(text="t5", client_request_id="x" * 2**20))
    assert err.code() == INVALID and len(err.details().encode()) < 1024 and "client_request_id" in err.details()


def test_tokenize_refuses_text_over_the_byte_bound_before_tokenizing(server):
    """3.9 MB of text used to cost a second of tokenizer work before its refusal; the bound comes first."""
    err = rpc_error(server.stub.Tokenize, pb.TokenizeRequest(text="t5 " * 1_300_000))
    assert err.code() == INVALID
    assert "text has 3900000 bytes" in err.details() and "at most 8192 bytes" in err.details()
    many = pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5 " * 1000)] * 3)
    err = rpc_error(server.stub.Tokenize, pb.TokenizeRequest(messages=many))
    assert err.code() == INVALID and "messages' content has 9000 bytes" in err.details()


def test_bad_input_leaves_no_request_behind(server):
    rpc_error(server.stub.Generate, pb.GenerateRequest(text="t5", sampling=sp(top_p=7)))
    server.wait_idle_and_intact()


def test_tokenize_needs_a_prompt(server):
    err = rpc_error(server.stub.Tokenize, pb.TokenizeRequest())
    assert err.code() == INVALID and "text or messages" in err.details()
    err = rpc_error(server.stub.Tokenize, pb.TokenizeRequest(messages=pb.ChatMessages()))
    assert err.code() == INVALID and "messages.messages is empty" in err.details()
