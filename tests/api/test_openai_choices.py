"""The OpenAI front's choices and sampling extras over a real socket, with the official `openai` client, on the
tiny model: `n` choices and several prompts per call (admitted and refused together, streamed by index, usage
counting each prompt once), `echo` with the prompt's logprobs, `logit_bias`, and vLLM's structured-output extras."""

from __future__ import annotations

import json
import re

import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.engine.scheduler import QueueFullError
from service.loop import wait_until
from tests.api import openai_front
from tests.api.conftest import Server, write_tenants
from tests.api.openai_front import BOB, CHAT, GREEDY, client, grpc_alice, post


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    yield from openai_front.serve(tiny, tmp_path_factory.mktemp("http"))


def test_echo_puts_the_prompt_and_its_logprobs_before_the_completion(served):
    """What evaluation harnesses send to score a text (echo, logprobs, a token or so generated)."""
    c = client(served)
    r = c.completions.create(model=served.model, prompt="t9 t10 t11", echo=True, logprobs=1, max_tokens=1,
                             temperature=0)
    ch = r.choices[0]
    assert ch.text.startswith("t9 t10 t11") and len(ch.text) > len("t9 t10 t11")
    lp = ch.logprobs
    assert lp.tokens[:3] == ["t9", "t10", "t11"] and len(lp.tokens) == 4  # (the tiny tokenizer's pieces)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    scored = served.stub.Generate(pb.GenerateRequest(text="t9 t10 t11", sampling=pb.SamplingParams(
        temperature=0, max_tokens=1, prompt_logprobs=1)), metadata=grpc_alice(served))
    assert lp.token_logprobs[1:3] == pytest.approx([p.logprob for p in scored.prompt_logprobs])
    assert lp.text_offset == [0, 2, 5, 8]  # each token's own text, as without echo
    streamed = list(c.completions.create(model=served.model, prompt="t9 t10 t11", echo=True, logprobs=1,
                                         max_tokens=1, temperature=0, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == ch.text
    assert [t for s in streamed for t in s.choices[0].logprobs.tokens] == lp.tokens
    assert streamed[0].choices[0].logprobs.token_logprobs[0] is None
    plain = c.completions.create(model=served.model, prompt=[9, 10], echo=True, max_tokens=2, temperature=0)
    assert plain.choices[0].text.startswith("t9 t10") and plain.choices[0].logprobs is None
    served.wait_idle_and_intact()


def test_vllms_structured_output_extras_constrain_chat_and_completions(served):
    """`structured_outputs` and the older `guided_*` fields, as vLLM takes them (`extra_body`). The tiny model's
    word-level vocabulary answers with a leading space (tests/api/test_structured_output.py)."""
    c = client(served, BOB)
    for extra in ({"guided_choice": ["t7", "t9", "t11"]}, {"structured_outputs": {"choice": ["t7", "t9", "t11"]}}):
        for seed in range(3):
            r = c.chat.completions.create(model=served.model, messages=CHAT, temperature=1.0, seed=seed,
                                          max_tokens=8, extra_body=extra)
            assert r.choices[0].message.content.strip() in {"t7", "t9", "t11"} and r.choices[0].finish_reason == "stop"
    for extra in ({"guided_regex": "t1[0-9]"}, {"structured_outputs": {"regex": "t1[0-9]"}}):
        r = c.completions.create(model=served.model, prompt="t5 t6", temperature=1.0, seed=1, max_tokens=8,
                                 extra_body=extra)
        assert re.fullmatch("t1[0-9]", r.choices[0].text.strip()), r.choices[0].text
    both = post(served, "/v1/chat/completions", {"model": served.model, "messages": CHAT, "guided_regex": "t1",
                                                 "structured_outputs": {"choice": ["t7"]}}, key=BOB)
    assert both.status_code == 400
    assert "structured_outputs.choice and guided_regex both set a format" in both.json()["error"]["message"]
    also = post(served, "/v1/chat/completions", {"model": served.model, "messages": CHAT, "guided_choice": ["t7"],
                                                 "response_format": {"type": "json_object"}}, key=BOB)
    assert also.status_code == 400 and "response_format and a structured output extra" in also.text
    empty = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", "structured_outputs": {}}, key=BOB)
    assert empty.status_code == 400 and "structured_outputs is empty" in empty.text
    served.wait_idle_and_intact()


def test_logit_bias_as_openai_sends_it_token_ids_as_strings(served):
    c = client(served)
    plain = c.completions.create(model=served.model, prompt="t9 t10", **GREEDY).choices[0].text
    forced = c.completions.create(model=served.model, prompt="t9 t10", logit_bias={"33": 100}, **GREEDY)
    assert forced.choices[0].text.split() == ["t33"] * 8 != plain.split()
    first = plain.split()[0]
    chat = c.chat.completions.create(model=served.model, messages=CHAT, logit_bias={first[1:]: -100}, **GREEDY)
    assert first not in chat.choices[0].message.content.split()
    served.wait_idle_and_intact()


def test_n_choices_each_seeded_apart_with_the_prompt_counted_once(served):
    c = client(served, BOB)
    r = c.completions.create(model=served.model, prompt="t9 t10", n=3, temperature=1.0, seed=5, max_tokens=8)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    alone = [c.completions.create(model=served.model, prompt="t9 t10", temperature=1.0, seed=5 + j, max_tokens=8)
             for j in range(3)]
    assert [ch.text for ch in r.choices] == [a.choices[0].text for a in alone]  # choice j: seed + j
    assert len({ch.text for ch in r.choices}) > 1
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens == 2
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) == 24
    greedy = c.chat.completions.create(model=served.model, messages=CHAT, n=2, **GREEDY)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content  # as OpenAI: greedy is greedy
    served.wait_idle_and_intact()


def test_several_prompts_with_n_come_prompt_by_prompt(served):
    c = client(served, BOB)
    r = c.completions.create(model=served.model, prompt=["t9 t10", "t20 t21 t22"], n=2, logprobs=1, seed=11,
                             temperature=0.8, max_tokens=6)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    for k, (prompt, seed) in enumerate([("t9 t10", 11), ("t9 t10", 12), ("t20 t21 t22", 11), ("t20 t21 t22", 12)]):
        one = c.completions.create(model=served.model, prompt=prompt, logprobs=1, seed=seed, temperature=0.8,
                                   max_tokens=6).choices[0]
        assert r.choices[k].text == one.text and r.choices[k].logprobs.tokens == one.logprobs.tokens
    assert r.usage.prompt_tokens == 2 + 3 and r.usage.completion_tokens == 24
    base = "req-" + r.id.removeprefix("cmpl-")  # one usage row per choice, each billed: request ids rid-0 ...
    rows = [served.server.ledger.get(f"{base}-{k}") for k in range(4)]
    assert [row.output_tokens for row in rows] == [6] * 4 and {row.tenant for row in rows} == {"bob"}
    assert [row.input_tokens for row in rows] == [2, 2, 3, 3]
    served.wait_idle_and_intact()


def test_streamed_n_choices_interleave_by_index_and_end_with_the_calls_usage(served):
    c = client(served, BOB)
    unary = c.chat.completions.create(model=served.model, messages=CHAT, n=3, seed=9, temperature=1.0, max_tokens=8)
    chunks = list(c.chat.completions.create(model=served.model, messages=CHAT, n=3, seed=9, temperature=1.0,
                                            max_tokens=8, stream=True, stream_options={"include_usage": True}))
    by_index: dict[int, list] = {0: [], 1: [], 2: []}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.usage is None
        by_index[ch.choices[0].index].append(ch.choices[0])
    for i, parts in by_index.items():
        assert parts[0].delta.role == "assistant" and all(p.delta.role is None for p in parts[1:])
        assert "".join(p.delta.content or "" for p in parts) == unary.choices[i].message.content
        assert [p.finish_reason for p in parts][-1] == "length" and all(p.finish_reason is None for p in parts[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    served.wait_idle_and_intact()


def test_n_beyond_the_tenants_concurrency_is_refused_and_a_choice_that_cannot_start_stops_the_others(served):
    """alice may run 2 requests at once: n=3 could never run (400, nothing started); with one of hers in flight,
    n=2 gets the second choice refused (429) and the first one, started, is stopped."""
    r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", "n": 3, "max_tokens": 4})
    assert r.status_code == 400
    assert "asks for 3 choices" in r.json()["error"]["message"] and "at most 2 at once" in r.json()["error"]["message"]
    served.hold()
    try:
        stream = client(served).completions.create(model=served.model, prompt="t5", stream=True, **GREEDY)
        r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", "n": 2, "max_tokens": 4})
        assert r.status_code == 429 and "max_concurrent_requests=2" in r.json()["error"]["message"]
        assert served.server.generations.limiter.in_flight("alice") == 1  # the held stream's alone
        stream.close()
    finally:
        served.resume()
    assert wait_until(lambda: served.server.generations.limiter.in_flight("alice") == 0, 10)
    r = post(served, "/v1/completions", {"model": served.model, "prompt": ["t5"] * 5, "n": 16}, key=BOB)
    assert r.status_code == 400
    assert "5 prompts with n=16 make 80 choices; at most 64 are allowed per call" in r.json()["error"]["message"]
    r = post(served, "/v1/completions", {"model": served.model, "prompt": [[5], []], "max_tokens": 2}, key=BOB)
    assert r.status_code == 400 and "prompt[1] is empty" in r.json()["error"]["message"]
    served.wait_idle_and_intact()


def test_a_call_with_a_bad_prompt_among_several_starts_none_of_them(served):
    """Every choice is checked before any is submitted: the good first prompt neither runs nor is billed."""
    served.spans.clear()
    r = post(served, "/v1/completions", {"model": served.model, "prompt": [[5, 6, 7], [900]], "n": 2,
                                         "max_tokens": 2}, key=BOB)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"].startswith("prompt[1][0]=900 is outside the vocabulary"), err  # prompt 1, token 0
    assert err["param"] == "prompt"
    rid = r.headers["x-request-id"]
    assert all(served.server.ledger.get(f"{rid}-{k}") is None for k in range(4))
    served.wait_idle_and_intact()


def test_n_choices_are_admitted_together_under_tokens_per_minute(tiny, tmp_path):
    """A tenant's bucket admits a call while it is positive, as it does one request: n=2 with a prompt larger than
    the bucket runs (both choices charged), the next call waits for the refill (429), and nothing of it starts."""
    tenants = write_tenants(tmp_path / "tenants.yaml", alice_limits="{tokens_per_minute: 30}")
    s = Server(tiny[0], tmp_path / "data", service={"tenants_file": tenants}, server={"http_port": 0})
    try:
        s.base_url = f"http://127.0.0.1:{s.server.http_port}"
        body = {"model": s.server.base_model, "prompt": list(range(5, 45)), "n": 2, "max_tokens": 2}
        r = post(s, "/v1/completions", body)
        assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1], r.text
        r = post(s, "/v1/completions", body)
        assert r.status_code == 429 and "tokens_per_minute=30" in r.json()["error"]["message"]
        rid = r.headers["x-request-id"]
        assert s.server.ledger.get(f"{rid}-0") is None and s.server.generations.limiter.in_flight("alice") == 0
        s.wait_idle_and_intact()
    finally:
        s.close()


def test_a_choice_the_engine_refuses_stops_those_submitted_and_returns_every_lease(served):
    """The engine's queue full at the second choice: the first, already submitted, is stopped, and the call's leases
    all go back (the loop charges a lease but never releases it: before, the first choice's stayed taken)."""
    loop, submit, calls = served.server.loop, served.server.loop.submit, []

    def second_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise QueueFullError("the waiting queue is full")
        return submit(*args, **kw)

    loop.submit = second_fails
    try:
        r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", "n": 2, "max_tokens": 2})
    finally:
        del loop.submit
    assert r.status_code == 429 and len(calls) == 2, r.text
    assert served.server.generations.limiter.in_flight("alice") == 0
    served.wait_idle_and_intact()


def test_streamed_n_choices_past_their_deadline_end_with_one_error_event_and_leave_nothing_running(served):
    served.hold()  # the engine takes no step: neither choice gets a token before the deadline
    try:
        r = post(served, "/v1/completions", {"model": served.model, "prompt": "t5", "n": 2, "stream": True,
                                             "max_tokens": 4}, key=BOB, **{"x-request-timeout": "0.5"})
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]" and len(events) == 2
        assert "deadline passed" in json.loads(events[0])["error"]["message"]
    finally:
        served.resume()
    served.wait_idle_and_intact()
