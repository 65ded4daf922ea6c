"""A light tenant's latency under a flood (the `vtc` policy) on the fake runner, torch-free: short shared steps,
the step a tenant that is not backlogged gets to itself, and the seats it may take (service.engine.scheduler)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.engine.fair_tenants import Tenants, flood
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import make_engine, reference_tokens

# Four seats, a step budget of 256 tokens, a shared step's prompt tokens bounded by 32.
SHARED = dict(num_blocks=1024, block_size=4, max_num_seqs=4, max_num_batched_tokens=256, enable_prefix_caching=False)


def long_prompt_flood(limit: int) -> Tenants:
    """flood keeps 8 requests of 200-token prompts waiting; light has one request running."""
    t = Tenants(make_engine(scheduling_policy="vtc", max_shared_prefill_tokens=limit, **SHARED),
                {"flood": (200, 4), "light": (8, 100)}, depth={"flood": 8})
    t.run(20)  # flood alone: whole budgets of its prompts
    assert max(sum(t.prompt_tokens(s).values()) for s in range(20)) == 256
    t.submit("light")
    t.run(3)
    return t


def test_a_light_tenants_request_waits_for_short_steps_only_under_a_flood_of_long_prompts():
    t = long_prompt_flood(32)
    engine = t.engine
    first = len(engine.runner.history)
    rid = t.submit("light")
    t.run(1)
    # Its prompt came first in the step after it arrived, ahead of flood's running prompts, alone: light is not
    # backlogged (this is its only request waiting), so its step computes its prompt only (flood's decodes go on)...
    assert engine.get_request(rid).num_output_tokens == 1
    assert t.prompt_tokens(len(engine.runner.history) - 1) == {"light": 8}
    t.run(40)
    # ... and while both tenants have requests in, no step computes more than 32 prompt tokens.
    assert all(sum(t.prompt_tokens(s).values()) <= 32 for s in range(first, len(engine.runner.history)))
    assert sum(t.prompt_tokens(s).get("flood", 0) for s in range(first, len(engine.runner.history))) >= 30 * 16


def test_without_the_bound_a_shared_step_computes_whole_long_prompts():
    t = long_prompt_flood(256)
    first = len(t.engine.runner.history)
    t.submit("light")
    t.run(5)
    assert max(sum(t.prompt_tokens(s).values()) for s in range(first, len(t.engine.runner.history))) >= 200


def test_the_bound_holds_up_no_prompt_while_the_next_request_cannot_start():
    # light's request waits for its adapter; it may claim half of each step's prompt tokens, never all of them.
    slots = FakeAdapterSlots(max_active=2, load_polls={"slow": 10_000})
    engine = make_engine(scheduling_policy="vtc", slots=slots, max_shared_prefill_tokens=32, **SHARED)
    t = Tenants(engine, {"flood": (200, 4), "light": (40, 4)}, depth={"flood": 8})
    t.add("light-slow", "light", 40, adapter_version="slow")
    first = len(engine.runner.history)
    t.run(50)
    assert engine.get_request("light-slow").first_scheduled_time is None
    steps = range(first, len(engine.runner.history))
    assert len(steps) == 50 and all(t.prompt_tokens(s).get("flood", 0) >= 16 for s in steps)
    # light is not backlogged, so its claim is exclusive every other step (never two in a row); each such step, it
    # not being admitted, the prompts it held back get the whole room it left.
    assert sum(t.prompt_tokens(s).get("flood", 0) == 32 for s in steps) >= 24


def test_a_waiting_request_that_cannot_have_a_seat_holds_back_no_prompt_room():
    # b holds three of the four seats decoding (long outputs) and keeps requests waiting: it is backlogged and holds
    # seats, so it may take none from flood. Its next request, first in the fair order (b is behind flood), cannot
    # start while every seat is taken; flood's running prompt gets the step's whole shared room, not the half that
    # request would claim.
    t = Tenants(make_engine(scheduling_policy="vtc", max_shared_prefill_tokens=32, **SHARED),
                {"flood": (400, 4), "b": (8, 200)}, depth={"flood": 4, "b": 4})
    t.run(60)
    sched = t.engine.scheduler
    assert Counter(r.tenant for r in sched.running) == {"b": 3, "flood": 1}
    assert sched.fair.counter("b") < sched.fair.counter("flood")
    assert sched.waiting.peek().request.tenant == "b"
    first = len(t.engine.runner.history)
    t.run(5)
    assert [t.prompt_tokens(s).get("flood", 0) for s in range(first, first + 5)] == [32] * 5


def long_prompt_beside_light(**more: tuple[int, int]) -> Tenants:
    """light has one request decoding (100 tokens); flood's 400-token prompt runs in chunks of the shared room (32)
    beside it, three steps in. `more`: further tenants' shapes."""
    t = Tenants(make_engine(scheduling_policy="vtc", max_shared_prefill_tokens=32, **SHARED),
                {"flood": (400, 4), "light": (8, 100), **more})
    t.submit("light")
    t.step()
    t.submit("flood")
    t.run(3, refill=False)
    return t


