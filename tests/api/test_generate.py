"""Generate / GenerateStream / Tokenize over a real socket, on the tiny model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.client import LoraServeClient
from tests.api.conftest import Server

GREEDY = pb.SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = Server(tiny[0], tmp_path_factory.mktemp("data"), adapter=tiny[1])
    yield s
    s.close()


def stream_req(**kw) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(**kw)


def test_unary_greedy_completion(server):
    r = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=GREEDY))
    assert r.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(r.token_ids) == 12 and r.text.split() == [f"t{i}" for i in r.token_ids]
    assert (r.usage.input_tokens, r.usage.output_tokens) == (3, 12)
    assert r.request_id.startswith("req-") and r.adapter_version == ""
    assert 0 <= r.timings.queue_ms <= r.timings.ttft_ms <= r.timings.total_ms
    assert r.seed > 0  # drawn by the server, returned so the client can replay
    server.wait_idle_and_intact()


def test_stream_joined_equals_unary_for_greedy(server):
    unary = server.stub.Generate(pb.GenerateRequest(text="t9 t10", sampling=GREEDY))
    msgs = list(server.stub.GenerateStream(stream_req(text="t9 t10", sampling=GREEDY)))
    assert "".join(m.text for m in msgs) == unary.text
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.output_tokens == 12
    assert len({m.request_id for m in msgs}) == 1
    assert last.timings.total_ms > 0


def test_a_stream_interval_gathers_tokens_into_fewer_messages_with_the_same_answer(tiny, tmp_path):
    """--stream-interval 5 (no speculation: a token a step): a 12-token stream comes as the first token alone, then
    5, 5 and the last 1 with the final message; joined, the same text and tokens as the unary answer (which waits for the final output)."""
    s = Server(tiny[0], tmp_path, server={"stream_interval": 5, "warmup": False}, speculation="off")
    try:
        unary = s.stub.Generate(pb.GenerateRequest(text="t9 t10", sampling=GREEDY))
        msgs = list(s.stub.GenerateStream(stream_req(text="t9 t10", sampling=GREEDY)))
        assert [len(m.token_ids) for m in msgs] == [1, 5, 5, 1]
        assert "".join(m.text for m in msgs) == unary.text
        assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].usage.output_tokens == 12
        s.wait_idle_and_intact()
    finally:
        s.close()


def test_a_unary_call_waits_for_the_final_output_alone_and_a_stream_gets_every_step(server, monkeypatch):
    """Generate's thread is woken once, by the final output (stream_interval None); GenerateStream's every step
    (the server's default interval, 1)."""
    loop = server.server.loop
    asked: list[int | None] = []
    submit = loop.submit

    def recording(spec, context=None, timeout=30.0, *, stream_interval=1):
        asked.append(stream_interval)
        return submit(spec, context, timeout, stream_interval=stream_interval)

    monkeypatch.setattr(loop, "submit", recording)
    r = server.stub.Generate(pb.GenerateRequest(text="t9 t10", sampling=GREEDY))
    msgs = list(server.stub.GenerateStream(stream_req(text="t9 t10", sampling=GREEDY)))
    assert asked == [None, 1]
    assert [t for m in msgs for t in m.token_ids] == list(r.token_ids)


def test_same_seed_same_tokens_and_seed_is_echoed(server):
    sp = pb.SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234)
    a = server.stub.Generate(pb.GenerateRequest(text="t20 t21", sampling=sp))
    b = server.stub.Generate(pb.GenerateRequest(text="t20 t21", sampling=sp))
    assert a.token_ids == b.token_ids and a.seed == b.seed == 1234


def test_token_ids_prompt_equals_text_prompt(server):
    ids = server.stub.Tokenize(pb.TokenizeRequest(text="t30 t31 t32")).token_ids
    by_ids = server.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=GREEDY))
    by_text = server.stub.Generate(pb.GenerateRequest(text="t30 t31 t32", sampling=GREEDY))
    assert by_ids.token_ids == by_text.token_ids


