"""vLLM's /tokenize and /detokenize on the HTTP front: the same tokens as gRPC's Tokenize (a conversation's tools
included), a round trip back to the text, and each bad input refused naming what was wrong."""

from __future__ import annotations

import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from tests.api.openai_front import CHAT, grpc_alice, post, serve

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "t9 t10",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    yield from serve(tiny, tmp_path_factory.mktemp("tokenize"))


def grpc_tokenize(served, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
    return pb_grpc.InferenceServiceStub(served.channel).Tokenize(request, metadata=grpc_alice(served), timeout=30)


def test_a_prompt_tokenizes_as_over_grpc_and_detokenizes_back(served):
    r = post(served, "/tokenize", {"model": served.model, "prompt": "t5 t6 t7", "return_token_strs": True})
    assert post(served, "/tokenize", {"model": "tiny-lora", "prompt": "t5 t6 t7"}).json()["tokens"] == \
        r.json()["tokens"]  # an adapter tokenizes as its base model
    assert r.status_code == 200, r.text
    body = r.json()
    expected = grpc_tokenize(served, pb.TokenizeRequest(text="t5 t6 t7"))
    assert body == {"count": len(expected.token_ids), "max_model_len": 512, "tokens": list(expected.token_ids),
                    "token_strs": list(expected.tokens)}
    assert post(served, "/tokenize", {"prompt": "t5 t6 t7"}).json()["token_strs"] is None  # only when asked
    back = post(served, "/detokenize", {"model": served.model, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "t5 t6 t7"}


def test_a_conversation_with_tools_counts_the_tools_as_generation_does(served):
    plain = post(served, "/tokenize", {"messages": CHAT}).json()
    with_tools = post(served, "/tokenize", {"messages": CHAT, "tools": TOOLS, "tool_choice": "required"}).json()
    assert with_tools["count"] > plain["count"] > 3
    expected = grpc_tokenize(served, pb.TokenizeRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t5 t6 t7")],
        tools=[pb.Tool(name="get_weather", description="t9 t10",
                       parameters='{"type": "object", "properties": {"city": {"type": "string"}}}')],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED))))
    assert with_tools["tokens"] == list(expected.token_ids)


@pytest.mark.parametrize("path, body, status, words", [
    ("/tokenize", {}, 400, "give one of prompt (text) or messages (a conversation) to tokenize"),
    ("/tokenize", {"prompt": "t5", "messages": CHAT}, 400, "give one of prompt (text) or messages"),
    ("/tokenize", {"prompt": ""}, 400, "prompt is empty"),
    ("/tokenize", {"prompt": "t5 " * 3000}, 400, "prompt has 9000 bytes"),
    ("/tokenize", {"prompt": "t5", "add_generation_prompt": False}, 400, "add_generation_prompt=false is "
                                                                           "supported only with continue_final"),
    ("/tokenize", {"prompt": "t5", "tools": TOOLS}, 400, "tools needs a conversation: give messages, not prompt"),
    ("/tokenize", {"prompt": "t5", "continue_final_message": True}, 400, "continue_final_message needs a "
                                                                        "conversation"),
    ("/tokenize", {"model": "no-such-adapter", "prompt": "t5"}, 404, "no-such-adapter"),
    ("/detokenize", {"model": "no-such-adapter", "tokens": [5]}, 404, "no-such-adapter"),
    ("/tokenize", {"messages": CHAT, "tools": TOOLS * 2}, 400, "tools[1].function.name 'get_weather' is given twice"),
    ("/tokenize", {"messages": []}, 400, "messages is empty"),
    ("/detokenize", {"tokens": [5, 900]}, 400, "tokens[1]=900 is outside the vocabulary"),
    ("/detokenize", {"tokens": [5] * 512}, 400, "tokens has 512 ids; at most 511"),
    ("/detokenize", {"tokens": "t5"}, 400, "tokens: Input should be a valid array"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]: Input should be greater than or equal to 0"),
    ("/tokenize", {"prompt": "t5", "add_special_tokens": False}, 400, "add_special_tokens=false is not supported "
                                                                        "for a prompt"),
])
def test_bad_input_is_refused_naming_what_was_wrong(served, path, body, status, words):
    r = post(served, path, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.json()


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_a_call_without_a_key_is_401(served, path):
    r = post(served, path, {"prompt": "t5", "tokens": [5]}, key=None)
    assert r.status_code == 401 and "no credentials" in r.json()["error"]["message"]


def test_a_chat_that_continues_its_last_message_is_billed_the_tokens_tokenize_counts(served):
    """The prompt ends with the assistant's answer begun (no end of turn, no new turn): what /tokenize counts with
    continue_final_message is what the chat is billed."""
    begun = [*CHAT, {"role": "assistant", "content": "t9 t10"}]
    counted = post(served, "/tokenize", {"messages": begun, "continue_final_message": True,
                                         "add_generation_prompt": False}).json()
    opened = post(served, "/tokenize", {"messages": CHAT}).json()
    assert counted["tokens"][:len(opened["tokens"]) - 1] == opened["tokens"][:-1]  # the user's turn as before
    assert counted["tokens"][-2:] == post(served, "/tokenize", {"prompt": "t9 t10"}).json()["tokens"][-2:]
    r = post(served, "/v1/chat/completions", {"model": served.model, "messages": begun, "continue_final_message": True,
                                               "add_generation_prompt": False, "temperature": 0, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == counted["count"], r.text


def test_a_huge_list_of_bad_ids_is_refused_by_its_length_at_once(served):
    """A 4 MiB body of a million bad ids costs one error: the list's length is checked before its items (before,
    each bad id made an error of its own, seconds of work on the front's event loop)."""
    import time

    for path, body in (("/detokenize", {"tokens": [-1] * 1_000_000}),
                       ("/v1/completions", {"model": served.model, "prompt": [-1] * 1_000_000})):
        t = time.perf_counter()
        r = post(served, path, body)
        assert r.status_code == 400 and "List should have at most 262144 items" in r.text, r.text[:300]
        assert len(r.json()["error"]["message"]) < 300
        print(path, round(time.perf_counter() - t, 2), "s")  # informative only: no timed assertion


def test_a_chat_tokenizes_with_add_special_tokens_false_as_vllm_sends_it(served):
    plain = post(served, "/tokenize", {"messages": CHAT}).json()
    assert post(served, "/tokenize", {"messages": CHAT, "add_special_tokens": False}).json() == plain
