"""Random submit / abort / step sequences of three tenants on small pools, with adapters on few slots, under
either scheduling policy: the pool and the slot users stay whole after every operation and every finished request produced exactly the
reference tokens of its adapter (or failed with its adapter's load error)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import HealthCheck, Phase, given, settings, target
from hypothesis import strategies as st

from service.engine.outputs import ErrorKind, RequestError
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.scheduler import QueueFullError
from service.engine.types import FinishReason
from tests.engine.fake_adapters import FakeAdapterSlots
from tests.engine.fake_runner import FakeRunner, make_engine, prompt, reference_tokens

submit = st.tuples(st.just("submit"), st.integers(1, 24), st.integers(0, 3), st.integers(1, 12), st.integers(-1, 1),
                   st.integers(0, 2))  # the last: one of three tenants
op = st.one_of(  # submits weighted up so pools fill, requests get preempted and prefixes get reused
    submit, submit, submit,
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 3)),
)


# No Phase.target: its hill-climbing costs seconds; the target() calls below still bias generation.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(
    ops=st.lists(op, min_size=6, max_size=40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    num_blocks=st.integers(2, 20),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 6),
    caching=st.sampled_from([True, True, False]),
    max_active=st.integers(1, 2),
    load_polls=st.sampled_from([0, 3]),
    overtake=st.sampled_from([0, 2, 8]),
    fail_v2=st.booleans(),
    policy=st.sampled_from(["vtc", "fcfs"]),
)
def test_random_operations_keep_the_pool_whole(ops, block_size, num_blocks, budget, max_seqs, caching,
                                               max_active, load_polls, overtake, fail_v2, policy):
    slots = FakeAdapterSlots(max_active, load_polls, fail={"v2": "bad checksum"} if fail_v2 else None)
    runner = FakeRunner(num_blocks=num_blocks, block_size=block_size, max_model_len=64, slots=slots)
    engine = make_engine(runner=runner, slots=slots, max_overtake_steps=overtake, max_num_batched_tokens=budget,
                         max_num_seqs=max_seqs, max_waiting=6, enable_prefix_caching=caching,
                         scheduling_policy=policy)
    submitted: dict[str, tuple[list[int], str | None, int]] = {}
    finals = {}

    def collect(outs):
        for o in outs:
            assert o.request_id not in finals, "output after the final one"
            if o.finished:
                finals[o.request_id] = o.final

    for i, (kind, *args) in enumerate(ops):
        if kind == "submit":
            length, key, max_tokens, priority, tenant = args
            # few distinct prompts and keys, so prefixes are shared and cached blocks revived
            p = prompt(length, seed=key // 2)
            extra_key = [None, "v1", "v2", "v1"][key]  # the same prompt under v1 and v2, too
            rid = f"r{i}"
            try:
                engine.add_request(RequestSpec(rid, p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                   adapter_version=extra_key, priority=priority, tenant=f"t{tenant}"))
                submitted[rid] = (p, extra_key, max_tokens)
            except QueueFullError:
                pass
            except ValueError:
                assert length >= 64 or -(-length // block_size) > num_blocks
        elif kind == "abort":
            ids = list(submitted)
            if ids:
                engine.abort_request(ids[args[0] % len(ids)])
        else:
            for _ in range(args[0]):
                collect(engine.step())
        engine.check_integrity()

    steps = 0
    while engine.has_unfinished():
        collect(engine.step())
        engine.check_integrity()
        steps += 1
        assert steps < 2000, "no progress"
    engine.check_idle_integrity()
    assert engine.pool.num_in_use == 0 and slots.held() == {}
    # steer generation towards the interesting runs: tight pools that preempt and reuse prefixes
    target(float(engine.stats.preemptions), label="preemptions")
    target(float(engine.stats.prefix_cache_hit_tokens), label="prefix hits")
    target(float(engine.scheduler.num_seats_taken), label="seats taken")
    assert set(finals) == set(submitted)
    limit = min(64, num_blocks * block_size + 1)
    for rid, (p, key, max_tokens) in submitted.items():
        out = finals[rid]
        if out.finish_reason is FinishReason.CANCELLED:
            n = len(out.token_ids)
            assert list(out.token_ids) == reference_tokens(p, n, key)
            continue
        if fail_v2 and key == "v2":
            assert out.finish_reason is FinishReason.ERROR and list(out.token_ids) == []
            assert out.error == RequestError(ErrorKind.ADAPTER_UNAVAILABLE,
                                             "adapter version 'v2' failed to load: bad checksum")
            continue
        assert out.finish_reason is FinishReason.LENGTH and out.error is None
        n = min(max_tokens, limit - len(p))
        assert list(out.token_ids) == reference_tokens(p, n, key)


def test_engine_imports_no_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import service.engine as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__):\n"
        "    importlib.import_module(f'service.engine.{m.name}')\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'numpy', 'triton'))\n"
        "assert not bad, bad\n"
        "print(len(list(pkgutil.iter_modules(pkg.__path__))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) >= 10