def test_chat_messages_go_through_the_template(server):
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="t40 t41")])
    tok = server.stub.Tokenize(pb.TokenizeRequest(messages=msgs))
    assert list(tok.tokens) == ["t3", "t40", "t41", "t4", "t5"]  # t3 <content> t4, then the opened turn t5
    assert tok.max_model_len == 512
    r = server.stub.Generate(pb.GenerateRequest(messages=msgs, sampling=GREEDY))
    assert r.usage.input_tokens == 5


def test_stop_string_and_stop_token_id(server):
    full = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=GREEDY))
    words = full.text.split()
    cut = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=GREEDY, stop=[words[2]]))
    assert cut.finish_reason == pb.FINISH_REASON_STOP and words[2] not in cut.text.split()
    by_id = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=GREEDY,
                                                    stop_token_ids=[full.token_ids[1]]))
    assert by_id.finish_reason == pb.FINISH_REASON_STOP and list(by_id.token_ids) == list(full.token_ids[:2])


def test_logit_bias_bans_and_forces_tokens_over_the_socket(server):
    full = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=GREEDY))
    first = full.token_ids[0]
    # the greedy first token banned: another one comes first, and never the banned one (greedy, every step)
    banned = pb.SamplingParams(temperature=0, max_tokens=12, logit_bias={first: -100})
    r = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=banned))
    assert r.token_ids[0] != first and first not in r.token_ids
    # +100 on one token: every token is that one, random sampling too, streamed or not; logprobs stay the model's
    forced = pb.SamplingParams(temperature=1.0, seed=3, max_tokens=6, logit_bias={42: 100}, logprobs=1)
    r = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=forced))
    assert list(r.token_ids) == [42] * 6 and r.text.split() == ["t42"] * 6
    assert all(lp.token_id == 42 and lp.logprob <= lp.top_logprobs[0].logprob for lp in r.logprobs)
    # the model's own favourite is another token, more likely than 42: the logprobs are not the biased ones
    assert any(lp.top_logprobs[0].token_id != 42 and lp.logprob < lp.top_logprobs[0].logprob for lp in r.logprobs)
    msgs = list(server.stub.GenerateStream(stream_req(text="t5 t6 t7", sampling=forced)))
    assert [t for m in msgs for t in m.token_ids] == [42] * 6
    with LoraServeClient(server.target, timeout=30) as c:
        assert list(c.generate("t5 t6 t7", temperature=0, max_tokens=3, logit_bias={7: 100}).token_ids) == [7] * 3
    server.wait_idle_and_intact()


def test_prompt_logprobs_score_the_prompt_unary_and_streamed(server):
    """(Their values against transformers: tests/runtime/test_engine_model.py.)"""
    sp = pb.SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    ids = [5, 6, 7, 8, 9, 10]
    r = server.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sp))
    assert [lp.token_id for lp in r.prompt_logprobs] == ids[1:]  # the first token has nothing before it
    assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 and lp.token == f"t{lp.token_id}"
               for lp in r.prompt_logprobs)
    assert not r.logprobs  # the generated tokens' only with sampling.logprobs
    msgs = list(server.stub.GenerateStream(stream_req(token_ids=pb.TokenIds(ids=ids), sampling=sp)))
    assert list(msgs[0].prompt_logprobs) == list(r.prompt_logprobs) and not any(m.prompt_logprobs for m in msgs[1:])
    # the same prompt again: cached now, and scored the same (its positions are computed for their logits)
    again = server.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sp))
    assert [lp.logprob for lp in again.prompt_logprobs] == pytest.approx([lp.logprob for lp in r.prompt_logprobs])
    plain = server.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=GREEDY))
    assert not plain.prompt_logprobs
    server.wait_idle_and_intact()


