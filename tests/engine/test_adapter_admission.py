"""Multi-adapter scheduling: slots bound and rotate the adapters of each step's batch, loads never
hold the batch up, failed loads fail only their requests, nobody starves, every path releases.

The fake runner computes with the adapter its slot table holds in `request.lora_slot`, so any
request served from a wrong slot (or with a stale or shared block) produces wrong tokens, and
every final output is compared to a no-cache reference for its own adapter version."""

from __future__ import annotations

import pytest

from service.config import EngineConfig
from service.engine.adapters import AdapterAdmission
from service.engine.engine import LLMEngine
from service.engine.outputs import ErrorKind, RequestError
from service.engine.request import Request, RequestSpec, RequestStatus
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import ByteTokenizer, FakeRunner, make_engine, prompt, reference_tokens


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def step(engine, finals: dict) -> None:
    """One step; keep final outputs; pool and slot users must be whole after every step."""
    for o in engine.step():
        assert o.request_id not in finals, "output after the final one"
        if o.finished:
            finals[o.request_id] = o.final
    engine.check_integrity()


def drain(engine, finals: dict | None = None, max_steps: int = 500) -> dict:
    finals = {} if finals is None else finals
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        step(engine, finals)
    else:
        raise AssertionError("no progress")
    engine.check_idle_integrity()
    assert engine.runner.slots.held() == {}, "slots still held with nothing running"
    return finals


def test_eight_adapters_on_two_slots_each_get_their_own_output():
    slots = FakeAdapterSlots(max_active=2)
    engine = make_engine(num_blocks=128, slots=slots, max_num_batched_tokens=32)
    versions = [f"v{i}" for i in range(8)]
    expected = {}
    for i in range(24):
        version = versions[i % 8] if i % 6 else None  # every 6th request is a base-model one
        p = prompt(5 + i % 7, seed=i % 3)  # few distinct prompts: equal prompts under other adapters
        engine.add_request(RequestSpec(f"r{i}", p, greedy(6), adapter_version=version))
        expected[f"r{i}"] = reference_tokens(p, 6, version)
    finals = drain(engine)
    assert {rid: list(o.token_ids) for rid, o in finals.items()} == expected
    assert all(o.finish_reason is FinishReason.LENGTH and o.error is None for o in finals.values())
    per_step = engine.runner.adapters_per_step
    assert max(len(a) for a in per_step) == 2 and set().union(*per_step) == set(versions)
    assert len(slots.activations) >= 8  # slots were reused across versions
    assert slots.users == [0, 0]


def test_loading_adapter_does_not_hold_up_others():
    slots = FakeAdapterSlots(max_active=2, load_polls={"slow": 5})
    engine = make_engine(slots=slots)
    engine.add_request(RequestSpec("slow", prompt(6, seed=1), greedy(4), adapter_version="slow"))
    assert slots.loads_started == ["slow"]  # started on arrival, not when the request is reached
    engine.add_request(RequestSpec("base", prompt(6, seed=2), greedy(4)))
    engine.add_request(RequestSpec("fast", prompt(6, seed=3), greedy(4), adapter_version="fast"))
    finals: dict = {}
    step(engine, finals)
    assert {c[0] for c in engine.runner.history[0]} == {"base", "fast"}
    s = engine.stats
    assert (s.running_adapters, s.waiting_adapters, s.num_active_adapters) == ({"fast"}, {"slow"}, 1)
    assert s.adapter_loads_waited == 1 and s.max_active_adapters == 2
    drain(engine, finals)
    first_step = {rid: next(i for i, st in enumerate(engine.runner.history) if any(c[0] == rid for c in st))
                  for rid in finals}
    assert first_step["slow"] >= 3 and first_step["base"] == first_step["fast"] == 0
    for rid, seed, key in [("slow", 1, "slow"), ("base", 2, None), ("fast", 3, "fast")]:
        assert list(finals[rid].token_ids) == reference_tokens(prompt(6, seed=seed), 4, key)
    assert engine.stats.adapter_loads_waited == 1  # counted once, however many steps it waited


def test_failed_load_fails_only_its_requests_with_the_message():
    slots = FakeAdapterSlots(max_active=2, load_polls=2, fail={"bad": "lora_A of q_proj has rank 0"})
    engine = make_engine(slots=slots)
    for rid, key in [("bad1", "bad"), ("good", "good"), ("base", None), ("bad2", "bad")]:
        engine.add_request(RequestSpec(rid, prompt(7), greedy(3), adapter_version=key))
    finals = drain(engine)
    for rid in ("bad1", "bad2"):
        out = finals[rid]
        assert out.finish_reason is FinishReason.ERROR and list(out.token_ids) == []
        assert out.error == RequestError(ErrorKind.ADAPTER_UNAVAILABLE,
                                         "adapter version 'bad' failed to load: lora_A of q_proj has rank 0")
    assert list(finals["good"].token_ids) == reference_tokens(prompt(7), 3, "good")
    assert list(finals["base"].token_ids) == reference_tokens(prompt(7), 3)
    assert finals["good"].error is finals["base"].error is None
    assert not any("bad" in v for v in engine.runner.adapters_per_step) and engine.pool.num_in_use == 0


