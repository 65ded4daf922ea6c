"""EngineLoop on the fake engine (no torch, milliseconds): hand-off, cancel, failures, idle, drain."""

from __future__ import annotations

import threading
import time

import pytest

from service.engine.sampling import SamplingParams
from service.engine.scheduler import QueueFullError
from service.engine.types import FinishReason
from service.loop import STALL_WAIT_S, EngineLoop, LoopClosed, wait_until
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import FakeRunner, make_engine, prompt, reference_tokens

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture
def loop():
    loops: list[EngineLoop] = []

    def make(engine=None, **kw) -> EngineLoop:
        lp = EngineLoop(engine or make_engine(), **kw).start()
        loops.append(lp)
        return lp

    yield make
    for lp in loops:
        lp.stop()


def count_steps(engine) -> list[int]:
    """Wrap engine.step to count calls (the counter is read from the test thread: a list is enough)."""
    calls = [0]
    step = engine.step

    def counted():
        calls[0] += 1
        return step()

    engine.step = counted
    return calls


def test_concurrent_submitters_each_get_their_own_tokens(loop):
    lp = loop()
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        handle = lp.submit(f"r{i}", prompt(10 + i, seed=i), GREEDY)
        outs = list(handle)
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        results[i] = [t for o in outs for t in o.new_token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == list(range(6))
    for i, tokens in results.items():
        assert tokens == reference_tokens(prompt(10 + i, seed=i), 8)
    lp.call(lambda e: e.check_idle_integrity())


def test_bad_input_and_full_queue_raise_on_the_submitting_thread(loop):
    lp = loop(make_engine(max_waiting=0))
    with pytest.raises(ValueError, match="prompt is empty"):
        lp.submit("empty", [], GREEDY)
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        lp.submit("full", prompt(4), GREEDY)
    assert lp.healthy


def test_cancel_frees_blocks_at_once_and_ends_the_stream(loop):
    runner = FakeRunner()
    lp = loop(make_engine(runner=runner))
    handle = lp.submit("long", prompt(20), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    first = handle.get(timeout=5)
    assert not first.finished
    handle.cancel()
    rest = list(handle)
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    assert lp.call(lambda e: e.pool.num_in_use) == 0
    lp.call(lambda e: e.check_idle_integrity())


def test_a_failing_step_errors_its_requests_and_the_loop_goes_on(loop):
    engine = make_engine()
    step = engine.step
    broken = [True]

    def flaky():
        if broken[0]:
            raise RuntimeError("boom")
        return step()

    health: list[bool] = []
    engine.step = flaky
    lp = loop(engine, on_health=health.append)
    out = list(lp.submit("doomed", prompt(6), GREEDY))[-1]
    assert out.finish_reason is FinishReason.ERROR and "engine step failed" in out.error
    # Failing step after step: unhealthy (the server turns that into NOT_SERVING).
    assert wait_until(lambda: not lp.healthy, 5)
    broken[0] = False
    assert wait_until(lambda: lp.healthy, 5)
    ok = list(lp.submit("fine", prompt(6), GREEDY))[-1]
    assert ok.finish_reason is FinishReason.LENGTH
    assert health == [True, False, True]


def test_idle_loop_blocks_instead_of_spinning(loop):
    engine = make_engine()
    calls = count_steps(engine)
    lp = loop(engine)
    list(lp.submit("one", prompt(4), GREEDY))
    settled = calls[0]
    time.sleep(0.3)
    assert calls[0] == settled  # nothing to do: not a single step in 300 ms


def test_unschedulable_work_waits_about_a_millisecond_per_turn(loop):
    polls = 40  # the adapter load finishes after this many status polls (one per engine step)
    slots = FakeAdapterSlots(load_polls={"v-slow": polls})
    engine = make_engine(runner=FakeRunner(slots=slots), slots=slots)
    calls = count_steps(engine)
    lp = loop(engine)
    t0 = time.perf_counter()
    out = list(lp.submit("a", prompt(4), GREEDY, extra_key="v-slow"))[-1]
    elapsed = time.perf_counter() - t0
    assert out.finish_reason is FinishReason.LENGTH
    # Every stalled turn slept: no hot spin while the adapter loaded, and no more steps than polls needed.
    assert elapsed >= 0.8 * polls * STALL_WAIT_S
    assert calls[0] <= polls + 20


def test_drain_lets_running_requests_finish_and_refuses_new_ones(loop):
    lp = loop()
    handle = lp.submit("running", prompt(8), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert lp.drain(grace_s=5) is True
    outs = list(handle)
    assert outs[-1].finish_reason is FinishReason.LENGTH and not handle.stopped_by_drain
    with pytest.raises(LoopClosed, match="shutting down"):
        lp.submit("late", prompt(4), GREEDY)


def test_drain_aborts_what_outlives_the_grace_period(loop):
    engine = make_engine()
    step = engine.step

    def slow():
        time.sleep(0.01)
        return step()

    engine.step = slow
    lp = loop(engine)
    handle = lp.submit("endless", prompt(8), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    assert lp.drain(grace_s=0.1) is False
    assert time.perf_counter() - t0 < 2
    out = list(handle)[-1]
    assert out.finish_reason is FinishReason.CANCELLED and handle.stopped_by_drain
    lp.call(lambda e: e.check_idle_integrity())


def test_a_crashed_loop_answers_what_was_waiting_in_its_inbox(loop):
    """The loop thread dies (an error no step handler catches): a submit and a call queued behind the fatal
    step get LoopClosed at once instead of waiting out their timeouts, and health says so."""
    engine = make_engine()
    entered, release = threading.Event(), threading.Event()

    def fatal_step():
        entered.set()
        release.wait(10)
        raise SystemExit("the step took the thread down")

    engine.step = fatal_step
    lp = loop(engine)
    first = lp.submit("a", prompt(5), GREEDY)
    assert entered.wait(10)
    outcome: dict[str, BaseException] = {}

    def submit_behind() -> None:
        try:
            lp.submit("b", prompt(6), GREEDY, timeout=20)
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test reads
            outcome["submit"] = e

    t = threading.Thread(target=submit_behind)
    t.start()
    assert wait_until(lambda: lp._submits == 1, 5)  # "b" sits in the inbox behind the fatal step
    call = threading.Thread(target=lambda: outcome.setdefault("call", _call_error(lp)))
    call.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    release.set()
    t.join(10)
    call.join(10)
    assert isinstance(outcome["submit"], LoopClosed) and isinstance(outcome["call"], LoopClosed)
    assert time.monotonic() - t0 < 10  # answered, not timed out (the submit's own timeout is 20 s)
    assert [o.finish_reason for o in first][-1] is FinishReason.ERROR
    assert not lp.healthy and not lp.accepting


def _call_error(lp: EngineLoop) -> BaseException | None:
    try:
        lp.call(lambda e: e.stats, timeout=20)
    except BaseException as e:  # noqa: BLE001
        return e
    return None
