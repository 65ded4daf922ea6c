"""Request admission limits, aborts, runner failures and every finish reason."""

from __future__ import annotations

import logging

import pytest

from service.config import EngineConfig
from service.engine.engine import LLMEngine
from service.engine.outputs import ErrorKind
from service.engine.request import RequestSpec, RequestStatus
from service.engine.sampling import SamplingParams
from service.engine.scheduler import QueueFullError
from service.engine.types import FinishReason
from tests.engine.fake_runner import EOS, ByteTokenizer, FakeRunner, ScriptedRunner, make_engine, prompt

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def drain(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finals[o.request_id] = o.final
        engine.check_integrity()
    return finals


def scripted(script: dict[str, list[int]], **cfg) -> LLMEngine:
    return make_engine(runner=ScriptedRunner(script, num_blocks=64, block_size=4), **cfg)


def test_bounded_waiting_queue():
    engine = make_engine(max_waiting=3)
    for i in range(3):
        engine.add_request(RequestSpec(f"r{i}", prompt(4), SP))
    with pytest.raises(QueueFullError, match="max_waiting.*|3 requests waiting"):
        engine.add_request(RequestSpec("r3", prompt(4), SP))
    assert engine.get_request("r3") is None
    engine.step()  # admits all three: the queue has room again
    engine.add_request(RequestSpec("r3", prompt(4), SP))
    assert set(drain(engine)) == {"r0", "r1", "r2", "r3"}


def test_prompt_limits_named_in_errors():
    engine = make_engine(num_blocks=64, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match=r"32 tokens.*max_model_len=32"):
        engine.add_request(RequestSpec("a", prompt(32), SP))
    small_pool = make_engine(num_blocks=4, block_size=4, max_model_len=512)
    with pytest.raises(ValueError, match=r"17 tokens needs 5 KV blocks.*4 blocks"):
        small_pool.add_request(RequestSpec("b", prompt(17), SP))
    small_pool.add_request(RequestSpec("c", prompt(16), SP))  # exactly the pool: fine, ends at the pool's size
    assert drain(small_pool)["c"].finish_reason is FinishReason.LENGTH
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(RequestSpec("d", [], SP))
    with pytest.raises(ValueError, match="outside the vocabulary of 256"):
        engine.add_request(RequestSpec("e", [1, 256], SP))
    with pytest.raises(ValueError, match=">= 0"):
        engine.add_request(RequestSpec("f", [-1], SP))
    assert not engine.has_unfinished()


def test_block_size_must_match_runner():
    with pytest.raises(ValueError, match="block_size"):
        LLMEngine(FakeRunner(block_size=4), ByteTokenizer(), EngineConfig(block_size=8))


def test_duplicate_and_unknown_ids():
    engine = make_engine()
    engine.add_request(RequestSpec("x", prompt(4), SP))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(RequestSpec("x", prompt(5), SP))
    assert engine.abort_request("nope") is False
    drain(engine)
    engine.add_request(RequestSpec("x", prompt(4), SP))  # a finished id may be reused


def test_abort_waiting_and_running_frees_at_once():
    engine = make_engine(max_num_seqs=1)
    running = engine.add_request(RequestSpec("run", prompt(9), SP))
    waiting = engine.add_request(RequestSpec("wait", prompt(9), SP))
    engine.step()
    assert running.status is RequestStatus.RUNNING and waiting.status is RequestStatus.WAITING
    assert engine.pool.num_in_use > 0
    assert engine.abort_request("run") and engine.abort_request("wait")
    assert engine.pool.num_in_use == 0 and not engine.scheduler.has_unfinished()
    engine.check_idle_integrity()
    assert engine.abort_request("run") is False  # already finished
    finals = {o.request_id: o.final for o in engine.step()}
    assert finals["run"].finish_reason is FinishReason.CANCELLED
    assert len(finals["run"].token_ids) == 1
    assert finals["wait"].finish_reason is FinishReason.CANCELLED and list(finals["wait"].token_ids) == []
    assert not engine.has_unfinished()


def test_runner_error_fails_the_step_not_the_engine(caplog):
    engine = make_engine()
    engine.add_request(RequestSpec("a", prompt(5), SP))
    engine.add_request(RequestSpec("b", prompt(6), SP))
    engine.step()
    engine.runner.fail_next = 1
    with caplog.at_level(logging.ERROR, logger="service.engine.engine"):
        outs = engine.step()
    assert {o.request_id: o.final.finish_reason for o in outs} == {"a": FinishReason.ERROR, "b": FinishReason.ERROR}
    assert {o.final.error.kind for o in outs} == {ErrorKind.INTERNAL}
    assert "injected runner failure" in caplog.text
    engine.check_idle_integrity()
    out = engine.generate([prompt(5)], SP)[0]  # still usable
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 8


def test_eos_min_tokens_and_ignore_eos():
    a, b = ord("a"), ord("b")
    script = {"eos": [a, EOS, b], "min": [EOS, a, EOS, b], "ign": [a, EOS, b, b]}
    engine = scripted(script)
    engine.add_request(RequestSpec("eos", prompt(3), SamplingParams(max_tokens=5, temperature=0)))
    engine.add_request(RequestSpec("min", prompt(3), SamplingParams(max_tokens=5, temperature=0, min_tokens=2)))
    engine.add_request(RequestSpec("ign", prompt(3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    f = drain(engine)
    assert (f["eos"].finish_reason, list(f["eos"].token_ids), f["eos"].text) == (FinishReason.EOS, [a, EOS], "a")
    # the first EOS is within min_tokens=2: ignored; the second one ends the request
    assert f["min"].finish_reason is FinishReason.EOS and list(f["min"].token_ids) == [EOS, a, EOS]
    assert f["ign"].finish_reason is FinishReason.LENGTH and f["ign"].text == "abb"


def test_min_tokens_boundary_matches_the_sampler_mask():
    """The sampler masks EOS / stop ids at output indices [0, min_tokens); a runner that does not mask
    gets the same rule from the engine: such a token at index min_tokens - 1 is plain output, at index
    min_tokens it ends the request."""
    a, y = ord("a"), ord("y")
    engine = scripted({"eos": [a, EOS, EOS, a], "stop": [a, y, y, a]})
    engine.add_request(RequestSpec("eos", prompt(3), SamplingParams(max_tokens=9, temperature=0, min_tokens=2)))
    engine.add_request(RequestSpec("stop", prompt(3), SamplingParams(max_tokens=9, temperature=0, min_tokens=2,
                                                         stop_token_ids=(y,))))
    f = drain(engine)
    assert (f["eos"].finish_reason, list(f["eos"].token_ids)) == (FinishReason.EOS, [a, EOS, EOS])
    assert (f["stop"].finish_reason, list(f["stop"].token_ids)) == (FinishReason.STOP, [a, y, y])


def test_stop_token_ids():
    engine = scripted({"s": [ord("x"), ord("y"), ord("z")]})
    engine.add_request(RequestSpec("s", prompt(3), SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(ord("y"),))))
    f = drain(engine)["s"]
    assert f.finish_reason is FinishReason.STOP and list(f.token_ids) == [ord("x"), ord("y")] and f.text == "x"


def test_length_by_max_model_len():
    engine = make_engine(max_model_len=10)
    engine.add_request(RequestSpec("m", prompt(7), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
    f = drain(engine)["m"]
    assert f.finish_reason is FinishReason.LENGTH and len(f.token_ids) == 3  # 7 + 3 == 10


def test_logprobs_only_when_asked():
    engine = make_engine()
    engine.add_request(RequestSpec("p", prompt(3), SamplingParams(max_tokens=2, temperature=0, logprobs=1, ignore_eos=True)))
    engine.add_request(RequestSpec("q", prompt(3), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
    outs = [o for _ in range(2) for o in engine.step()]
    assert all(len(o.new_logprobs) == 1 for o in outs if o.request_id == "p")
    assert all(o.new_logprobs == [] for o in outs if o.request_id == "q")


def test_seed_is_fixed_per_request():
    engine = make_engine()
    r1 = engine.add_request(RequestSpec("s1", prompt(3), SamplingParams(seed=42)))
    r2 = engine.add_request(RequestSpec("s2", prompt(3), SamplingParams()))
    assert r1.seed == 42 and 0 <= r2.seed < 2**63


def test_generate_needs_idle_engine_and_matching_params():
    engine = make_engine()
    with pytest.raises(ValueError, match="2 prompts but 1"):
        engine.generate([prompt(3), prompt(4)], [SP])
    engine.add_request(RequestSpec("busy", prompt(3), SP))
    with pytest.raises(RuntimeError, match="idle"):
        engine.generate([prompt(3)], SP)


def test_generate_streams_past_the_queue_bound():
    engine = make_engine(max_waiting=2, max_num_seqs=2)
    outs = engine.generate([prompt(3, seed=i) for i in range(7)], SP)
    assert len(outs) == 7 and all(o.finish_reason is FinishReason.LENGTH for o in outs)


def test_stats_snapshot():
    engine = make_engine()
    engine.generate([prompt(10)], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    s = engine.stats
    assert (s.prompt_tokens_computed, s.generation_tokens, s.prefix_cache_queried_tokens) == (10, 3, 10)
    assert s.steps == 3 and s.num_running == 0 and s.kv_cache_usage == 0.0 and s.prefix_cache_hit_rate == 0.0


def test_deadline_stops_waiting_and_running_requests_and_frees_their_blocks():
    clock = [100.0]
    engine = make_engine(max_num_seqs=1, clock=lambda: clock[0])
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    engine.add_request(RequestSpec("run", prompt(5), long, deadline=105.0))
    engine.add_request(RequestSpec("late", prompt(5), SP, deadline=99.0))  # already past, waiting behind "run"
    engine.add_request(RequestSpec("free", prompt(5), SP))  # no deadline
    outs = engine.step()
    late = next(o.final for o in outs if o.request_id == "late")
    assert late.finish_reason is FinishReason.CANCELLED and late.error.kind is ErrorKind.DEADLINE_EXCEEDED
    assert late.usage.output_tokens == 0 and engine.get_request("run").block_ids
    engine.step()
    clock[0] = 105.0  # "run" has had two steps; now its deadline passes
    outs = engine.step()
    run = next(o.final for o in outs if o.request_id == "run")
    assert run.finish_reason is FinishReason.CANCELLED and run.error.kind is ErrorKind.DEADLINE_EXCEEDED
    assert run.usage.output_tokens == 2 and engine.get_request("run") is None
    assert drain(engine)["free"].finish_reason is FinishReason.LENGTH
    engine.check_idle_integrity()