def run_streams(max_overtake_steps: int, horizon: int) -> tuple[int | None, list[set[str]]]:
    """Adapters A and B get a new request every step, forever; C arrives once, when A and B hold
    both slots; a base request arrives every step too. Returns the step C finished in (or None)."""
    slots = FakeAdapterSlots(max_active=2)
    engine = make_engine(num_blocks=256, slots=slots, max_overtake_steps=max_overtake_steps, max_waiting=4096)
    finals: dict = {}
    expected: dict[str, list[int]] = {}

    def add(rid: str, key: str | None, seed: int) -> None:
        p = prompt(6, seed=seed)
        engine.add_request(RequestSpec(rid, p, greedy(3), adapter_version=key))
        expected[rid] = reference_tokens(p, 3, key)

    done_at = None
    for t in range(horizon):
        for key in ("A", "B", None):
            add(f"{key}{t}", key, t)
        if t == 2:
            add("C", "C", 99)
        step(engine, finals)
        base_first = [c for c in engine.runner.history[-1] if c[0] == f"None{t}"]
        assert base_first and base_first[0][1] == 0  # base requests are admitted at once, always
        if done_at is None and "C" in finals:
            done_at = t
    drain(engine, finals, max_steps=5 * horizon)
    assert {rid: list(o.token_ids) for rid, o in finals.items()} == expected
    return done_at, engine.runner.adapters_per_step


def test_blocked_adapter_is_not_starved_by_endless_streams():
    overtake = 8
    done_at, per_step = run_streams(overtake, horizon=60)
    # C is blocked from step 3; after `overtake` steps the running A/B requests (3 steps each) drain,
    # a slot frees, and C's 3 tokens take 3 steps: a bound independent of the streams.
    assert done_at is not None and done_at <= 2 + overtake + 3 + 3 + 2
    assert all(len(a) <= 2 for a in per_step)
    # and the busy adapters went on once C had its turn
    assert any(a == {"A", "B"} for a in per_step[done_at + 3:])


def test_without_rotation_the_same_streams_starve_the_blocked_adapter():
    done_at, _ = run_streams(max_overtake_steps=10**9, horizon=40)
    assert done_at is None  # what the rotation rule prevents


def test_preemption_releases_the_slot_and_resume_reacquires():
    slots = FakeAdapterSlots(max_active=2)
    # 8 blocks of 2 tokens: two requests growing to 16 tokens cannot both fit
    engine = make_engine(runner=FakeRunner(num_blocks=8, block_size=2, slots=slots), slots=slots)
    a = engine.add_request(RequestSpec("a", prompt(4, seed=1), greedy(10), adapter_version="va"))
    b = engine.add_request(RequestSpec("b", prompt(4, seed=2), greedy(10), adapter_version="vb"))
    finals: dict = {}
    seen = False
    while engine.has_unfinished():
        step(engine, finals)
        if b.status is RequestStatus.PREEMPTED:
            seen = True
            assert b.lora_slot == -1 and "vb" not in slots.held()
    assert seen and engine.runner.preempted[0] == "b"
    assert engine.stats.preemptions >= 1
    # b ran again after its preemption, so it acquired a slot again (every acquire is one use)
    assert list(finals["a"].token_ids) == reference_tokens(prompt(4, seed=1), 10, "va")
    assert list(finals["b"].token_ids) == reference_tokens(prompt(4, seed=2), 10, "vb")
    assert a.lora_slot == b.lora_slot == -1 and slots.held() == {}


def test_abort_releases_running_and_forgets_waiting():
    slots = FakeAdapterSlots(max_active=1, load_polls={"slow": 100})
    engine = make_engine(slots=slots)
    run = engine.add_request(RequestSpec("run", prompt(5), greedy(8), adapter_version="v1"))
    engine.add_request(RequestSpec("blocked", prompt(5), greedy(8), adapter_version="v2"))  # no slot: max_active=1
    engine.add_request(RequestSpec("loading", prompt(5), greedy(8), adapter_version="slow"))
    step(engine, {})
    assert run.lora_slot == 0 and slots.held() == {"v1": 1}
    for rid in ("run", "blocked", "loading"):
        assert engine.abort_request(rid)
    assert run.lora_slot == -1 and slots.held() == {}
    engine.check_idle_integrity()
    finals = {o.request_id: o.final for o in engine.step()}
    assert {o.finish_reason for o in finals.values()} == {FinishReason.CANCELLED}
    assert all(o.error is None for o in finals.values())
    # the slot is free for the next version
    engine.add_request(RequestSpec("next", prompt(5), greedy(2), adapter_version="v2"))
    assert list(drain(engine)["next"].token_ids) == reference_tokens(prompt(5), 2, "v2")


