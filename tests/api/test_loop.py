"""EngineLoop on the fake engine (no torch, milliseconds): hand-off, cancel, failures, idle, drain."""

from __future__ import annotations

import threading
import time

import pytest

from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.scheduler import QueueFullError
from service.engine.types import FinishReason
from service.loop import STALL_WAIT_S, UNHEALTHY_AFTER_FAILURES, EngineLoop, LoopClosed, wait_until
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
        handle = lp.submit(RequestSpec(f"r{i}", prompt(10 + i, seed=i), GREEDY))
        outs = list(handle)
        assert outs[-1].final.finish_reason is FinishReason.LENGTH
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
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lp.submit(RequestSpec("unknown-token", [1, 999], GREEDY))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        lp.submit(RequestSpec("full", prompt(4), GREEDY))
    assert lp.healthy


def test_cancel_frees_blocks_at_once_and_ends_the_stream(loop):
    runner = FakeRunner()
    lp = loop(make_engine(runner=runner))
    handle = lp.submit(RequestSpec("long", prompt(20), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
    first = handle.get(timeout=5)
    assert not first.finished
    handle.cancel()
    rest = list(handle)
    assert rest[-1].final.finish_reason is FinishReason.CANCELLED
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
    for i in range(UNHEALTHY_AFTER_FAILURES):
        assert lp.healthy  # fewer failed steps in a row than the threshold
        out = list(lp.submit(RequestSpec(f"doomed-{i}", prompt(6), GREEDY)))[-1].final
        assert out.finish_reason is FinishReason.ERROR and "engine step failed" in out.error.message
    # Failing step after step: unhealthy (the server turns that into NOT_SERVING).
    assert wait_until(lambda: not lp.healthy, 5)
    broken[0] = False  # fixed: the next step that runs succeeds, and health follows
    ok = list(lp.submit(RequestSpec("fine", prompt(6), GREEDY)))[-1].final
    assert ok.finish_reason is FinishReason.LENGTH
    assert wait_until(lambda: lp.healthy, 5)
    assert health == [True, False, True]


def test_an_idle_loop_runs_no_step_when_woken(loop):
    engine = make_engine()
    calls = count_steps(engine)
    lp = loop(engine)
    list(lp.submit(RequestSpec("one", prompt(4), GREEDY)))
    settled = calls[0]
    for _ in range(20):  # each call wakes the loop from its blocking wait on the inbox
        lp.call(lambda e: e.stats)
    assert calls[0] == settled  # nothing to do: not a single step


def test_a_request_submitted_during_a_step_counts_the_wait_for_that_step(loop):
    """The loop takes new requests in between steps; a request's timings start when it was submitted, so its
    queue time and TTFT include the rest of the step in progress (what its client waits), not only what
    follows once the loop took it in."""
    engine = make_engine()
    step, in_step = engine.step, threading.Event()

    def slow_step():  # scheduling, then 0.2 s of "model"
        out = step()
        in_step.set()
        time.sleep(0.2)
        return out

    engine.step = slow_step
    lp = loop(engine)
    first = lp.submit(RequestSpec("first", prompt(4), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert in_step.wait(5)
    t = time.monotonic()
    second = lp.submit(RequestSpec("second", prompt(5), GREEDY))  # returns once the loop took it in
    waited = time.monotonic() - t
    assert waited >= 0.1, f"the submit returned after {waited:.3f} s: it did not wait for the step in progress"
    final = [o.final for o in second][-1]
    assert final.timings.queue_s >= waited - 0.01 and final.timings.ttft_s >= waited - 0.01, final.timings
    list(first)


def test_a_held_loop_keeps_requests_where_they_are_and_still_serves_commands(loop):
    engine = make_engine()
    calls = count_steps(engine)
    lp = loop(engine)
    lp.hold(after_steps=2)
    handle = lp.submit(RequestSpec("held", prompt(4), SamplingParams(max_tokens=50, temperature=0,
                                                                     ignore_eos=True)))
    assert lp.wait_held(5)
    got = [handle.get(timeout=5), handle.get(timeout=5)]  # the two steps it allowed, one token each
    assert calls[0] == 2 and [len(o.new_token_ids) for o in got] == [1, 1]
    assert lp.call(lambda e: e.get_request("held").num_output_tokens) == 2  # commands are served
    lp.submit(RequestSpec("queued", prompt(5), GREEDY))  # so are submits: it waits in the queue
    assert lp.call(lambda e: (e.stats.num_running, e.stats.num_waiting)) == (1, 1) and calls[0] == 2
    lp.resume()
    assert [o.final for o in handle][-1].usage.output_tokens == 50


def test_unschedulable_work_waits_about_a_millisecond_per_turn(loop):
    polls = 40  # the adapter load finishes after this many status polls (one per engine step)
    slots = FakeAdapterSlots(load_polls={"v-slow": polls})
    engine = make_engine(runner=FakeRunner(slots=slots), slots=slots)
    calls = count_steps(engine)
    lp = loop(engine)
    t0 = time.perf_counter()
    out = list(lp.submit(RequestSpec("a", prompt(4), GREEDY, adapter_version="v-slow")))[-1].final
    elapsed = time.perf_counter() - t0
    assert out.finish_reason is FinishReason.LENGTH
    # Every stalled turn slept: no hot spin while the adapter loaded, and no more steps than polls needed.
    assert elapsed >= 0.8 * polls * STALL_WAIT_S
    assert calls[0] <= polls + 20


def test_drain_lets_running_requests_finish_and_refuses_new_ones(loop):
    lp = loop()
    handle = lp.submit(RequestSpec("running", prompt(8), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
    assert lp.drain(grace_s=5) is True
    outs = list(handle)
    assert outs[-1].final.finish_reason is FinishReason.LENGTH and not handle.stopped_by_drain
    with pytest.raises(LoopClosed, match="shutting down"):
        lp.submit(RequestSpec("late", prompt(4), GREEDY))


def test_drain_aborts_what_outlives_the_grace_period(loop):
    lp = loop()
    lp.hold(after_steps=1)
    handle = lp.submit(RequestSpec("endless", prompt(8), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
    assert lp.wait_held(5)  # running, and held: it cannot finish within the grace
    t0 = time.perf_counter()
    assert lp.drain(grace_s=0.1) is False
    assert time.perf_counter() - t0 < 2
    out = list(handle)[-1].final
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
    first = lp.submit(RequestSpec("a", prompt(5), GREEDY))
    assert entered.wait(10)
    outcome: dict[str, BaseException] = {}

    def submit_behind() -> None:
        try:
            lp.submit(RequestSpec("b", prompt(6), GREEDY), timeout=20)
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test reads
            outcome["submit"] = e

    t = threading.Thread(target=submit_behind)
    t.start()
    assert wait_until(lambda: lp._submits == 1, 5)  # "b" sits in the inbox behind the fatal step
    call = threading.Thread(target=lambda: outcome.setdefault("call", _call_error(lp)))
    call.start()
    assert wait_until(lambda: lp._inbox.qsize() == 2, 5)  # the submit and the call both wait in the inbox
    t0 = time.monotonic()
    release.set()
    t.join(10)
    call.join(10)
    assert isinstance(outcome["submit"], LoopClosed) and isinstance(outcome["call"], LoopClosed)
    assert time.monotonic() - t0 < 10  # answered, not timed out (the submit's own timeout is 20 s)
    assert [o.final for o in first][-1].finish_reason is FinishReason.ERROR
    assert not lp.healthy and not lp.accepting


def _call_error(lp: EngineLoop) -> BaseException | None:
    try:
        lp.call(lambda e: e.stats, timeout=20)
    except BaseException as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("interval, sizes", [(1, [1] * 10), (3, [1, 3, 3, 3]), (4, [1, 4, 4, 1]), (None, [10])])
def test_outputs_gather_stream_interval_tokens_the_first_and_the_last_going_at_once(loop, interval, sizes):
    """Bad input: none. A 10-token request's outputs as the caller sees them: the first token alone (its TTFT),
    then groups of `interval` tokens, the final output with what is left; None: the final output alone. The
    gathered outputs join to the same tokens, text and logprobs as one output per step."""
    lp = loop()
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    handle = lp.submit(RequestSpec(f"every-{interval}", prompt(12, seed=5), sp), stream_interval=interval)
    outs = list(handle)
    assert [len(o.new_token_ids) for o in outs] == sizes
    assert [o.final is not None for o in outs] == [False] * (len(sizes) - 1) + [True]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == reference_tokens(prompt(12, seed=5), 10) == list(outs[-1].final.token_ids)
    assert "".join(o.new_text for o in outs) == outs[-1].final.text
    assert [len(o.new_logprobs) for o in outs] == sizes
    assert [lp.token_id for o in outs for lp in o.new_logprobs] == tokens  # in order


def test_a_stream_interval_below_one_is_refused_on_the_submitting_thread(loop):
    """Bad input: stream_interval 0 (and -2): a ValueError naming it; nothing is queued."""
    lp = loop()
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"stream_interval={bad} is invalid"):
            lp.submit(RequestSpec(f"interval{bad}", prompt(4), GREEDY), stream_interval=bad)
    lp.call(lambda e: e.check_idle_integrity())


def test_a_stream_that_ends_in_an_error_first_gets_the_tokens_gathered_since_its_last_message(loop):
    """Bad input: none; the engine fails on the 4th step. At stream_interval 100 the stream has sent only its first
    token; the two tokens gathered since come as an output of their own, then the error: the client sees every token
    the engine produced, as it would with a message a token."""
    from service.api.errors import RequestFailed
    from service.api.generation import GenerationPath

    engine = make_engine()
    step, steps = engine.step, [0]

    def failing_fourth():
        steps[0] += 1
        if steps[0] == 4:
            raise RuntimeError("boom")
        return step()

    engine.step = failing_fourth
    lp = loop(engine)
    path = GenerationPath(lp, converter=None, base_model="fake")

    class Call:
        def time_remaining(self):
            return None

        def is_active(self):
            return True

    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    handle = lp.submit(RequestSpec("fails", prompt(12, seed=3), sp), stream_interval=100)
    got = []
    with pytest.raises(RequestFailed, match="engine step failed"):
        for out in path.follow(handle, Call()):
            got.append(out)
    assert [len(o.new_token_ids) for o in got] == [1, 2] and all(o.final is None for o in got)
    assert [t for o in got for t in o.new_token_ids] == reference_tokens(prompt(12, seed=3), 3)
