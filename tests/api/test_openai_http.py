"""The OpenAI-compatible HTTP front over a real socket, called with the official `openai` client, on the tiny
model: chat and completions (unary and streamed), models, adapters by `model`, the same answers as gRPC, every
kind of bad input with its status and OpenAI's error shape, a client that disconnects mid-stream (cancelled and
billed as such), usage rows and spans that name the front, health and the gateway's metrics. (Choices and
sampling extras: test_openai_choices.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.loop import wait_until
from tests.api import openai_front
from tests.api.conftest import Server
from tests.api.openai_front import ALICE, CHAT, GREEDY, client, grpc_alice, post


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    yield from openai_front.serve(tiny, tmp_path_factory.mktemp("http"))


# ---- answers ----------------------------------------------------------------------------------------------
def test_chat_unary_and_streamed_with_usage_in_the_last_chunk(served):
    c = client(served)
    r = c.chat.completions.create(model=served.model, messages=CHAT, **GREEDY)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and len(text.split()) == 8
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    chunks = list(c.chat.completions.create(model=served.model, messages=CHAT, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    # vLLM's continuous_usage_stats: every chunk carries the usage so far, the last one the call's
    chunks = list(c.chat.completions.create(model=served.model, messages=CHAT, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}, **GREEDY))
    so_far = [ch.usage.completion_tokens for ch in chunks[:-1]]
    assert so_far == sorted(so_far) and so_far[-1] == 8 and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage.prompt_tokens == r.usage.prompt_tokens for ch in chunks)
    served.wait_idle_and_intact()


def test_completions_text_and_token_ids_and_logprobs(served):
    c = client(served)
    r = c.completions.create(model=served.model, prompt="t9 t10", logprobs=2, **GREEDY)
    ch = r.choices[0]
    assert r.object == "text_completion" and len(ch.text.split()) == 8 and ch.finish_reason == "length"
    assert len(ch.logprobs.tokens) == 8 and all(len(t) == 2 for t in ch.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    ids = served.stub.Tokenize(pb.TokenizeRequest(text="t9 t10"), metadata=grpc_alice(served)).token_ids
    by_ids = c.completions.create(model=served.model, prompt=list(ids), **GREEDY)
    assert by_ids.choices[0].text == ch.text
    streamed = list(c.completions.create(model=served.model, prompt="t9 t10", stream=True, **GREEDY))
    assert "".join(s.choices[0].text for s in streamed) == ch.text


def test_streamed_logprobs_offsets_are_the_unary_answers_whatever_each_chunk_holds(served):
    """text_offset of a streamed completion: each token at the sum of the lengths of the tokens before it, as in the
    unary answer, also in chunks of several tokens (speculative steps; a server's stream interval)."""
    c = client(served)
    unary = c.completions.create(model=served.model, prompt="t9 t10", logprobs=1, **GREEDY).choices[0].logprobs
    streamed = list(c.completions.create(model=served.model, prompt="t9 t10", logprobs=1, stream=True, **GREEDY))
    tokens = [t for s in streamed if s.choices[0].logprobs for t in s.choices[0].logprobs.tokens]
    offsets = [o for s in streamed if s.choices[0].logprobs for o in s.choices[0].logprobs.text_offset]
    assert tokens == unary.tokens and offsets == unary.text_offset
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_models_list_shows_the_base_model_and_the_adapters_by_reference(served):
    models = {m.id: m for m in client(served).models.list().data}
    assert served.model in models and "tiny-lora" in models
    assert models["tiny-lora"].owned_by == "local" and models["tiny-lora"].parent == served.model
    assert {m.model_extra["max_model_len"] for m in models.values()} == {512}  # as vLLM lists it


def test_an_adapter_selected_by_model_changes_the_output(served):
    c = client(served)
    base = c.completions.create(model=served.model, prompt="t20 t21 t22", temperature=0, max_tokens=12)
    lora = c.completions.create(model="tiny-lora", prompt="t20 t21 t22", temperature=0, max_tokens=12)
    assert base.choices[0].text != lora.choices[0].text
    assert lora.system_fingerprint.startswith("v-") and base.system_fingerprint is None
    stub_req = pb.GenerateRequest(text="t20 t21 t22", adapter="tiny-lora",
                                  sampling=pb.SamplingParams(temperature=0, max_tokens=12))
    assert served.stub.Generate(stub_req, metadata=grpc_alice(served)).text == lora.choices[0].text


@pytest.mark.parametrize("adapter", ["", "tiny-lora"])
def test_the_same_prompts_answer_identically_over_grpc_and_http(served, adapter):
    c = client(served)
    model = adapter or served.model
    for prompt in ("t5 t6 t7", "t30 t31", "t100 t3 t44 t45"):
        sampling = pb.SamplingParams(temperature=0, max_tokens=16)
        g_chat = served.stub.Generate(pb.GenerateRequest(
            adapter=adapter, messages=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER,
                                                                                content=prompt)]),
            sampling=sampling), metadata=grpc_alice(served))
        h_chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=16)
        assert h_chat.choices[0].message.content == g_chat.text
        assert h_chat.usage.prompt_tokens == g_chat.usage.input_tokens
        g_text = served.stub.Generate(pb.GenerateRequest(adapter=adapter, text=prompt, sampling=sampling),
                                      metadata=grpc_alice(served))
        h_text = c.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16)
        assert h_text.choices[0].text == g_text.text