def test_memory_refusal_after_the_policy_agreed_hands_the_slot_back():
    slots = FakeAdapterSlots(max_active=1)
    engine = make_engine(num_blocks=4, block_size=4, slots=slots)
    engine.add_request(RequestSpec("big", prompt(12, seed=1), greedy(2)))  # base: 3 of the 4 blocks
    late = engine.add_request(RequestSpec("late", prompt(8, seed=2), greedy(2), adapter_version="v1"))  # needs 2 blocks
    step(engine, {})  # late got the slot from the policy, then no memory: it must give it back
    assert late.status is RequestStatus.WAITING and late.lora_slot == -1 and slots.held() == {}
    assert slots.activations == [(0, "v1")]
    finals = drain(engine)
    assert list(finals["late"].token_ids) == reference_tokens(prompt(8, seed=2), 2, "v1")


def test_same_prompt_shares_blocks_only_under_the_same_version():
    engine = make_engine(block_size=4, slots=FakeAdapterSlots(max_active=2))
    p = prompt(20, seed=5)
    r1 = engine.add_request(RequestSpec("v1", p, greedy(3), adapter_version="v1"))
    r2 = engine.add_request(RequestSpec("v2", p, greedy(3), adapter_version="v2"))
    step(engine, {})
    assert set(r1.block_ids).isdisjoint(r2.block_ids) and len(r1.block_ids) == len(r2.block_ids) == 5
    finals = drain(engine)
    assert list(finals["v1"].token_ids) == reference_tokens(p, 3, "v1")
    assert list(finals["v2"].token_ids) == reference_tokens(p, 3, "v2") != list(finals["v1"].token_ids)
    assert finals["v2"].usage.cached_input_tokens == 0
    again = engine.add_request(RequestSpec("v1-again", p, greedy(3), adapter_version="v1"))
    finals = drain(engine)
    assert finals["v1-again"].usage.cached_input_tokens == 16  # 4 full blocks of v1 (the 5th holds the last token)
    assert list(finals["v1-again"].token_ids) == reference_tokens(p, 3, "v1")
    assert again.lora_slot == -1


def test_a_wrong_slot_yields_wrong_tokens():
    """The fake runner's check is real: a policy that swaps the slots of two adapters is caught."""

    class Swapping(AdapterAdmission):
        def may_admit(self, request: Request) -> bool:
            ok = super().may_admit(request)
            if ok and request.extra_key is not None:
                request.lora_slot = 1 - request.lora_slot
            return ok

    slots = FakeAdapterSlots(max_active=2)
    runner = FakeRunner(slots=slots)
    engine = LLMEngine(runner, ByteTokenizer(), EngineConfig(block_size=4), admission=Swapping(slots),
                       adapter_slots=slots)
    p = prompt(6)
    engine.add_request(RequestSpec("x", p, greedy(3), adapter_version="v1"))
    engine.add_request(RequestSpec("y", p, greedy(3), adapter_version="v2"))
    finals: dict = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o.final for o in engine.step() if o.finished})
    assert list(finals["x"].token_ids) == reference_tokens(p, 3, "v2") != reference_tokens(p, 3, "v1")


def test_engine_refuses_adapters_it_cannot_serve():
    engine = make_engine()
    with pytest.raises(ValueError, match="this engine serves no adapters"):
        engine.add_request(RequestSpec("a", prompt(3), greedy(1), adapter_version="v1"))
    assert engine.get_request("a") is None and engine.stats.running_adapters == frozenset()
    slots = FakeAdapterSlots()
    with pytest.raises(ValueError, match="AdapterAdmission"):
        LLMEngine(FakeRunner(slots=slots), ByteTokenizer(), EngineConfig(block_size=4),
                  admission=AdapterAdmission(FakeAdapterSlots()), adapter_slots=slots)
    with pytest.raises(ValueError, match="max_overtake_steps"):
        AdapterAdmission(slots, max_overtake_steps=-1)
    with pytest.raises(ValueError, match="max_active=0"):
        AdapterAdmission(FakeAdapterSlots(max_active=0))
