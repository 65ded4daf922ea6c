"""Speculative decoding in the engine, torch-free, on the fake runner (which reads every position's KV back from
its arena through the block table, drafts included): the n-gram proposer, greedy outputs identical with and
without speculation over mixed adapters, prefix hits and preemption, stops inside an accepted run, adaptive k,
the batch-level switch, and the pool whole after random submits and cancels with drafts in flight."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import EngineConfig
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.speculative import NgramProposer, SpecState, accept
from service.engine.types import FinishReason
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import VOCAB, FakeRunner, ScriptedRunner, _key_code, make_engine, prompt


def periodic_next(context: Sequence[tuple[int, int, str | None]]) -> int:
    """A model that repeats its context with a period set by the adapter (and mixes in every position's
    adapter, so KV of the wrong adapter changes the token): what prompt lookup predicts well."""
    key = context[-1][2]
    period = 3 + _key_code(key) % 5
    n = len(context)
    if n < period:
        return (context[-1][0] + 1) % VOCAB
    base = context[n - period][0]
    mix = sum(_key_code(k) for _, _, k in context[-period:]) % 2  # 0 unless keys differ inside the window
    return (base + mix) % VOCAB


class PeriodicRunner(FakeRunner):
    def choose(self, request, context, ahead: int = 0) -> int:
        return periodic_next(context)


def periodic_reference(p: Sequence[int], n: int, key: str | None) -> list[int]:
    ids = list(p)
    out = []
    for _ in range(n):
        t = periodic_next([(tok, i, key) for i, tok in enumerate(ids)])
        out.append(t)
        ids.append(t)
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


# ---- the proposer ------------------------------------------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    prop = NgramProposer(1, 3)
    st_ = SpecState(prop, 4, 4)
    tokens = [5, 6, 7, 8, 9, 1, 2, 6, 7, 8]
    # the last 3 tokens (6 7 8) occurred at positions 1-3, followed by 9 1 2 6
    assert prop.propose(st_, tokens, 4) == [9, 1, 2, 6]
    assert prop.propose(st_, tokens, 2) == [9, 1]
    tokens += [3]  # "3" never occurred: nothing of any n matches
    assert prop.propose(st_, tokens, 4) == []
    tokens += [5, 6]  # 5 6 occurred at 0-1 (followed by 7 8 9 1); the index grew incrementally
    assert prop.propose(st_, tokens, 4) == [7, 8, 9, 1]
    assert st_.indexed == len(tokens)


def test_ngram_prefers_the_longest_match():
    prop = NgramProposer(1, 2)
    # "4" alone last occurred at position 4 (followed by 9); "3 4" occurred at 0-1 (followed by 7)
    tokens = [3, 4, 7, 0, 4, 9, 3, 4]
    assert prop.propose(SpecState(prop, 4, 4), tokens, 1) == [7]
    assert NgramProposer(1, 1).propose(SpecState(prop, 4, 4), tokens, 1) == [9]


def test_ngram_range_is_validated():
    with pytest.raises(ValueError, match="ngram range 3-2"):
        NgramProposer(3, 2)


def test_accept_counts_the_leading_matches():
    assert accept([1, 2, 3], [1, 2, 3, 4]) == 3
    assert accept([1, 2, 3], [1, 5, 3, 4]) == 1
    assert accept([1], [2, 9]) == 0


def test_adaptive_k_shrinks_on_rejections_and_grows_on_acceptances():
    s = SpecState(NgramProposer(), 6, 6)
    s.on_verified(6, 2)
    assert s.k == 3
    s.on_verified(3, 0)
    assert s.k == 1
    s.on_verified(1, 1)
    s.on_verified(2, 2)
    assert s.k == 3 and (s.draft_tokens, s.accepted_tokens, s.verifies) == (12, 5, 4)
    for _ in range(10):
        s.on_verified(s.k, s.k)
    assert s.k == 6  # never past max_k


def test_drafts_only_where_they_pay_at_the_step_load():
    s = SpecState(NgramProposer(), 8, 8, alpha=0.9)
    # bar = load * cost / (1 + load * cost): 0.44 alone, 0.86 beside 7 others (cost 0.8)
    assert s.worth(8, 1, 0.8) == 7  # 0.9**7 = 0.48 > 0.44 > 0.9**8
    assert s.worth(8, 8, 0.8) == 1  # 0.9 > 0.86 > 0.81
    assert s.worth(8, 64, 0.0) == 8  # free positions: every draft pays
    s.alpha = 0.2
    # not worth it: a one-draft probe now, then none for 8 steps, then a probe, then 16 steps, ...
    seen = [s.worth(4, 8, 0.8) for _ in range(30)]
    assert seen[0] == 1 and seen[1:9] == [0] * 8 and seen[9] == 1 and seen[10:26] == [0] * 16 and seen[26] == 1
    s.on_verified(1, 1)  # an accepted probe lifts the estimate
    assert s.alpha > 0.2


# ---- exactness ---------------------------------------------------------------------------------------------
def _mixed_run(speculation: str, num_blocks: int = 256, **cfg):
    slots = FakeAdapterSlots(max_active=3)
    runner = PeriodicRunner(num_blocks=num_blocks, block_size=4, max_model_len=256, slots=slots)
    engine = make_engine(runner=runner, slots=slots, speculation=speculation, draft_token_cost=0, **cfg)
    shared = prompt(20, seed=4)
    prompts, keys = [], []
    for i in range(9):
        key = [None, "va", "vb"][i % 3]
        p = shared + prompt(3 + i, seed=i) if i % 2 else prompt(6 + i, seed=i)  # half share a prefix
        prompts.append(p)
        keys.append(key)
    finals = engine.generate(prompts, greedy(40), adapter_versions=keys)
    engine.check_idle_integrity()
    return engine, runner, prompts, keys, finals


def test_greedy_is_identical_with_and_without_speculation_over_a_mixed_batch():
    off_engine, off_runner, prompts, keys, off = _mixed_run("off")
    on_engine, on_runner, _, _, on = _mixed_run("ngram")
    for p, key, a, b in zip(prompts, keys, off, on, strict=True):
        assert list(a.token_ids) == list(b.token_ids) == periodic_reference(p, 40, key)
        assert a.text == b.text and a.finish_reason is b.finish_reason is FinishReason.LENGTH
        assert b.usage == a.usage  # output tokens as produced, never drafts
    stats = on_engine.stats
    assert on_engine.stats.prefix_cache_hit_tokens > 0 and on_runner.drafts_seen > 0
    assert stats.spec_accepted_tokens > 0.8 * stats.spec_draft_tokens, "a periodic model is easy to predict"
    assert on_engine.num_steps < 0.6 * off_engine.num_steps, "accepted drafts save steps"
    assert sum(f.speculation.accepted_tokens for f in on) == stats.spec_accepted_tokens
    assert all(f.speculation.draft_tokens == 0 for f in off)
    assert sum(stats.spec_accepted_lengths) > 0


def test_greedy_is_identical_under_preemption_with_a_tiny_block_budget():
    engine, runner, prompts, keys, on = _mixed_run("ngram", num_blocks=16)
    assert engine.stats.preemptions > 0 and runner.drafts_seen > 0
    limit = 16 * 4 + 1  # a context the pool can hold, plus the token sampled from it
    for p, key, f in zip(prompts, keys, on, strict=True):
        assert list(f.token_ids) == periodic_reference(p, min(40, limit - len(p)), key)


def test_random_model_rejects_most_drafts_and_stays_exact():
    # the hash model: tokens look random, so 1-gram lookups propose often and are mostly rejected
    from tests.engine.fake_runner import reference_tokens

    engine = make_engine(num_blocks=64, speculation="ngram", draft_token_cost=0)
    prompts = [prompt(12, seed=i) for i in range(4)]
    finals = engine.generate(prompts, greedy(30))
    assert engine.runner.drafts_seen > 0 and engine.stats.spec_accepted_tokens < engine.stats.spec_draft_tokens
    for p, f in zip(prompts, finals, strict=True):
        assert list(f.token_ids) == reference_tokens(p, 30)
    engine.check_idle_integrity()


@pytest.mark.parametrize("stop", ["eos", "stop_id", "stop_string", "max_tokens"])
def test_a_stop_inside_an_accepted_run_drops_the_tokens_after_it(stop):
    cycle = [ord(c) for c in "abcdefgh"]
    script = cycle * 6
    at = 21  # the stop lands in the middle of the third period, inside a run of accepted drafts
    kw: dict = {}
    if stop == "eos":
        script = script[:at] + [256] + script[at + 1:]
        kw = {"max_tokens": 40}
    elif stop == "stop_id":
        kw = {"max_tokens": 40, "stop_token_ids": frozenset({script[at]})}
        script = script[:at] + [script[at]] + script[at + 1:]
    elif stop == "stop_string":
        kw = {"max_tokens": 40, "stop": ("fgha",)}
    else:
        kw = {"max_tokens": at + 1}
    finals = {}
    for mode in ("off", "ngram"):
        runner = ScriptedRunner({"r": script}, num_blocks=64, block_size=4)
        engine = make_engine(runner=runner, speculation=mode, draft_token_cost=0)
        engine.add_request(RequestSpec("r", tuple(cycle), SamplingParams(temperature=0, **kw)))
        outs = []
        while engine.has_unfinished():
            outs.extend(o for o in engine.step() if o.request_id == "r")
        engine.check_idle_integrity()
        finals[mode] = (outs[-1].final, [t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs))
        if mode == "ngram":
            assert runner.drafts_seen > 0 and engine.stats.spec_accepted_tokens > 0
    off, on = finals["off"], finals["ngram"]
    assert on[0].token_ids == off[0].token_ids and on[0].text == off[0].text
    assert on[0].finish_reason is off[0].finish_reason
    assert on[1] == off[1] == list(off[0].token_ids)  # the streamed deltas, too
    assert on[2] == off[2] == off[0].text
    assert on[0].usage == off[0].usage


# ---- when it does not pay --------------------------------------------------------------------------------
def test_no_drafts_once_the_step_is_past_the_step_bound():
    engine = make_engine(num_blocks=256, runner=PeriodicRunner(num_blocks=256, block_size=4),
                         speculation="ngram", speculative_max_step_tokens=4, draft_token_cost=0)
    prompts = [prompt(8, seed=i) for i in range(6)]
    engine.generate(prompts, [greedy(4 + 6 * i) for i in range(6)])  # they finish one after another
    drafted = 0
    for step in engine.runner.history:
        drafts = sum(n - 1 for _, start, n, _ in step if start >= 8)  # chunks past the prompt: decodes
        drafted += drafts
        assert not drafts or sum(n for _, _, n, _ in step) <= 4, f"drafts past the step bound: {step}"
    assert drafted > 0  # once few requests are left, they speculate
    # six decodes alone exceed the bound of 4: a step of six decodes carries no drafts
    full = [step for step in engine.runner.history if len(step) == 6 and all(start >= 8 for _, start, _, _ in step)]
    assert full and all(n == 1 for step in full for _, _, n, _ in step)


def test_a_request_may_turn_speculation_off_or_bound_its_drafts():
    engine = make_engine(runner=PeriodicRunner(num_blocks=64, block_size=4), speculation="ngram", draft_token_cost=0)
    p = prompt(8)
    engine.generate([p], greedy(20, speculation="off"))
    assert engine.runner.drafts_seen == 0
    engine.generate([p], greedy(20, max_draft_tokens=2))
    assert engine.runner.drafts_seen > 0
    assert max(n for step in engine.runner.history for _, start, n, _ in step if start >= 8) == 3
    engine.generate([p], greedy(20, speculation="off"))
    off_engine = make_engine(runner=PeriodicRunner(num_blocks=64, block_size=4), speculation="off",
                             draft_token_cost=0)
    before = off_engine.runner.drafts_seen
    off_engine.generate([p], greedy(20, speculation="ngram"))  # the request's choice beats the default
    assert off_engine.runner.drafts_seen > before


def test_bad_speculation_values_are_refused_by_name():
    with pytest.raises(ValueError, match="speculation='fast' is invalid"):
        SamplingParams(speculation="fast")
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="max_draft_tokens="):
            SamplingParams(max_draft_tokens=bad)
    engine = make_engine()
    with pytest.raises(ValueError, match="speculation='draft' is not available"):
        engine.add_request(RequestSpec("d", (1, 2), SamplingParams(speculation="draft")))
    assert engine.get_request("d") is None and engine.scheduler.num_waiting == 0
    with pytest.raises(ValueError, match="speculation='draft' needs a draft model"):
        make_engine(speculation="draft")  # the default "draft" on an engine without a draft model
    with pytest.raises(ValueError, match="ngram_min=3 is larger than ngram_max=2"):
        EngineConfig(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="speculative_max_step_tokens=0"):
        EngineConfig(speculative_max_step_tokens=0)


# ---- the pool stays whole ----------------------------------------------------------------------------------
op = st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 20), st.integers(0, 3), st.integers(1, 24)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=4, max_size=40), block_size=st.sampled_from([1, 2, 4, 8]),
       num_blocks=st.integers(3, 24), budget=st.integers(1, 24), max_k=st.integers(1, 6),
       step_bound=st.integers(1, 24), caching=st.booleans(), cost=st.sampled_from([0, 0, 0.8]))
def test_random_submit_and_cancel_with_drafts_in_flight_keep_the_pool_whole(
        ops, block_size, num_blocks, budget, max_k, step_bound, caching, cost):
    runner = PeriodicRunner(num_blocks=num_blocks, block_size=block_size, max_model_len=64)
    engine = make_engine(runner=runner, max_num_batched_tokens=budget, max_num_seqs=4, max_waiting=8,
                         enable_prefix_caching=caching, speculation="ngram", max_draft_tokens=max_k,
                         speculative_max_step_tokens=step_bound, draft_token_cost=cost)
    submitted: dict[str, tuple[list[int], int]] = {}
    finals = {}

    def check():
        engine.check_integrity()
        pool = engine.pool
        assert pool.num_free + pool.num_cached + pool.num_in_use == pool.num_blocks
        for req in engine.scheduler.running:
            # hashed blocks: only full blocks of accepted tokens, each under the hash of what it holds
            computed_full = req.num_computed_tokens // block_size
            assert len(req.block_ids) <= engine.scheduler.kv.num_blocks_for(req.num_tokens), "a draft block kept"
            for i, bid in enumerate(req.block_ids):
                h = pool._blocks[bid].block_hash
                if h is not None:
                    assert i < computed_full and h == req.block_hashes[i]

    def collect(outs):
        for o in outs:
            if o.finished:
                finals[o.request_id] = o.final

    for i, (kind, *args) in enumerate(ops):
        if kind == "submit":
            length, seed, max_tokens = args
            p = prompt(length, seed=seed)
            try:
                engine.add_request(RequestSpec(f"r{i}", p, greedy(max_tokens)))
                submitted[f"r{i}"] = (p, max_tokens)
            except Exception as e:  # a full queue, or a prompt the pool can never hold
                assert "queue is full" in str(e) or "KV blocks" in str(e) or "too long" in str(e)
        elif kind == "abort":
            if submitted:
                ids = list(submitted)
                engine.abort_request(ids[args[0] % len(ids)])
        else:
            for _ in range(args[0]):
                collect(engine.step())
                check()
        check()
    steps = 0
    while engine.has_unfinished():
        collect(engine.step())
        check()
        steps += 1
        assert steps < 3000
    engine.check_idle_integrity()
    limit = min(64, num_blocks * block_size + 1)
    for rid, (p, max_tokens) in submitted.items():
        f = finals[rid]
        if f.finish_reason is FinishReason.CANCELLED:
            assert list(f.token_ids) == periodic_reference(p, len(f.token_ids), None)
        else:
            assert list(f.token_ids) == periodic_reference(p, min(max_tokens, limit - len(p)), None)


def test_drafts_never_evict_a_cached_prefix():
    runner = PeriodicRunner(num_blocks=12, block_size=4, max_model_len=64)
    engine = make_engine(runner=runner, speculation="ngram", draft_token_cost=0)
    a = prompt(24, seed=1)
    engine.generate([a], greedy(3, speculation="off"))  # 6 full prompt blocks stay cached
    assert engine.pool.num_cached >= 6
    b = prompt(8, seed=2)
    engine.generate([b], greedy(11))  # 19 tokens: the 5 free blocks hold them, draft positions past them may not
    assert runner.drafts_seen > 0
    again = engine.generate([a], greedy(3, speculation="off"))[0]
    assert again.usage.cached_input_tokens == 20  # a's prefix (5 blocks; its last token is recomputed) survived
    engine.check_idle_integrity()
