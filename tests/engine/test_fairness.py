"""Fair sharing between tenants (the `vtc` policy) on the fake runner, torch-free.

Service is measured here from what the runner computed (each step's chunks: prompt positions computed and
tokens sampled), not read from the scheduler's own counters, and weighted as the policy weighs it (input 1,
output 2, divided by the tenant's weight).

The bound for two backlogged tenants is the one of Sheng et al. (OSDI 2024, Theorem 4.4): over any interval
in which both are backlogged, their weighted service differs by at most 2 * max(w_in * L_in, w_out * M),
where L_in is the longest prompt and M the most tokens the running batch can hold (KV capacity, here also
at most max_num_seqs requests of the longest context). `fcfs` breaks it, which shows the check has teeth.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from service.engine.fairness import FairShare
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import make_engine, prompt, reference_tokens

W_IN, W_OUT = 1.0, 2.0


class Tenants:
    """Drives an engine with backlogged tenants and measures each one's weighted service per step."""

    def __init__(self, engine, shapes: dict[str, tuple[int, int]], weights: dict[str, float] | None = None,
                 depth: dict[str, int] | None = None) -> None:
        self.engine = engine
        self.shapes = shapes  # tenant -> (prompt tokens, output tokens) of each of its requests
        self.weights = weights or {}
        self.depth = depth or {}  # tenant -> requests kept waiting (backlog); 0 = sends nothing
        self.ids = itertools.count()
        self.tenant_of: dict[str, str] = {}
        self.prompt_len: dict[str, int] = {}
        self.service: dict[str, float] = {t: 0.0 for t in shapes}
        self.trace: list[dict[str, float]] = []  # cumulative weighted service after each step
        self.admitted: list[str] = []  # tenants in first-admission order
        engine.set_tenant_weights(lambda t: self.weights.get(t, 1.0))

    def submit(self, tenant: str, priority: int = 0) -> str:
        n_in, n_out = self.shapes[tenant]
        i = next(self.ids)
        rid = f"{tenant}-{i}"
        sp = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        self.engine.add_request(RequestSpec(rid, prompt(n_in, seed=i), sp, tenant=tenant, priority=priority))
        self.tenant_of[rid] = tenant
        self.prompt_len[rid] = n_in
        return rid

    def waiting(self) -> Counter:
        return Counter(r.tenant for r in self.engine.scheduler.waiting)

    def refill(self) -> None:
        waiting = self.waiting()
        for tenant, depth in self.depth.items():
            for _ in range(depth - waiting[tenant]):
                self.submit(tenant)

    def step(self) -> None:
        runner = self.engine.runner
        before = len(runner.history)
        self.engine.step()
        self.engine.check_integrity()
        for rid, start, n, sample in runner.history[before] if len(runner.history) > before else []:
            tenant = self.tenant_of[rid]
            if start == 0:
                self.admitted.append(tenant)
            n_in = max(0, min(start + n, self.prompt_len[rid]) - start)
            self.service[tenant] += (W_IN * n_in + W_OUT * sample) / self.weights.get(tenant, 1.0)
        self.trace.append(dict(self.service))

    def run(self, steps: int, refill: bool = True) -> None:
        for _ in range(steps):
            if refill:
                self.refill()
            self.step()

    def prompt_tokens(self, step: int) -> dict[str, int]:
        """Prompt tokens the runner computed in one step, by tenant."""
        out: Counter = Counter()
        for rid, start, n, _ in self.engine.runner.history[step]:
            out[self.tenant_of[rid]] += max(0, min(start + n, self.prompt_len[rid]) - start)
        return dict(out)

    def max_window_gap(self, a: str, b: str, since: int = 0) -> float:
        """max over intervals [t1, t2] of |service of a - service of b| within the interval."""
        diffs = [s[a] - s[b] for s in self.trace[since:]]
        return max(diffs) - min(diffs)


def paper_bound(longest_prompt: int, batch_tokens: int) -> float:
    return 2 * max(W_IN * longest_prompt, W_OUT * batch_tokens)


ENGINE = dict(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False)