@pytest.mark.parametrize("new_requests", [1, 3])
def test_only_a_tenant_that_is_not_backlogged_gets_a_step_to_itself(new_requests):
    # Beside flood's long prompt, light sends one request (not backlogged: its step computes its prompt alone) or
    # three (backlogged: its claim is its share, and flood's prompt goes on in the same step).
    t = long_prompt_beside_light()
    fair = t.engine.scheduler.fair
    assert fair.counter("light") < fair.counter("flood")
    for _ in range(new_requests):
        t.submit("light")
    t.step()
    step = t.prompt_tokens(len(t.engine.runner.history) - 1)
    if new_requests == 1:
        assert step == {"light": 8}
    else:
        assert step == {"flood": 24, "light": 8}


def test_light_requests_in_consecutive_steps_do_not_hold_back_the_running_prompts():
    # Two light tenants' requests arrive one step apart while flood's long prompt runs: the first gets a step to
    # itself, the second shares its step (an exclusive step is never followed by another), so flood's prompt goes on
    # at least every other step however many light tenants arrive.
    t = long_prompt_beside_light(l1=(8, 4), l2=(8, 4))
    history = t.engine.runner.history
    computed = lambda: {k: v for k, v in t.prompt_tokens(len(history) - 1).items() if v}  # noqa: E731
    t.submit("l1")
    t.step()
    assert computed() == {"l1": 8}
    t.submit("l2")
    t.step()
    assert computed() == {"flood": 24, "l2": 8}


def test_a_light_requests_prompt_longer_than_the_bound_goes_in_one_step_of_its_own():
    # light's one request has an 80-token prompt, beyond the shared bound of 32: its step computes all of it (the
    # room grows to hold it; flood's prompt held back), so its first token comes after one step, not three. The
    # next step is flood's again, within the bound.
    t = long_prompt_beside_light(l1=(80, 4))
    history = t.engine.runner.history
    computed = lambda: {k: v for k, v in t.prompt_tokens(len(history) - 1).items() if v}  # noqa: E731
    rid = t.submit("l1")
    t.step()
    assert computed() == {"l1": 80}
    assert t.engine.get_request(rid).num_output_tokens == 1
    t.step()
    assert computed() == {"flood": 32}


def test_a_held_back_prompt_whose_seat_is_taken_is_not_scheduled():
    # Every seat taken: flood's two decodes and its long prompt in chunks (its latest arrival), and light's request.
    # light's next request claims the step exclusively (flood's prompt held back) but waits for its adapter;
    # other, with no seat, then takes one from flood: its latest arrival, the held-back prompt. That request is
    # preempted; the room light's claim left goes to held-back prompts still running, never to it.
    slots = FakeAdapterSlots(max_active=2, load_polls={"slow": 10_000})
    engine = make_engine(scheduling_policy="vtc", slots=slots, max_shared_prefill_tokens=32, **SHARED)
    t = Tenants(engine, {"flood": (8, 100), "light": (8, 100), "other": (8, 4)})
    for _ in range(2):
        t.submit("flood")
    t.step()
    t.submit("light")
    t.step()
    t.add("flood-long", "flood", 400, seed=99)
    t.run(2, refill=False)
    running = {r.request_id for r in engine.scheduler.running}
    assert len(running) == 4 and "flood-long" in running
    assert 0 < engine.get_request("flood-long").num_computed_tokens < 400  # its prompt in chunks
    t.add("light-slow", "light", 8, seed=98, adapter_version="slow")
    t.submit("other")
    t.submit("other")
    t.step()  # check_integrity after the step: the pool is referenced exactly by the running requests
    assert engine.runner.preempted == ["flood-long"]
    assert "flood-long" not in {rid for rid, *_ in engine.runner.history[-1]}


