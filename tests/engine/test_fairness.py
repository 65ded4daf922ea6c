"""Fair sharing between tenants (the `vtc` policy) on the fake runner, torch-free: the service each tenant gets.

Service is measured from what the runner computed (`fair_tenants.Tenants`). The bound for two backlogged tenants
is the one of Sheng et al. (OSDI 2024, Theorem 4.4): over any interval in which both are backlogged, their weighted
service differs by at most 2 * max(w_in * L_in, w_out * M), where L_in is the longest prompt and M the most tokens
the running batch can hold (KV capacity, here also at most max_num_seqs requests of the longest context). `fcfs`
breaks it, which shows the check has teeth. A light tenant's latency under a flood (seats, short shared steps) is
in test_fair_latency.py.
"""

from __future__ import annotations

import pytest

from service.engine.fairness import FairShare
from tests.engine.fair_tenants import ENGINE, Tenants, flood, paper_bound
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import make_engine


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
    t.add("a-slow", "a", 8, adapter_version="slow")
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


def test_the_policy_switches_while_idle_with_fresh_counters_and_the_same_weights():
    engine = make_engine(scheduling_policy="vtc", **ENGINE)
    sched = engine.scheduler
    t = Tenants(engine, {"a": (64, 8), "b": (8, 8)}, weights={"a": 2.0}, depth={"a": 8, "b": 2})
    t.run(200)
    t.depth = {}
    while engine.has_unfinished():
        t.step()
    assert sched.fair.counter("a") > 0
    sched.set_policy("fcfs", max_shared_prefill_tokens=40)
    assert sched.fair.policy == "fcfs" and sched.config.max_shared_prefill_tokens == 40
    assert sched.fair.counter("a") == 0.0 and sched.fair.weight_of("a") == 2.0
    # Now the flooding tenant takes the machine, as under fcfs from the start.
    t.depth = {"a": 8, "b": 2}
    start = dict(t.service)
    t.run(600)
    gained = {x: t.service[x] - start[x] for x in "ab"}
    assert gained["a"] * 2.0 > 3 * gained["b"]  # service is per unit of weight: a's raw service, against b's
    t.depth = {}
    while engine.has_unfinished():
        t.step()
    sched.set_policy("vtc")  # the bound stays where it was set
    assert sched.fair.policy == "vtc" and sched.config.max_shared_prefill_tokens == 40


def test_the_policy_does_not_switch_while_a_request_is_in_or_to_a_bad_setting():
    engine = make_engine(scheduling_policy="vtc", **ENGINE)
    sched = engine.scheduler
    with pytest.raises(ValueError, match="scheduling_policy='lottery' is invalid"):
        sched.set_policy("lottery")  # bad input: an unknown policy
    with pytest.raises(ValueError, match="max_shared_prefill_tokens"):
        sched.set_policy("fcfs", max_shared_prefill_tokens=0)  # bad input: a bound below 1
    t = Tenants(engine, {"a": (16, 8)}, depth={"a": 1})
    t.run(1)
    with pytest.raises(RuntimeError, match="only while the engine is idle"):
        sched.set_policy("fcfs")  # bad timing: a request is running
    assert sched.fair.policy == "vtc"