def flood(policy: str) -> Tenants:
    """A sends 4x the requests with 8x longer prompts than B; both stay backlogged for 2000 steps."""
    t = Tenants(make_engine(scheduling_policy=policy, **ENGINE), shapes={"a": (64, 8), "b": (8, 8)},
                depth={"a": 8, "b": 2})
    t.run(2000)
    return t


def test_two_backlogged_tenants_get_equal_service_within_the_paper_bound():
    t = flood("vtc")
    # M: at most max_num_seqs requests of the longest context (64 + 8 tokens) run at once.
    bound = paper_bound(64, ENGINE["max_num_seqs"] * 72)
    gap = t.max_window_gap("a", "b")
    assert gap <= bound, f"backlogged tenants' service differed by {gap} over a window (bound {bound})"
    total_a, total_b = t.service["a"], t.service["b"]
    assert total_a > 10 * bound and total_b > 10 * bound, "the run is too short to say anything"
    assert 0.9 <= total_a / total_b <= 1.1, f"service a={total_a} b={total_b}"


def test_fcfs_lets_the_flooding_tenant_take_the_machine():
    t = flood("fcfs")
    bound = paper_bound(64, ENGINE["max_num_seqs"] * 72)
    assert t.max_window_gap("a", "b") > 2 * bound  # the measure above can fail
    assert t.service["a"] > 3 * t.service["b"]


def test_weights_two_to_one_give_two_to_one_service():
    shapes = {"gold": (16, 8), "std": (16, 8)}
    t = Tenants(make_engine(scheduling_policy="vtc", **ENGINE), shapes, weights={"gold": 2.0, "std": 1.0},
                depth={"gold": 4, "std": 4})
    t.run(400)
    # self.service is already divided by the weight: equal per unit of weight
    assert t.max_window_gap("gold", "std") <= paper_bound(16, ENGINE["max_num_seqs"] * 24)
    raw_gold, raw_std = 2.0 * t.service["gold"], t.service["std"]
    assert 1.9 <= raw_gold / raw_std <= 2.1, f"raw service gold={raw_gold} std={raw_std}"


def test_a_late_tenant_gets_no_credit_for_its_idle_time():
    shapes = {"early": (16, 8), "late": (16, 8)}
    t = Tenants(make_engine(scheduling_policy="vtc", **ENGINE), shapes, depth={"early": 4})
    t.run(300)  # early alone: a large counter
    assert t.service["late"] == 0 and t.service["early"] > 1000
    t.depth["late"] = 4
    start = len(t.trace)
    t.run(200)
    # Had the late tenant started at 0 it would have had the machine alone for ~300 steps.
    bound = paper_bound(16, ENGINE["max_num_seqs"] * 24)
    assert t.max_window_gap("early", "late", since=start) <= bound
    gained_early = t.trace[-1]["early"] - t.trace[start]["early"]
    assert gained_early >= 0.4 * (t.trace[-1]["late"] + gained_early), "the early tenant was starved"


def test_a_tenant_back_from_idle_after_everyone_left_starts_at_the_last_counter():
    f = FairShare("vtc")
    f.arrive("a")
    f.charge("a", input_tokens=100, output_tokens=50)  # 200
    f.leave("a")  # nobody active: a's 200 is the floor
    f.arrive("b")
    assert f.counter("b") == 200.0
    f.arrive("a")  # a was idle, but at 200 already: no lift, no loss
    assert f.counter("a") == 200.0
    f.charge("b", output_tokens=10)
    f.leave("a")
    f.arrive("a")  # back while b (220) is active: lifted to the smallest active counter
    assert f.counter("a") == 220.0


def test_priority_wins_over_fair_share():
    shapes = {"heavy": (16, 8), "light": (16, 8)}
    t = Tenants(make_engine(scheduling_policy="vtc", **ENGINE), shapes, depth={"heavy": 4, "light": 4})
    t.run(100)
    t.depth = {"light": 4}
    # heavy is now far ahead of light
    t.engine.scheduler.fair.charge("heavy", input_tokens=100_000)
    urgent = t.submit("heavy", priority=-1)
    while t.engine.get_request(urgent).first_scheduled_time is None:
        waiting_light = [r for r in t.engine.scheduler.waiting if r.tenant == "light"]
        before = {r.request_id for r in waiting_light}
        t.run(1)
        admitted_light = before - {r.request_id for r in t.engine.scheduler.waiting}
        if t.engine.get_request(urgent).first_scheduled_time is None:
            assert not admitted_light, f"light's {admitted_light} admitted before the higher-priority request"