def test_usage_rows_and_spans_name_the_front(served):
    served.spans.clear()
    r = client(served).chat.completions.create(model=served.model, messages=CHAT, user="end-user-7",
                                               extra_body={"labels": {"feature": "faq"}}, **GREEDY)
    g = served.stub.Generate(pb.GenerateRequest(text="t5", sampling=pb.SamplingParams(max_tokens=2)),
                             metadata=grpc_alice(served))
    row = served.server.ledger.get("req-" + r.id.removeprefix("chatcmpl-"))
    assert row.front == "http" and row.status == "ok" and row.output_tokens == 8
    assert row.labels == {"feature": "faq", "user": "end-user-7"} and row.tenant == "alice"
    assert served.server.ledger.get(g.request_id).front == "grpc"
    fronts = {dict(s.attributes)["loraserve.request.id"]: dict(s.attributes)["loraserve.front"]
              for s in served.spans.get_finished_spans()}
    assert fronts == {row.request_id: "http", g.request_id: "grpc"}


# ---- refusals -------------------------------------------------------------------------------------------
def test_a_wrong_key_is_401_and_no_key_too(served):
    with pytest.raises(openai.AuthenticationError) as info:
        client(served, key="not-a-key").chat.completions.create(model=served.model, messages=CHAT)
    assert info.value.status_code == 401 and "API key is not valid" in info.value.message
    r = post(served, "/v1/completions", b"{not json", key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"  # before the body
    assert client(served, key="nope").models.with_raw_response.list  # the endpoint exists
    with pytest.raises(openai.AuthenticationError):
        client(served, key="nope").models.list()


def test_an_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as info:
        client(served).chat.completions.create(model="no-such-adapter", messages=CHAT)
    assert "no-such-adapter" in info.value.message and info.value.code == "model_not_found"
    # bob's private adapter is exactly as unknown to alice
    r = post(served, "/v1/completions", {"model": "bob/secret", "prompt": "t5"})
    assert r.status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"temperature": -1}, 400, "temperature=-1.0 is invalid: must be a number >= 0"),
    ({"temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ({"top_p": 1.5}, 400, "top_p=1.5 is invalid"),
    ({"max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_tokens": 100000}, 400, "max_tokens=100000 is too large"),
    ({"n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ({"n": 65}, 400, "n: Input should be less than or equal to 64"),
    ({"messages": [{"role": "wizard", "content": "t5"}]}, 400, "messages[0].role"),
    ({"messages": []}, 400, "messages is empty"),
    ({"messages": "t5"}, 400, "messages: Input should be a valid array"),
    ({"stop": ["x"] * 17}, 400, "stop: List should have at most 16 items"),
    ({"tools": [{"type": "function"}]}, 400, "tools[0].function: Field required"),
    ({"functions": [{"name": "f"}]}, 400, "functions and function_call are not supported by this server: send tools"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, 400,
     "tools[0].function.name 'get weather' is invalid"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, 400,
     "tools[0].function.parameters must be an object schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "g"}}}, 400,
     "tool_choice.function.name 'g' is not one of the request's tools (f)"),
    ({"tool_choice": "required"}, 400, "tool_choice is set but tools is empty"),
    ({"add_generation_prompt": False}, 400, "add_generation_prompt=false is supported only with "
                                            "continue_final_message=true"),
    ({"continue_final_message": True}, 400, "continue_final_message needs the last message to be the assistant's"),
    ({"include_stop_str_in_output": "yes"}, 400, "include_stop_str_in_output: Input should be a valid boolean"),
    ({"tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}}, 400,
     'tools cannot be combined with a response format (response_format, structured_outputs or guided_*): the '
     'answer\'s tool calls follow the tools\' schemas (set tool_choice to "none"'),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "guided_regex": "t5"}, 400,
     "tools cannot be combined with a response format"),
    ({"messages": [*CHAT, {"role": "assistant", "content": "t9"}], "continue_final_message": True,
      "response_format": {"type": "json_object"}}, 400,
     "continue_final_message cannot be combined with a response format (response_format, structured_outputs or "
     "guided_*): the format would hold the continuation alone"),
    ({"messages": [*CHAT, {"role": "assistant", "content": "t9"}], "continue_final_message": True,
      "guided_regex": "t5"}, 400, "continue_final_message cannot be combined with a response format"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
     "messages[0].tool_calls[0].function.arguments is not JSON"),
    ({"top_logprobs": 3}, 400, "top_logprobs needs logprobs=true"),
    ({"user": "bad\nuser"}, 400, "labels['user'] is invalid"),
    ({"priority": -5}, 403, "needs the admin role"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     400, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"logit_bias": {"abc": 1}}, 400, "logit_bias key 'abc' is invalid: each key must be a token id"),
    ({"logit_bias": {"-3": 1}}, 400, "logit_bias key '-3' is invalid"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias[5]=101.0 is invalid: each bias must be a number in "
                                      "[-100, 100]"),
    ({"logit_bias": {"5": "up"}}, 400, "logit_bias.5: Input should be a valid number"),
    ({"logit_bias": {"999": 1}}, 400, "logit_bias has token id 999, outside the vocabulary"),
    ({"logit_bias": {"5": 1, "05": 2}}, 400, "logit_bias has token id 5 twice (as '05' too)"),
])
def test_bad_chat_input_gets_its_status_and_names_the_field(served, body, status, words):
    full = {"model": served.model, "messages": CHAT, **body}
    r = post(served, "/v1/chat/completions", full)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert err["type"] and r.headers["x-request-id"].startswith("req-")


