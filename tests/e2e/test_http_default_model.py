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
