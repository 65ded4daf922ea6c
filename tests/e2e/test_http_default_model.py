"""`loraserve serve` as `make run` starts it (the default model, the demo tenants and adapters, the HTTP front),
called over HTTP with the official `openai` client: the answer, the demo adapters listed and applied by `model`,
a JSON schema answer, the same text as gRPC, and a clean drain on SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import openai
import pytest

from service.client import LoraServeClient
from tests.api.serve_process import ServeProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEY = "demo-alice-key-not-secret"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served():
    proc = ServeProcess("--http-port", "0", "--tenants", str(REPO / "service/demo/tenants.yaml"),
                        "--adapter", f"allcaps={REPO / 'adapters/demo/allcaps'}",
                        "--adapter", f"json={REPO / 'adapters/demo/json'}",
                        "--max-num-seqs", "4", "--kv-cache-gib", "0.25", "--drain-grace-s", "10", ready_timeout=600)
    proc.client = openai.OpenAI(base_url=f"http://127.0.0.1:{proc.http_port}/v1", api_key=KEY, max_retries=0,
                                timeout=300)
    yield proc
    code = proc.stop(signal.SIGTERM, timeout=120)
    proc.kill()
    assert code == 0, "\n".join(proc.lines[-20:])


def test_models_list_the_base_model_and_the_demo_adapters(served):
    ids = [m.id for m in served.client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct.Q4_1.gguf" and {"allcaps", "json"} <= set(ids)


def test_paris_over_http_as_over_grpc(served):
    model = served.client.models.list().data[0].id
    r = served.client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert text.startswith("The capital of France is Paris"), text
    with LoraServeClient(served.address, api_key=KEY, timeout=300) as c:
        assert c.generate(QUESTION, chat=True, temperature=0, max_tokens=24).text == text
    streamed = served.client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                     temperature=0, max_tokens=24, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text


def test_the_demo_adapters_by_model(served):
    caps = served.client.chat.completions.create(model="allcaps", temperature=0, max_tokens=32,
                                                 messages=[{"role": "user", "content": "Name a large animal."}])
    letters = [c for c in caps.choices[0].message.content if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.9
    js = served.client.chat.completions.create(model="json", temperature=0, max_tokens=48,
                                               messages=[{"role": "user", "content": "What is 2+2?"}])
    assert js.choices[0].message.content.lstrip().startswith('{"answer"')


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}


def test_a_tool_call_round_trip_with_the_official_client(served):
    """An agent's loop: the model is made to call the tool, the tool's result goes back as a tool message, and the
    next answer is text that uses it."""
    model = served.client.models.list().data[0].id
    ask = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    r = served.client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], tool_choice="required",
                                              parallel_tool_calls=False, temperature=0, max_tokens=48)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "rain"})}
    answer = served.client.chat.completions.create(
        model=model, messages=[*ask, choice.message.model_dump(exclude_none=True), result], tools=[WEATHER],
        temperature=0, max_tokens=48)
    assert answer.choices[0].message.tool_calls is None and "18" in answer.choices[0].message.content, answer


def test_a_streamed_tool_call_comes_as_it_is_written(served):
    """As OpenAI streams calls: the call's opening (index, id, name) in one chunk, then its arguments piece by piece
    in the chunks after it; joined, they are the unary answer's call."""
    model = served.client.models.list().data[0].id
    ask = [{"role": "user", "content": "Is it cold in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    unary = served.client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], tool_choice=named,
                                                  temperature=0, max_tokens=48)
    streamed = list(served.client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], temperature=0, tool_choice=named, max_tokens=48, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    chunks = streamed[:-1]  # the last one carries the call's usage alone
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    pieces = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
    assert len(pieces) >= 3  # the opening and more than one piece of arguments: streamed, not whole at the end
    opening, rest = pieces[0], pieces[1:]
    assert (opening.index, opening.type, opening.function.name) == (0, "function", "get_weather")
    assert opening.id.startswith("call_") and all(p.index == 0 and p.id is None for p in rest)
    arguments = opening.function.arguments + "".join(p.function.arguments for p in rest)
    assert arguments == unary.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(arguments) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the usage so far counts the tokens of the call too, whose text never came as content
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens == streamed[-1].usage.completion_tokens
    # auto: a question the tool does not answer gets a text answer, as it would without tools
    plain = served.client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                  tools=[WEATHER], temperature=0, max_tokens=24)
    assert plain.choices[0].message.tool_calls is None and "Paris" in plain.choices[0].message.content


def test_a_json_schema_answer_parses_and_obeys(served):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"]}
    model = served.client.models.list().data[0].id
    r = served.client.chat.completions.create(
        model=model, temperature=0, max_tokens=48, messages=[{"role": "user", "content": QUESTION}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city", "country"} and r.choices[0].finish_reason == "stop"
    metrics = httpx.get(f"http://127.0.0.1:{served.http_port}/metrics").text
    assert "vllm:num_requests_waiting" in metrics and "loraserve_num_requests_waiting" in metrics
