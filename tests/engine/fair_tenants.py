"""Backlogged tenants on the fake runner, and each one's weighted service measured from what the runner computed
(each step's chunks: prompt positions computed and tokens sampled), not read from the scheduler's own counters,
weighted as the `vtc` policy weighs it (input 1, output 2, divided by the tenant's weight). Shared by the fair-share
tests (test_fairness.py: service; test_fair_latency.py: a light tenant's latency under a flood)."""

from __future__ import annotations

import itertools
from collections import Counter

from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from tests.engine.fake_runner import make_engine, prompt

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
        return self.add(f"{tenant}-{i}", tenant, n_in, n_out, seed=i, priority=priority)

    def add(self, rid: str, tenant: str, n_in: int, n_out: int = 4, seed: int = 0, priority: int = 0,
            adapter_version: str | None = None) -> str:
        """One request of `tenant` outside its usual shape (a long prompt, an adapter that loads slowly),
        counted like the others."""
        sp = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        self.engine.add_request(RequestSpec(rid, prompt(n_in, seed=seed), sp, tenant=tenant, priority=priority,
                                            adapter_version=adapter_version))
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