def test_one_tenant_alone_is_scheduled_exactly_as_fcfs():
    histories = {}
    for policy in ("vtc", "fcfs"):
        # The bound on a shared step's prompt tokens does not apply to a tenant alone.
        engine = make_engine(scheduling_policy=policy, num_blocks=40, block_size=4, max_num_seqs=6,
                             max_num_batched_tokens=48, max_shared_prefill_tokens=8)
        t = Tenants(engine, {"solo": (20, 12)}, depth={"solo": 6})
        t.run(150)
        histories[policy] = engine.runner.history
        assert engine.scheduler.num_preemptions > 0  # the arena is small: preemption is part of the schedule
    assert histories["vtc"] == histories["fcfs"]


def test_preemption_takes_its_victim_from_the_tenant_furthest_ahead():
    # 12 blocks of 4 tokens: four requests of 8-token prompts run, then run out of blocks as they decode.
    engine = make_engine(scheduling_policy="vtc", num_blocks=12, block_size=4, max_num_seqs=4,
                         max_num_batched_tokens=64, enable_prefix_caching=False)
    t = Tenants(engine, {"ahead": (8, 12), "behind": (8, 12)})
    first = [t.submit("ahead"), t.submit("ahead"), t.submit("behind"), t.submit("behind")]
    t.step()
    assert all(engine.get_request(r).num_computed_tokens == 8 for r in first)
    engine.scheduler.fair.charge("ahead", input_tokens=1_000)
    while not engine.runner.preempted:
        t.step()
    # fcfs would take the latest arrival ("behind"'s second request)
    assert {t.tenant_of[r] for r in engine.runner.preempted} == {"ahead"}


def test_a_tenant_whose_adapter_is_loading_does_not_block_the_others():
    slots = FakeAdapterSlots(max_active=2, load_polls={"slow": 10_000})
    engine = make_engine(scheduling_policy="vtc", slots=slots, **ENGINE)
    t = Tenants(engine, {"a": (8, 4), "b": (8, 4)})
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(RequestSpec("a-slow", prompt(8), sp, tenant="a", adapter_version="slow"))
    t.tenant_of["a-slow"], t.prompt_len["a-slow"] = "a", 8
    b = [t.submit("b") for _ in range(3)]
    t.run(10, refill=False)
    assert all(engine.get_request(r) is None for r in b), "b's requests should have finished"
    assert engine.get_request("a-slow").first_scheduled_time is None  # still loading, still waiting
    assert engine.scheduler.fair.counter("a") < engine.scheduler.fair.counter("b")


def test_a_light_tenant_is_admitted_at_the_next_free_seat_under_a_flood():
    t = Tenants(make_engine(scheduling_policy="vtc", **ENGINE), {"flood": (64, 8), "light": (8, 8)},
                depth={"flood": 50})
    t.run(50)
    rid = t.submit("light")
    admissions_before = len(t.admitted)
    t.run(1)
    # Back from idle, light starts level with flood's counter; at equal counters the tenant with fewer requests in
    # goes first, and takes a seat from the tenant with more.
    assert t.engine.get_request(rid).first_scheduled_time is not None
    assert t.admitted[admissions_before:] == ["light"]


@pytest.mark.parametrize("policy", ["vtc", "fcfs"])
def test_counters_follow_the_service_each_tenant_received(policy):
    t = flood(policy)
    fair = t.engine.scheduler.fair
    for tenant in ("a", "b"):
        assert fair.counter(tenant) == pytest.approx(t.service[tenant])
    shares = {s.tenant: s for s in fair.shares()}
    assert shares["a"].service == pytest.approx(t.service["a"]) and shares["a"].weight == 1.0
    assert shares["a"].requests == sum(1 for r in [*t.engine.scheduler.running, *t.engine.scheduler.waiting]
                                       if r.tenant == "a")