def seats_taken(policy: str) -> Tenants:
    """Four seats: three of A's requests and one of B's running, more of both waiting."""
    engine = make_engine(scheduling_policy=policy, num_blocks=256, block_size=4, max_num_seqs=4,
                         max_num_batched_tokens=256, enable_prefix_caching=False)
    t = Tenants(engine, {"a": (16, 40), "b": (16, 40), "light": (8, 4)})
    for _ in range(3):
        t.submit("a")
    t.step()
    t.submit("b")
    t.step()
    for _ in range(4):
        t.submit("a")
        t.submit("b")
    t.run(5, refill=False)
    assert Counter(r.tenant for r in engine.scheduler.running) == {"a": 3, "b": 1}
    return t


def test_a_tenant_with_no_seat_takes_one_from_the_tenant_furthest_ahead():
    t = seats_taken("vtc")
    engine = t.engine
    newest_a = max((r for r in engine.scheduler.running if r.tenant == "a"), key=lambda r: r.arrival_seq)
    rid = t.submit("light")
    t.step()
    assert engine.get_request(rid).num_output_tokens == 1, "the light request waited for a seat"
    assert engine.runner.preempted == [newest_a.request_id]
    assert len(engine.scheduler.running) == 4  # the seat limit holds
    victim = newest_a.request_id
    for _ in range(1000):  # the victim resumes (the fake runner checks every KV position it reads back)
        if engine.get_request(victim) is None:
            break
        t.step()
    assert engine.get_request(victim) is None, "the preempted request never finished"
    assert newest_a.output_token_ids == reference_tokens(newest_a.prompt_token_ids, 40)


def test_a_light_tenant_whose_request_is_running_takes_a_seat_for_its_next_one():
    # light's first request holds a seat (40 tokens to go) when its second arrives; every seat is taken and a holds
    # three. light is not backlogged (its new request is its only one waiting), so the new request takes a seat
    # from a (a keeps more seats than light) instead of waiting for one of a's requests to end.
    engine = make_engine(scheduling_policy="vtc", num_blocks=256, block_size=4, max_num_seqs=4,
                         max_num_batched_tokens=256, enable_prefix_caching=False)
    t = Tenants(engine, {"a": (16, 40), "light": (8, 40)})
    for _ in range(3):
        t.submit("a")
    t.step()
    t.submit("light")
    t.step()
    for _ in range(4):
        t.submit("a")
    t.run(3, refill=False)
    running = lambda: Counter(r.tenant for r in engine.scheduler.running)  # noqa: E731
    assert running() == {"a": 3, "light": 1} and not engine.runner.preempted
    second = t.submit("light")
    t.step()
    assert engine.get_request(second).num_output_tokens == 1, "light's second request waited for a seat"
    assert running() == {"a": 2, "light": 2} and len(engine.runner.preempted) == 1
    # With two seats each, light's third request waits: a move would leave a with fewer seats than light.
    third = t.submit("light")
    t.run(3, refill=False)
    assert engine.get_request(third).first_scheduled_time is None and len(engine.runner.preempted) == 1


def test_a_backlogged_tenant_holding_a_seat_takes_no_other():
    # b holds one seat and a three, both with requests waiting; b is behind a, but backlogged: it waits for a free
    # seat (a seat taken from a backlogged tenant would only be taken back).
    t = seats_taken("vtc")
    fair = t.engine.scheduler.fair
    assert fair.counter("b") < fair.counter("a")
    t.run(10, refill=False)
    assert Counter(r.tenant for r in t.engine.scheduler.running) == {"a": 3, "b": 1}
    assert not t.engine.runner.preempted


def test_fcfs_takes_no_seat():
    t = seats_taken("fcfs")
    rid = t.submit("light")
    t.run(3, refill=False)
    assert t.engine.get_request(rid).first_scheduled_time is None and not t.engine.runner.preempted


def test_a_seat_is_not_taken_for_a_lower_priority_request():
    t = seats_taken("vtc")
    rid = t.submit("light", priority=1)
    t.run(3, refill=False)
    assert t.engine.get_request(rid).first_scheduled_time is None and not t.engine.runner.preempted


def test_seats_are_taken_rarely_between_backlogged_tenants():
    t = flood("vtc")
    # Only when one of them holds no seat at all (here: the other's requests filled every seat)
    finished = next(t.ids) - sum(1 for _ in t.engine.scheduler.waiting) - t.engine.scheduler.num_running
    assert t.engine.scheduler.num_preemptions <= 0.01 * finished, (t.engine.scheduler.num_preemptions, finished)
