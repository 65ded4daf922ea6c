"""Scheduler pieces on their own: waiting-queue order, the admission seam, step limits."""

from __future__ import annotations

from collections.abc import Sequence

from service.engine.request import Request, RequestSpec, RequestStatus
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason
from service.engine.waiting_queue import WaitingQueue
from tests.engine.fake_runner import ByteTokenizer, ScriptedRunner, make_engine, prompt

SP = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def req(rid: str, priority: int = 0) -> Request:
    return Request(RequestSpec(rid, [1, 2, 3], SP, priority=priority))


def drain_order(q: WaitingQueue) -> list[str]:
    out = []
    while q.peek() is not None:
        out.append(q.pop().request.request_id)
    return out


def test_waiting_queue_priority_fcfs_front_and_lazy_removal():
    q = WaitingQueue()
    a, b, c, d, e = req("a"), req("b"), req("c", priority=-1), req("d"), req("e", priority=1)
    for r in (a, b, c, d, e):
        q.push(r)
    assert q.remove(b) and not q.remove(b)
    assert len(q) == 4 and "b" not in q and sorted(r.request_id for r in q) == ["a", "c", "d", "e"]
    p1, p2 = req("p1"), req("p2")
    q.push_front(p1)
    q.push_front(p2)  # the last preempted goes first within its priority
    assert drain_order(q) == ["c", "p2", "p1", "a", "d", "e"]
    assert len(q) == 0


def test_requeue_keeps_place():
    q = WaitingQueue()
    for rid in "xyz":
        q.push(req(rid))
    entry = q.pop()
    q.requeue(entry)
    assert drain_order(q) == ["x", "y", "z"]


class OneGroupPerStep:
    """A toy policy: requests are grouped by the first letter of their id, one group per step."""

    def __init__(self) -> None:
        self.groups: set[str] = set()
        self.releases: list[str] = []

    def begin_step(self, running: Sequence[Request]) -> None:
        self.groups = {r.request_id[0] for r in running}

    def may_admit(self, request: Request) -> bool:
        if self.groups and request.request_id[0] not in self.groups:
            return False
        self.groups.add(request.request_id[0])
        return True

    def on_release(self, request: Request) -> None:
        self.releases.append(request.request_id)


def test_admission_policy_seam_skips_without_reordering():
    from service.config import EngineConfig
    from service.engine.engine import LLMEngine

    runner = ScriptedRunner({}, num_blocks=64, block_size=4)
    policy = OneGroupPerStep()
    engine = LLMEngine(runner, ByteTokenizer(), EngineConfig(block_size=4), admission=policy)
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for rid in ["a1", "b1", "a2", "b2"]:
        engine.add_request(RequestSpec(rid, prompt(3), sp))
    engine.step()
    first = {c[0] for c in runner.history[0]}
    assert first == {"a1", "a2"}  # b1 was skipped, kept its place, and a2 went past it
    while engine.has_unfinished():
        engine.step()
    later = [c[0] for step in runner.history[1:] for c in step if c[1] == 0]
    assert later == ["b1", "b2"]
    assert sorted(policy.releases) == ["a1", "a2", "b1", "b2"]  # once each, when they finished


def test_step_respects_budget_and_max_num_seqs():
    engine = make_engine(max_num_batched_tokens=10, max_num_seqs=3)
    for i in range(5):
        engine.add_request(RequestSpec(f"r{i}", prompt(4, seed=i), SP))
    out = engine.scheduler.schedule()
    assert out.num_batched_tokens == 10 and [c.num_tokens for c in out.chunks] == [4, 4, 2]
    assert [c.sample for c in out.chunks] == [True, True, False]
    assert engine.scheduler.num_running == 3 and engine.scheduler.num_waiting == 2
    engine.scheduler.update_from_output(out, engine.runner.execute(out))
    out2 = engine.scheduler.schedule()  # two decodes + the rest of r2's prompt; still 3 seqs
    assert [(c.request.request_id, c.num_tokens) for c in out2.chunks] == [("r0", 1), ("r1", 1), ("r2", 2)]


def test_preempted_request_status_and_recompute_includes_outputs():
    engine = make_engine(num_blocks=5, block_size=2, max_num_batched_tokens=64)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a = engine.add_request(RequestSpec("a", prompt(4, seed=1), sp))
    b = engine.add_request(RequestSpec("b", prompt(4, seed=2), sp))
    seen_preempted = False
    while engine.has_unfinished():
        engine.step()
        if b.status is RequestStatus.PREEMPTED:
            seen_preempted = True
            assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_output_tokens > 0
    assert seen_preempted
    # b's recompute after preemption covered its prompt and the outputs it already had
    recompute = [c for step in engine.runner.history for c in step if c[0] == "b" and c[1] == 0][1]
    assert recompute[2] > 4
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH


def test_post_processing_error_fails_only_that_request():
    class Picky(ByteTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            if 999 in ids:
                raise KeyError("unknown token 999")
            return super().decode(ids, skip_special_tokens)

    from service.config import EngineConfig
    from service.engine.engine import LLMEngine

    runner = ScriptedRunner({"bad": [ord("a"), 999]}, num_blocks=32, block_size=4)
    engine = LLMEngine(runner, Picky(), EngineConfig(block_size=4))
    engine.add_request(RequestSpec("bad", prompt(3), SP))
    engine.add_request(RequestSpec("good", prompt(3), SP))
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o.final for o in engine.step() if o.finished})
    assert finals["bad"].finish_reason is FinishReason.ERROR and finals["bad"].text == "a"
    assert finals["good"].finish_reason is FinishReason.LENGTH
    engine.check_idle_integrity()