@pytest.mark.parametrize("body, param, words", [
    ({"temperature": -1}, "temperature", "temperature=-1.0 is invalid"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens: Input should be"),
    ({"prompt": ""}, "prompt", "prompt is empty"),  # the shared path's `text is empty`, in the body's words
    ({"prompt": [5, 900]}, "prompt", "prompt[1]=900 is outside the vocabulary"),  # its `token_ids.ids[1]`
    ({"model": "Bad Name"}, "model", "model is invalid"),  # its `adapter is invalid`
    ({"logit_bias": {"x": 1}}, "logit_bias", "logit_bias key 'x' is invalid"),
    ({"prompt": ["t5"] * 5, "n": 16}, None, "5 prompts with n=16 make 80 choices"),  # no one field to blame
])
def test_a_refusal_names_the_body_field_in_its_words_and_in_param(served, body, param, words):
    r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", **body})
    err = r.json()["error"]
    assert r.status_code == 400 and words in err["message"] and err["param"] == param, err


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools", "tools[1].function.name 'f' is given "
     "twice"),
    ({"tool_choice": "auto"}, "tool_choice", "tool_choice is set but tools is empty"),  # the proto's messages.*
])
def test_a_chat_refusal_names_the_tools_field_in_the_bodys_words(served, body, param, words):
    r = post(served, "/v1/chat/completions", {"model": served.model, "messages": CHAT, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and words in err["message"] and err["param"] == param, err
    assert "messages." not in err["message"], err


def test_malformed_json_wrong_content_type_and_oversize_bodies(served):
    r = post(served, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "Invalid JSON" in r.json()["error"]["message"]
    r = post(served, "/v1/chat/completions", b"[1, 2]")
    assert r.status_code == 400 and "body: Input should be an object" in r.json()["error"]["message"]
    r = httpx.post(served.base_url + "/v1/completions", content=b"model=x",
                   headers={"authorization": f"Bearer {ALICE}", "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "must be JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": served.model, "prompt": "t5 " * (3 * 2**20)})
    r = post(served, "/v1/completions", big)
    assert r.status_code == 413 and "at most 4194304 are allowed" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"x" * 2**20

    r = httpx.post(served.base_url + "/v1/completions", content=chunks(),
                   headers={"authorization": f"Bearer {ALICE}", "content-type": "application/json"})
    assert r.status_code == 413
    r = post(served, "/v1/nothing", {})
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    assert httpx.get(served.base_url + "/v1/completions").status_code == 405
    assert httpx.get(served.base_url + "/health").json() == {"status": "serving"}


def test_over_the_tenants_concurrency_429_with_retry_after_and_a_deadline_is_504(served):
    served.hold()
    try:
        c = client(served)
        streams = [c.chat.completions.create(model=served.model, messages=CHAT, stream=True, **GREEDY)
                   for _ in range(2)]  # alice's limit: 2 in flight
        r = post(served, "/v1/chat/completions", {"model": served.model, "messages": CHAT})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "max_concurrent_requests=2" in r.json()["error"]["message"]
        for s in streams:
            s.close()
        assert wait_until(lambda: served.server.generations.limiter.in_flight("alice") == 0, 10)
        r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", "max_tokens": 4},
                 **{"x-request-timeout": "0.3"})
        assert r.status_code == 504 and "deadline passed" in r.json()["error"]["message"]
        r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5"}, **{"x-request-timeout": "-1"})
        assert r.status_code == 400 and "x-request-timeout" in r.json()["error"]["message"]
    finally:
        served.resume()
    served.wait_idle_and_intact()


def test_a_client_that_disconnects_mid_stream_cancels_and_is_billed_cancelled(served):
    stream = client(served).chat.completions.create(model=served.model, messages=CHAT, stream=True, temperature=0,
                                                    max_tokens=400, extra_body={"min_tokens": 400})
    rid = stream.response.headers["x-request-id"]
    chunks = [next(stream) for _ in range(3)]  # a few tokens arrived ...
    assert all(ch.choices[0].delta.content for ch in chunks)
    served.hold()  # (so that it is surely still running when ...)
    try:
        stream.close()  # ... the client hangs up: the request stops long before its 400 tokens
        assert wait_until(lambda: served.server.ledger.get(rid) is not None, 10)
    finally:
        served.resume()
    row = served.server.ledger.get(rid)
    assert row.status == "cancelled" and row.front == "http" and 3 <= row.output_tokens < 400
    served.wait_idle_and_intact()
    assert client(served).completions.create(model=served.model, prompt="t5", max_tokens=2).choices


def test_a_client_gone_while_its_request_waits_cancels_it(served):
    served.hold()  # the request is queued and produces nothing
    try:
        with httpx.stream("POST", served.base_url + "/v1/completions", timeout=30,
                          json={"model": served.model, "prompt": "t5", "stream": True, "max_tokens": 8},
                          headers={"authorization": f"Bearer {ALICE}"}) as r:
            rid = r.headers["x-request-id"]
        assert wait_until(lambda: served.server.ledger.get(rid) is not None, 10)
    finally:
        served.resume()
    row = served.server.ledger.get(rid)
    assert row.status == "cancelled" and row.output_tokens == 0 and row.front == "http"
    assert wait_until(lambda: served.server.generations.limiter.in_flight("alice") == 0, 10)
    served.wait_idle_and_intact()


def test_a_reader_that_stops_reading_is_cut_off_by_the_stall_watchdog(served):
    """A client that stops reading leaves the server's write waiting for ever (uvicorn waits for the socket to
    drain). Loopback buffers take more than the tiny model can write, so the app is called as uvicorn calls it,
    with a `send` whose body writes never complete: the watchdog must cancel the call and the request."""
    body = json.dumps({"model": served.model, "messages": CHAT, "stream": True, "max_tokens": 200,
                       "min_tokens": 200, "temperature": 0}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer " + ALICE.encode()),
                         (b"content-length", str(len(body)).encode())]}
    statuses = []

    async def run() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client never hangs up
            return {}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif message.get("body"):
                served.server.loop.hold()  # the request stays unfinished while its writer waits
                await asyncio.Event().wait()  # ... and never reads

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(served.server.http.server.config.app(scope, receive, send), 30)

    served.server.watchdog.timeout_s, before = 0.3, served.server.watchdog.timeout_s
    stalls = served.server.metrics.client_stalls.labels("write")._value.get()
    cancelled = served.server.ledger.query(tenant="alice", group_by="tenant")[0][0].cancelled_requests
    try:
        asyncio.run(run())
    finally:
        served.server.watchdog.timeout_s = before
        served.resume()
    assert statuses == [200]
    assert wait_until(lambda: served.server.metrics.client_stalls.labels("write")._value.get() == stalls + 1, 5)
    served.wait_idle_and_intact()
    rows, _ = served.server.ledger.query(tenant="alice", group_by="tenant")
    assert rows[0].cancelled_requests == cancelled + 1


# ---- health, drain, metrics -----------------------------------------------------------------------------
def test_gateway_metrics_on_the_http_port_name_running_adapters_by_reference(served):
    served.server.loop.hold(after_steps=2)  # the request runs (a prefill and a decode step), then stays
    try:
        stream = client(served).completions.create(model="tiny-lora", prompt="t5", stream=True, max_tokens=40,
                                                   extra_body={"min_tokens": 40})
        assert wait_until(lambda: 'running_lora_adapters="tiny-lora"' in
                          httpx.get(served.base_url + "/metrics").text, 10)
        text = httpx.get(served.base_url + "/metrics").text
        for name, kind in (("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                           ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:lora_requests_info", "gauge")):
            assert f"# TYPE {name} {kind}" in text
        assert 'vllm:num_requests_running{model_name="' in text and 'max_lora="' in text
        stream.close()
    finally:
        served.resume()
    served.wait_idle_and_intact()


def test_draining_answers_503_and_health_says_so(tiny, tmp_path):
    s = Server(tiny[0], tmp_path / "data", server={"http_port": 0}, drain_grace_s=5)
    base = f"http://127.0.0.1:{s.server.http_port}"
    try:
        s.hold()
        # ignore_eos: the random tiny model may sample EOS (a "stop" finish); this test wants the stream to run to
        # its length within the grace
        stream = httpx.stream("POST", base + "/v1/completions", timeout=30,
                              json={"model": s.server.base_model, "prompt": "t5", "stream": True, "max_tokens": 3,
                                    "ignore_eos": True})
        response = stream.__enter__()
        done = threading.Thread(target=s.server.shutdown, kwargs={"grace_s": 5})
        done.start()
        assert wait_until(lambda: s.server._draining, 5)
        h = httpx.get(base + "/health")
        assert h.status_code == 503 and h.json() == {"status": "draining"}
        r = httpx.post(base + "/v1/completions", json={"model": s.server.base_model, "prompt": "t5"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        s.resume()  # the running stream finishes within the grace
        body = response.read().decode()
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body
        stream.__exit__(None, None, None)
        done.join(30)
        assert not done.is_alive()
    finally:
        s.server.loop.resume()
        s.channel.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health", timeout=2)
    time.sleep(0)


def readme_protocol_table() -> dict[str, str]:
    """{metric: type} of the model-server protocol table in the README."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Scale out behind the inference gateway", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(vllm:[a-z_]+)` \| (\w+) \|", section, flags=re.M)
    return dict(rows)


def test_metric_names_and_types_match_the_readme_protocol_table(served):
    table = readme_protocol_table()
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
            "vllm:lora_requests_info"} <= set(table)
    text = httpx.get(served.base_url + "/metrics").text
    exported = dict(re.findall(r"^# TYPE (vllm:\w+) (\w+)$", text, flags=re.M))
    assert exported == table
    assert re.search(r'^vllm:cache_config_info\{block_size="\d+",num_gpu_blocks="\d+"\} 1\.0$', text, flags=re.M)
    side = httpx.get(f"http://127.0.0.1:{served.server.metrics_port}/metrics").text  # the side port: the same
    assert dict(re.findall(r"^# TYPE (vllm:\w+) (\w+)$", side, flags=re.M)) == table