def test_logprobs_of_each_token_with_alternatives(server):
    sp = pb.SamplingParams(temperature=0, max_tokens=4, logprobs=3)
    r = server.stub.Generate(pb.GenerateRequest(text="t5 t6", sampling=sp))
    assert [lp.token_id for lp in r.logprobs] == list(r.token_ids)
    for lp in r.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token_id == lp.token_id  # greedy picks the most likely
        assert lp.token == f"t{lp.token_id}"
    msgs = list(server.stub.GenerateStream(stream_req(text="t5 t6", sampling=sp)))
    assert [lp.token_id for m in msgs for lp in m.logprobs] == list(r.token_ids)


def test_default_max_tokens_fits_the_context(server):
    near_full = " ".join(["t7"] * 505)  # 505 prompt tokens of 512: 7 fit, the default 256 would not
    r = server.stub.Generate(pb.GenerateRequest(text=near_full, sampling=pb.SamplingParams(temperature=0)))
    assert r.usage.output_tokens <= 7 and r.finish_reason == pb.FINISH_REASON_LENGTH


def test_adapter_by_name_and_version_changes_the_output(server):
    base = server.stub.Generate(pb.GenerateRequest(text="t5 t6 t7", sampling=GREEDY))
    vid = server.server.registry.resolve("default", "tiny-lora").version_id
    outs = [server.stub.Generate(pb.GenerateRequest(adapter=ref, text="t5 t6 t7", sampling=GREEDY))
            for ref in ("tiny-lora", "tiny-lora@1", f"tiny-lora@{vid}")]
    assert all(o.adapter_version == vid for o in outs)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
    assert outs[0].token_ids != base.token_ids  # a random rank-8 adapter moves greedy decoding
    server.wait_idle_and_intact()


def test_concurrent_requests_match_each_request_alone(server):
    prompts = [" ".join(f"t{10 + (i * 7 + j) % 100}" for j in range(3 + i)) for i in range(8)]
    alone = [server.stub.Generate(pb.GenerateRequest(text=p, sampling=GREEDY)).token_ids for p in prompts]
    with ThreadPoolExecutor(8) as pool:  # one continuous batch, mixed unary and streaming
        unary = pool.map(lambda p: server.stub.Generate(pb.GenerateRequest(text=p, sampling=GREEDY)), prompts)
        streams = pool.map(lambda p: list(server.stub.GenerateStream(stream_req(text=p, sampling=GREEDY))),
                           prompts)
        unary, streams = list(unary), list(streams)
    assert [r.token_ids for r in unary] == alone
    assert [[t for m in msgs for t in m.token_ids] for msgs in streams] == [list(a) for a in alone]
    server.wait_idle_and_intact()


def test_a_taken_port_is_a_clear_error(server, tiny, tmp_path):
    from service.config import ServerConfig, ServiceConfig
    from service.server import LoraServer

    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.server.port}: the address is in use"):
        LoraServer(server.runtime, ServerConfig(port=server.server.port, warmup=False),
                   ServiceConfig(data_dir=str(tmp_path))).start()


def test_python_client(server):
    with LoraServeClient(server.target, timeout=30) as c:
        r = c.generate("t5 t6 t7", temperature=0, max_tokens=12)
        assert "".join(c.generate_stream("t5 t6 t7", temperature=0, max_tokens=12)) == r.text
        assert c.tokenize("t5 t6") == [5, 6]
        assert c.generate("t40 t41", chat=True, temperature=0, max_tokens=3).usage.input_tokens == 5
        assert c.health() == "SERVING"
        with pytest.raises(grpc.RpcError) as e:
            c.generate("t5", adapter="nope")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"loraserve.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_labels_are_recorded_with_the_usage_row_and_on_the_span(tiny, tmp_path):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.tracing import make_tracer_provider

    spans = InMemorySpanExporter()
    s = Server(tiny[0], tmp_path / "data", tracer_provider=make_tracer_provider(exporters=[spans]))
    try:
        labels = {"feature": "search", "end_user.id": "u-17"}
        r = s.stub.Generate(pb.GenerateRequest(text="t5 t6", sampling=GREEDY, labels=labels))
        s.server.usage_writer.flush()
        assert s.server.ledger.get(r.request_id).labels == labels
        (span,) = [x for x in spans.get_finished_spans() if x.attributes["loraserve.request.id"] == r.request_id]
        assert {k: span.attributes[f"loraserve.label.{k}"] for k in labels} == labels
    finally:
        s.close()