def test_bad_fair_share_settings_are_refused_with_their_name():
    from service.config import EngineConfig

    with pytest.raises(ValueError, match="scheduling_policy='lottery'"):
        EngineConfig(scheduling_policy="lottery")
    with pytest.raises(ValueError, match="output_token_weight=-1"):
        EngineConfig(output_token_weight=-1)
    with pytest.raises(ValueError, match="both 0"):
        EngineConfig(input_token_weight=0, output_token_weight=0)
    with pytest.raises(ValueError, match="max_shared_prefill_tokens=0"):
        EngineConfig(max_shared_prefill_tokens=0)


def test_at_equal_counters_the_tenant_with_fewer_requests_goes_first():
    f = FairShare("vtc")
    for _ in range(3):
        f.arrive("flood")
    f.charge("flood", input_tokens=100)
    f.arrive("light")  # back from idle: lifted to flood's 100
    assert f.counter("light") == f.counter("flood") == 100.0
    assert f.key("light") < f.key("flood")
    f.charge("light", input_tokens=1)
    assert f.key("flood") < f.key("light")
    assert FairShare("fcfs").key("light") == FairShare("fcfs").key("flood")


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
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(RequestSpec("light-slow", prompt(40), sp, tenant="light", adapter_version="slow"))
    t.tenant_of["light-slow"], t.prompt_len["light-slow"] = "light", 40
    first = len(engine.runner.history)
    t.run(50)
    assert engine.get_request("light-slow").first_scheduled_time is None
    steps = range(first, len(engine.runner.history))
    assert len(steps) == 50 and all(t.prompt_tokens(s).get("flood", 0) >= 16 for s in steps)
    # light is not backlogged, so its claim is exclusive every other step (never two in a row); each such step, it
    # not being admitted, the prompts it held back get the whole room it left.
    assert sum(t.prompt_tokens(s).get("flood", 0) == 32 for s in steps) >= 24


@pytest.mark.parametrize("new_requests", [1, 3])
def test_only_a_tenant_that_is_not_backlogged_gets_a_step_to_itself(new_requests):
    # flood's 400-token prompt runs in chunks of the shared room (32) beside light's running request; then light
    # sends one request (not backlogged: its step computes its prompt alone) or three (backlogged: its claim is
    # its share, and flood's prompt goes on in the same step).
    t = Tenants(make_engine(scheduling_policy="vtc", max_shared_prefill_tokens=32, **SHARED),
                {"flood": (400, 4), "light": (8, 100)})
    t.submit("light")
    t.step()
    t.submit("flood")
    t.run(3, refill=False)
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
    t = Tenants(make_engine(scheduling_policy="vtc", max_shared_prefill_tokens=32, **SHARED),
                {"flood": (400, 4), "light": (8, 100), "l1": (8, 4), "l2": (8, 4)})
    t.submit("light")
    t.step()
    t.submit("flood")
    t.run(3, refill=False)
    history = t.engine.runner.history
    computed = lambda: {k: v for k, v in t.prompt_tokens(len(history) - 1).items() if v}  # noqa: E731
    t.submit("l1")
    t.step()
    assert computed() == {"l1": 8}
    t.submit("l2")
    t.step()
    assert computed() == {"flood": 24, "l2": 8}


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
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(RequestSpec("flood-long", prompt(400, seed=99), sp, tenant="flood"))
    t.tenant_of["flood-long"], t.prompt_len["flood-long"] = "flood", 400
    t.run(2, refill=False)
    running = {r.request_id for r in engine.scheduler.running}
    assert len(running) == 4 and "flood-long" in running
    assert 0 < engine.get_request("flood-long").num_computed_tokens < 400  # its prompt in chunks
    engine.add_request(RequestSpec("light-slow", prompt(8, seed=98), sp, tenant="light", adapter_version="slow"))
    t.tenant_of["light-slow"], t.prompt_len["light-slow"] = "light", 8
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
