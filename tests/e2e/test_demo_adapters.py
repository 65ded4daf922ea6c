"""The committed demo adapters (adapters/demo, made by `python -m adapters.demo.train`) served in one
batch with base-model requests on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "adapters" / "demo"
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What do bees make?"]


def upper_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


@pytest.fixture(scope="module")
def outputs():
    rt = build_runtime(RuntimeConfig(kv_cache_gib=0.25, max_model_len=2048), EngineConfig(),
                       AdapterConfig(max_active_adapters=2))
    caps, js = rt.add_local_adapter(DEMO / "allcaps"), rt.add_local_adapter(DEMO / "json")
    sp = SamplingParams(max_tokens=48, temperature=0)
    kinds = {"base": None, "allcaps": caps, "json": js}
    for q in QUESTIONS:
        ids = rt.tokenizer.encode_chat([{"role": "user", "content": q}])
        for kind, version in kinds.items():
            rt.engine.add_request(RequestSpec(f"{kind}:{q}", ids, sp, adapter_version=version))
    done = {}
    max_batch = 0
    while rt.engine.has_unfinished():
        max_batch = max(max_batch, rt.engine.stats.num_running)
        for o in rt.engine.step():
            if o.finished:
                done[o.request_id] = o.final
    assert max_batch >= 6  # the three kinds really shared steps
    return done


def test_allcaps_adapter_answers_in_capitals_beside_base_requests(outputs):
    for q in QUESTIONS:
        caps, base = outputs[f"allcaps:{q}"].text, outputs[f"base:{q}"].text
        assert upper_fraction(caps) >= 0.9, caps
        assert upper_fraction(base) < 0.5, base


def test_json_adapter_answers_with_one_json_object(outputs):
    for q in QUESTIONS:
        text = outputs[f"json:{q}"].text
        obj = json.loads(text)
        assert isinstance(obj, dict) and set(obj) == {"answer"} and obj["answer"], text


def test_the_capital_question_is_answered_right_by_all_three(outputs):
    q = QUESTIONS[0]
    assert "Paris" in outputs[f"base:{q}"].text
    assert "PARIS" in outputs[f"allcaps:{q}"].text
    assert "Paris" in json.loads(outputs[f"json:{q}"].text)["answer"]
