"""Structured output on the default model: sampled outputs under JSON schemas, regexes and choices all match their
format; constrained rows share a batch with free ones (and other adapters) without changing them; preemption,
prefix-cache hits and stop strings keep the matcher in step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from service.engine.structured import FormatKind, ResponseFormat
from service.engine.types import FinishReason
from tests.e2e.structured_schemas import SCHEMAS

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "adapters" / "demo"
NUM_SAMPLES = 200
CHECKER = jsonschema.FormatChecker()


@pytest.fixture(scope="module")
def rt():
    """The default model on its fast path (bfloat16), with the demo adapters registered."""
    runtime = build_runtime(RuntimeConfig(kv_cache_gib=0.5, max_model_len=2048), EngineConfig(max_num_seqs=64),
                            AdapterConfig(max_active_adapters=2))
    runtime.demo = {"allcaps": runtime.add_local_adapter(DEMO / "allcaps"),
                    "json": runtime.add_local_adapter(DEMO / "json")}
    return runtime


def ask(rt, question: str) -> list[int]:
    return rt.tokenizer.encode_chat([{"role": "user", "content": question}])


def schema_prompt(rt, schema: dict) -> list[int]:
    return ask(rt, f"Reply with one JSON value that follows this JSON schema: {json.dumps(schema)}")


def test_sampled_outputs_under_json_schemas_all_validate(rt):
    """200 generations at temperature 1.0 over 22 schemas, in one batched run: every one parses and validates."""
    names = sorted(SCHEMAS)
    grammars = {n: rt.structured.compile(ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(SCHEMAS[n])))
                for n in names}
    prompts = {n: schema_prompt(rt, SCHEMAS[n]) for n in names}
    picks = [names[i % len(names)] for i in range(NUM_SAMPLES)]
    params = [SamplingParams(max_tokens=160, temperature=1.0, seed=i) for i in range(NUM_SAMPLES)]
    outs = rt.engine.generate([prompts[n] for n in picks], params, grammars=[grammars[n] for n in picks])
    bad = []
    for name, out in zip(picks, outs, strict=True):
        try:
            value = json.loads(out.text)
            jsonschema.validate(value, SCHEMAS[name], format_checker=CHECKER)
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((name, out.finish_reason, out.text, str(e)[:200]))
        else:
            assert out.finish_reason is FinishReason.STOP, (name, out.text)
    assert not bad, f"{len(bad)} of {NUM_SAMPLES} outputs are not valid: {bad[:5]}"
    assert len({o.text for o in outs}) > NUM_SAMPLES // 2  # sampled, not one answer repeated
    rt.engine.check_idle_integrity()


def test_json_object_regex_and_choice_outputs_match(rt):
    formats = [
        (ResponseFormat(FormatKind.JSON_OBJECT), 'Reply with a JSON object like {"name": "Tom"} naming a cat.',
         lambda t: isinstance(json.loads(t), dict)),
        (ResponseFormat(FormatKind.REGEX, r"[0-9]{3}-[0-9]{4}"), "Give me a phone number.",
         lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        (ResponseFormat(FormatKind.REGEX, r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, [A-Z][a-z]{2,8}"),
         "Name a day and a month.", lambda t: re.fullmatch(r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, [A-Z][a-z]{2,8}", t)),
        (ResponseFormat.choice(["Paris", "London", "Berlin", "Madrid"]), "What is the capital of France?",
         lambda t: t in {"Paris", "London", "Berlin", "Madrid"}),
        (ResponseFormat.choice(['say "hi"', "back\\slash", "naïve"]), "Pick one.",
         lambda t: t in {'say "hi"', "back\\slash", "naïve"}),
        (ResponseFormat(FormatKind.GRAMMAR, 'root ::= "The answer is " ("yes" | "no") "."'), "Is water wet?",
         lambda t: t in {"The answer is yes.", "The answer is no."}),
    ]
    n = 6
    prompts, params, grammars, checks = [], [], [], []
    for fmt, question, check in formats:
        g = rt.structured.compile(fmt)
        for i in range(n):
            prompts.append(ask(rt, question))
            # Any JSON object is unbounded: sampled freely it may run past max_tokens, so it gets a cooler setting.
            temperature = 0.3 if fmt.kind is FormatKind.JSON_OBJECT else 1.0
            params.append(SamplingParams(max_tokens=96, temperature=temperature, seed=100 + i, top_p=0.95))
            grammars.append(g)
            checks.append(check)
    outs = rt.engine.generate(prompts, params, grammars=grammars)
    for out, check in zip(outs, checks, strict=True):
        assert out.finish_reason is FinishReason.STOP and check(out.text), (out.finish_reason, out.text)


def test_every_sampler_path_obeys_the_mask(rt):
    """Greedy, temperature, top-k, top-p, min-p and each penalty, with a regex the model would not write freely."""
    fmt = ResponseFormat(FormatKind.REGEX, r"[A-Z]{2}[0-9]{2}(-[A-Z]{2}[0-9]{2}){0,2}")
    g = rt.structured.compile(fmt)
    variants = [dict(temperature=0), dict(temperature=1.5), dict(temperature=1.0, top_k=3),
                dict(temperature=1.0, top_p=0.5), dict(temperature=1.0, min_p=0.2),
                dict(temperature=0, repetition_penalty=1.5), dict(temperature=0.8, presence_penalty=2.0),
                dict(temperature=0.8, frequency_penalty=-2.0), dict(temperature=1.0, logprobs=3)]
    prompt = ask(rt, "Write a short poem about rain.")
    params = [SamplingParams(max_tokens=40, seed=7, **v) for v in variants]
    outs = rt.engine.generate([prompt] * len(params), params, grammars=[g] * len(params))
    for v, out in zip(variants, outs, strict=True):
        assert out.finish_reason is FinishReason.STOP, (v, out.text)
        assert re.fullmatch(fmt.text, out.text), (v, out.text)


def test_json_demo_adapter_with_a_schema_gives_valid_objects(rt):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 40}},
              "required": ["answer"]}
    g = rt.structured.compile(ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(schema)))
    questions = ["What is the capital of France?", "Name a primary colour.", "What do bees make?",
                 "How many legs has a spider?"]
    prompts = [ask(rt, q) for q in questions] * 2
    params = [SamplingParams(max_tokens=64, temperature=t, seed=i) for i, t in enumerate([0] * 4 + [1.0] * 4)]
    outs = rt.engine.generate(prompts, params, [rt.demo["json"]] * len(prompts), grammars=[g] * len(prompts))
    for out in outs:
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert out.finish_reason is FinishReason.STOP


def test_mixed_batch_leaves_unconstrained_rows_unchanged():
    """Constrained rows beside free rows on the base model and two adapters: every free row gets exactly the
    tokens it gets alone (float32, so batching changes no logits)."""
    runtime = build_runtime(RuntimeConfig(kv_cache_gib=0.25, max_model_len=1024, dtype="float32",
                                          dense_weights_mib=0), EngineConfig(), AdapterConfig(max_active_adapters=2))
    caps, js = runtime.add_local_adapter(DEMO / "allcaps"), runtime.add_local_adapter(DEMO / "json")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    g = runtime.structured.compile(ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(schema)))
    choice = runtime.structured.compile(ResponseFormat.choice(["yes", "no"]))
    q = [ask(runtime, s) for s in ("Name a large animal.", "What is the capital of Italy?", "Is the sky blue?")]
    free = [(q[0], None, SamplingParams(max_tokens=24, temperature=0)),
            (q[1], caps, SamplingParams(max_tokens=24, temperature=0.9, seed=3)),
            (q[2], js, SamplingParams(max_tokens=24, temperature=0))]
    constrained = [(q[1], None, SamplingParams(max_tokens=24, temperature=0.9, seed=4), g),
                   (q[0], caps, SamplingParams(max_tokens=24, temperature=0), g),
                   (q[2], js, SamplingParams(max_tokens=24, temperature=0.7, seed=5), choice)]
    alone = [runtime.engine.generate([p], [sp], [v])[0] for p, v, sp in free]
    rows = [(p, v, sp, None) for p, v, sp in free] + constrained
    order = [0, 3, 1, 4, 2, 5]  # interleaved, so each adapter segment mixes both kinds
    mixed = runtime.engine.generate([rows[i][0] for i in order], [rows[i][2] for i in order],
                                    [rows[i][1] for i in order], grammars=[rows[i][3] for i in order])
    by_row = dict(zip(order, mixed, strict=True))
    for i, a in enumerate(alone):
        assert by_row[i].token_ids == a.token_ids, (i, by_row[i].text, a.text)
    assert json.loads(by_row[3].text).keys() == {"city"} and json.loads(by_row[4].text).keys() == {"city"}
    assert by_row[5].text in {"yes", "no"}


def test_preemption_prefix_cache_and_stop_strings_keep_the_matcher_in_step():
    """A KV cache so small that requests are preempted and recomputed, a shared prompt served from the prefix
    cache, and a stop string: seeded outputs equal those of a roomy engine, and each is valid."""
    schema = SCHEMAS["status_report"]
    fmt = ResponseFormat(FormatKind.JSON_SCHEMA, json.dumps(schema))

    def run(kv_gib: float):
        runtime = build_runtime(RuntimeConfig(kv_cache_gib=kv_gib, max_model_len=320, dtype="float32",
                                              dense_weights_mib=0), EngineConfig(max_num_seqs=8))
        g = runtime.structured.compile(fmt)
        prompt = schema_prompt(runtime, schema)
        params = [SamplingParams(max_tokens=64, temperature=1.0, seed=i) for i in range(4)]
        params.append(SamplingParams(max_tokens=64, temperature=1.0, seed=4, stop=['"checks"']))
        outs = runtime.engine.generate([prompt] * len(params), params, grammars=[g] * len(params))
        return outs, runtime.engine.stats

    # A ~190-token prompt shared by 5 requests: the small arena (21 blocks of 16 tokens, just over the 320-token
    # context) cannot hold all their outputs at once.
    small, small_stats = run(0.0145)
    roomy, roomy_stats = run(0.25)
    assert small_stats.preemptions > 0 and roomy_stats.preemptions == 0, small_stats
    assert small_stats.prefix_cache_hit_tokens > 0 and roomy_stats.prefix_cache_hit_tokens > 0
    for a, b in zip(small, roomy, strict=True):
        assert a.token_ids == b.token_ids
    for out in small[:-1]:
        jsonschema.validate(json.loads(out.text), schema)
    stopped = small[-1]
    assert stopped.finish_reason is FinishReason.STOP and '"checks"' not in stopped.text