@pytest.mark.parametrize("labels, named", [
    ({f"k{i}": "v" for i in range(17)}, "at most 16"),  # too many labels
    ({"Feature": "x"}, "labels key 'Feature' is invalid"),  # an upper-case key
    ({"9lives": "x"}, "labels key '9lives' is invalid"),  # a key not starting with a letter
    ({"k" * 64: "x"}, "is invalid: 1 to 63 characters"),  # a key too long
    ({"note": "x" * 257}, "labels['note'] is invalid: at most 256"),  # a value too long
    ({"note": "a\nb"}, "labels['note'] is invalid"),  # a value with a control character
])
def test_bad_labels_are_refused_by_name(server, labels, named):
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(pb.GenerateRequest(text="t5", sampling=GREEDY, labels=labels))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in info.value.details()


def test_speculation_stats_in_the_response_and_the_same_tokens_either_way(make_server):
    import urllib.request

    server = make_server(service={"metrics_port": 0}, draft_token_cost=0)
    ids = pb.TokenIds(ids=[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6])  # repetitive: prompt lookup drafts
    on = pb.SamplingParams(temperature=0, max_tokens=24, speculation=pb.SPECULATION_NGRAM)
    off = pb.SamplingParams(temperature=0, max_tokens=24, speculation=pb.SPECULATION_OFF)
    a = server.stub.Generate(pb.GenerateRequest(token_ids=ids, sampling=on))
    b = server.stub.Generate(pb.GenerateRequest(token_ids=ids, sampling=off))
    assert list(a.token_ids) == list(b.token_ids) and a.usage.output_tokens == len(a.token_ids) == 24
    assert a.speculation.draft_tokens > 0 and 0 <= a.speculation.accepted_tokens <= a.speculation.draft_tokens
    assert (b.speculation.draft_tokens, b.speculation.accepted_tokens) == (0, 0)
    # a logit bias is applied at every position a verify pass samples: the same tokens as without speculation
    bias = {a.token_ids[3]: -100, a.token_ids[6]: 1.5}
    c = server.stub.Generate(pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(
        temperature=0, max_tokens=24, speculation=pb.SPECULATION_NGRAM, logit_bias=bias)))
    d = server.stub.Generate(pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(
        temperature=0, max_tokens=24, speculation=pb.SPECULATION_OFF, logit_bias=bias)))
    assert list(c.token_ids) == list(d.token_ids) != list(a.token_ids) and a.token_ids[3] not in c.token_ids
    assert c.speculation.draft_tokens > 0 and len(set(c.token_ids)) > 3, list(c.token_ids)
    msgs = list(server.stub.GenerateStream(stream_req(token_ids=ids, sampling=on)))
    assert [t for m in msgs for t in m.token_ids] == list(a.token_ids)
    assert msgs[-1].speculation == a.speculation  # the same request drafts the same way
    assert len(msgs) > 1 and not msgs[0].HasField("speculation")  # on the last message only
    server.wait_idle_and_intact()
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    drafts = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("loraserve_spec_decode_draft_tokens_total ")]
    accepted = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("loraserve_spec_decode_accepted_tokens_total ")]
    assert drafts and drafts[0] >= 2 * a.speculation.draft_tokens  # the unary and the streamed call
    assert accepted and accepted[0] >= 2 * a.speculation.accepted_tokens
    verifies = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("loraserve_spec_decode_acceptance_length_count ")]
    assert verifies and verifies[0] > 0
