"""Continuous batching, chunked prefill, prefix caching and preemption give the same tokens as
generating each request alone (the fake runner reads its context back from the paged arena)."""

from __future__ import annotations

from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import FakeRunner, make_engine, prompt, reference_tokens

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def run_to_end(engine) -> dict[str, list]:
    """Drive step() until idle, checking the pool after every step; all outputs by request id."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        engine.check_integrity()
    engine.check_idle_integrity()
    return outs


def test_sixteen_concurrent_equal_each_alone():
    prompts = [prompt(3 + 7 * i, seed=i) for i in range(16)]  # 3..108 tokens
    batched = make_engine(num_blocks=256, max_num_batched_tokens=64).generate(prompts, GREEDY)
    for p, out in zip(prompts, batched, strict=True):
        alone = make_engine(num_blocks=256, max_num_seqs=1).generate([p], GREEDY)[0]
        assert list(out.token_ids) == list(alone.token_ids) == reference_tokens(p, 12)
        assert out.finish_reason.value == "length"
        assert out.text == bytes(list(out.token_ids)).decode("utf-8", errors="replace")


def test_chunked_prefill_runs_alongside_decodes():
    # Without speculation: the test counts each step's positions (drafts would add to decodes).
    engine = make_engine(num_blocks=128, max_num_batched_tokens=16, speculation="off")
    short = engine.add_request(RequestSpec("short", prompt(5), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)))
    engine.step()  # short's whole prompt fits in one step
    engine.add_request(RequestSpec("long", prompt(70, seed=3), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    outs = run_to_end(engine)
    history = engine.runner.history
    long_chunks = [c for step in history for c in step if c[0] == "long"]
    prefill = [c for c in long_chunks if c[1] < 70]
    assert len(prefill) >= 5, "a 70-token prompt under a 16-token budget is split over several steps"
    assert sum(c[2] for c in prefill) == 70 and [c[3] for c in prefill] == [False] * (len(prefill) - 1) + [True]
    assert [c[1:] for c in long_chunks[len(prefill):]] == [(70, 1, True), (71, 1, True)]  # then decodes
    # some step computes a chunk of the long prompt and a decode of the short request together
    both = [step for step in history
            if any(c[0] == "long" and not c[3] for c in step) and any(c[0] == "short" and c[2] == 1 for c in step)]
    assert both
    assert all(sum(c[2] for c in step) <= 16 for step in history)
    assert list(outs["long"][-1].final.token_ids) == reference_tokens(prompt(70, seed=3), 3)
    assert list(outs["short"][-1].final.token_ids) == reference_tokens(prompt(5), 20)
    assert short.first_token_time is not None


def test_prefix_cache_computes_only_uncached_tokens():
    engine = make_engine(num_blocks=64, block_size=4, speculation="off")  # it counts positions computed
    shared = prompt(24, seed=9)  # 6 full blocks
    p = shared + [1, 2, 3]
    first = engine.generate([p], GREEDY)[0]
    before = engine.runner.tokens_computed
    stats0 = engine.stats
    second = engine.generate([p], GREEDY)[0]
    assert list(second.token_ids) == list(first.token_ids) == reference_tokens(p, 12)
    assert second.usage.cached_input_tokens == 24
    # 3 uncached prompt tokens, then 11 decode steps (the 12th token is sampled, never computed)
    assert engine.runner.tokens_computed - before == 3 + 11
    assert engine.stats.prompt_tokens_computed - stats0.prompt_tokens_computed == 3
    assert engine.stats.prefix_cache_hit_tokens - stats0.prefix_cache_hit_tokens == 24


def test_cache_salt_keeps_prefixes_apart():
    """Requests share cached blocks only with requests of the same salt (the server's tenant isolation)."""
    engine = make_engine(num_blocks=64, block_size=4)
    p = prompt(24, seed=9) + [1, 2, 3]

    def cached(salt: str | None) -> int:
        engine.add_request(RequestSpec(f"r-{salt}-{engine.stats.steps}", p, GREEDY, cache_salt=salt))
        outs = run_to_end(engine)
        (final,) = [o.final for os in outs.values() for o in os if o.finished]
        assert list(final.token_ids) == reference_tokens(p, 12)  # the salt changes nothing but the cache
        return final.usage.cached_input_tokens

    assert cached("alice") == 0
    assert cached("alice") == 24
    assert cached("bob") == 0  # same prompt, other salt: no hit
    assert cached(None) == 0  # unsalted requests do not see salted blocks either


def test_full_prompt_hit_still_computes_last_token():
    engine = make_engine(block_size=4)
    p = prompt(16, seed=4)  # exactly 4 blocks
    first = engine.generate([p], GREEDY)[0]
    before = engine.stats.prompt_tokens_computed
    second = engine.generate([p], GREEDY)[0]
    assert second.usage.cached_input_tokens == 12  # the last block is recomputed for its last token's logits
    assert engine.stats.prompt_tokens_computed - before == 4
    assert second.token_ids == first.token_ids


def test_extra_key_isolation_in_the_engine():
    engine = make_engine(block_size=4, slots=FakeAdapterSlots(max_active=2))
    p = prompt(20, seed=2)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def run(rid, key):
        engine.add_request(RequestSpec(rid, p, sp, adapter_version=key))
        return run_to_end(engine)[rid][-1].final

    base = run("a", None)
    other = run("b", "adapter-v1")
    assert other.usage.cached_input_tokens == 0
    assert list(other.token_ids) == reference_tokens(p, 4, "adapter-v1") != list(base.token_ids)
    same = run("c", "adapter-v1")
    assert same.usage.cached_input_tokens == 16 and same.token_ids == other.token_ids
    again = run("d", None)
    assert again.usage.cached_input_tokens == 16 and again.token_ids == base.token_ids


def test_identical_prompts_in_one_step_both_correct():
    engine = make_engine(block_size=4)
    p = prompt(13, seed=6)
    outs = engine.generate([p, p, p], GREEDY)
    assert all(list(o.token_ids) == reference_tokens(p, 12) for o in outs)
    engine.check_idle_integrity()


def test_preemption_keeps_outputs_and_returns_blocks():
    prompts = [prompt(6 + 3 * i, seed=20 + i) for i in range(6)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for caching in (True, False):
        engine = make_engine(num_blocks=14, block_size=4, enable_prefix_caching=caching)
        for i, p in enumerate(prompts):
            engine.add_request(RequestSpec(f"r{i}", p, sp))
        outs = run_to_end(engine)
        assert engine.stats.preemptions > 0
        for i, p in enumerate(prompts):
            assert list(outs[f"r{i}"][-1].final.token_ids) == reference_tokens(p, 16)
            # streamed tokens arrive exactly once each, in order, despite recomputation
            assert [t for o in outs[f"r{i}"] for t in o.new_token_ids] == reference_tokens(p, 16)
        assert engine.pool.num_in_use == 0


def test_preemption_victim_is_lowest_priority_then_latest():
    # 8 blocks of 2 tokens: three growing requests cannot all fit
    engine = make_engine(runner=FakeRunner(num_blocks=8, block_size=2))
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request(RequestSpec("early", prompt(4, seed=2), sp))
    engine.add_request(RequestSpec("late", prompt(4, seed=3), sp))
    engine.add_request(RequestSpec("urgent", prompt(4, seed=1), sp, priority=-1))
    outs = run_to_end(engine)
    preempted = engine.runner.preempted
    assert preempted[0] == "late" and "urgent" not in preempted
    for rid, seed in [("early", 2), ("late", 3), ("urgent", 1)]:
        final = outs[rid][-1].final
        # the pool holds 16 tokens: a request ends (LENGTH) once its context fills it
        assert final.finish_reason.value == "length" and len(final.token_ids) == 17 - 4
        assert list(final.token_ids) == reference_tokens(prompt(4, seed=seed), 13)


def test_waiting_order_priority_then_arrival():
    engine = make_engine(max_num_seqs=1)
    sp = SamplingParams(max_tokens=1, temperature=0)
    for rid, prio in [("a", 1), ("b", 0), ("c", 1), ("d", 0)]:
        engine.add_request(RequestSpec(rid, prompt(3), sp, priority=prio))
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["b", "d", "a", "c"]


def test_shared_prefix_submitted_together_is_computed_once():
    """Requests arriving with a prefix another request is computing in this very step wait one step and
    reuse its blocks instead of computing the same prefix again."""
    engine = make_engine(num_blocks=128, block_size=4, max_num_batched_tokens=256)
    shared = list(range(20, 52))  # 32 tokens = 8 full blocks
    prompts = [shared + [60 + i, 61 + i, 62 + i] for i in range(6)]
    outs = engine.generate(prompts, GREEDY)
    # the prefix once (32) + each request's own 3 tokens
    assert engine.stats.prompt_tokens_computed == 32 + 6 * 3
    assert [o.usage.cached_input_tokens for o in outs] == [0] + [32] * 5
    for p, o in zip(prompts, outs):
        assert list(o.token_ids) == reference_tokens(p, GREEDY.max_tokens)
