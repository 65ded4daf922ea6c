"""The fairness flood replayed in one process: `bench/fairness.py`'s three tenants' request shapes on one engine
(no gRPC, no client processes), the scheduling policies (and shared prompt bounds) taking turns round by round on
that same engine, so every policy sees the same minutes of the machine.

- A floods: 64 requests outstanding, --a-prompt tokens each (145: what the served bench's prompts of 4x B's words
  come to), 8 output tokens;
- B is backlogged: 16 outstanding, --b-prompt tokens (52), 16 outputs; A and B send --requests each (160);
- C sends one request of B's prompt length and 8 outputs every --c-interval-s seconds (0.2 s; the served bench
  calibrates it from the machine), open loop.

Prompts are random token ids (no prefix-cache hits); the engine runs with the served bench's seats and budget
(`--max-num-seqs 8 --max-batched-tokens 512`), no speculation. A round of a spec ends when A's and B's requests are
all done; C's requests still in flight then finish before the next round starts. Per spec (`policy:bound`): the
median makespan over the rounds and its ratio to the first spec's (`throughput_vs_first`: the same work, so the
inverse ratio of the times), engine steps, preemptions and C's TTFT p50 / p99 (from the moment its request was due,
which may fall within a step the engine is running, to its first token). This is what the served bench's
`throughput_vs_fcfs` measures, without the clients sharing the cores. Written to bench/results/fairness_replay.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter

from bench.common import environment, print_table, write_result

SEATS, BUDGET = 8, 512


def parse_spec(spec: str) -> tuple[str, int]:
    policy, _, bound = spec.partition(":")
    if not bound.isdigit() or int(bound) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected POLICY:BOUND, e.g. vtc:96")
    return policy, int(bound)


def flood(engine, policy: str, bound: int, seed: int, args: argparse.Namespace, requests: int | None = None) -> dict:
    """One round under `policy` with the shared prompt bound `bound` (A and B send `requests` each, default
    --requests); the engine must be idle."""
    from service.engine.request import RequestSpec
    from service.engine.sampling import SamplingParams

    sched = engine.scheduler
    sched.set_policy(policy, max_shared_prefill_tokens=bound)
    engine.pool.reset_prefix_cache()
    rng = random.Random(seed)
    shapes = {"a": (args.a_prompt, 8), "b": (args.b_prompt, 16), "c": (args.b_prompt, 8)}
    requests = args.requests if requests is None else requests
    sent: Counter = Counter()
    done: Counter = Counter()
    arrived: dict[str, float] = {}
    ttft: list[float] = []

    def send(tenant: str, due: float | None = None) -> None:
        n_in, n_out = shapes[tenant]
        rid = f"{policy}{bound}-{seed}-{tenant}{sent[tenant]}"
        sent[tenant] += 1
        prompt = tuple(rng.randrange(100, args.vocab) for _ in range(n_in))
        engine.add_request(RequestSpec(rid, prompt, SamplingParams(max_tokens=n_out, min_tokens=n_out, temperature=0,
                                                                   ignore_eos=True), tenant=tenant))
        if tenant == "c":
            arrived[rid] = due if due is not None else time.perf_counter()

    for tenant, outstanding in (("a", 64), ("b", 16)):
        for _ in range(min(outstanding, requests)):
            send(tenant)
    steps0, preempt0 = engine.num_steps, sched.num_preemptions
    start = next_c = time.perf_counter()
    while done["a"] < requests or done["b"] < requests:
        if time.perf_counter() >= next_c:  # due during the step that just ran: it waited for that step's end
            send("c", due=next_c)
            next_c += args.c_interval_s
        for out in engine.step():
            tenant = out.request_id.rsplit("-", 1)[1][0]
            if out.request_id in arrived and out.new_token_ids:
                ttft.append(time.perf_counter() - arrived.pop(out.request_id))
            if out.finished and tenant in ("a", "b"):
                done[tenant] += 1
                if sent[tenant] < requests:
                    send(tenant)
    makespan = time.perf_counter() - start
    steps, preemptions = engine.num_steps - steps0, sched.num_preemptions - preempt0
    while engine.has_unfinished():
        engine.step()
    ttft.sort()
    return {"makespan_s": makespan, "steps": steps, "preemptions": preemptions, "c_requests": len(ttft),
            "c_ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
            "c_ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.fairness_replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", type=lambda s: [parse_spec(x) for x in s.split(",")],
                    default=[("fcfs", 96), ("vtc", 96)],
                    help="POLICY:BOUND,... taking turns each round (default fcfs:96,vtc:96; the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per spec (the order reversed every other round)")
    ap.add_argument("--a-prompt", type=int, default=145, help="prompt tokens of A's requests")
    ap.add_argument("--b-prompt", type=int, default=52, help="prompt tokens of B's and C's requests")
    ap.add_argument("--requests", type=int, default=160, help="requests A and B send each")
    ap.add_argument("--c-interval-s", type=float, default=0.2, help="seconds between C's requests")
    args, _ = ap.parse_known_args(argv)
    if args.rounds < 1 or args.requests < 1 or args.a_prompt < 1 or args.b_prompt < 1 or args.c_interval_s <= 0:
        ap.error("--rounds, --requests and the prompt lengths must be >= 1, --c-interval-s > 0")

    from service.builder import build_runtime
    from service.config import EngineConfig, RuntimeConfig

    rt = build_runtime(RuntimeConfig(), EngineConfig(max_num_seqs=SEATS, max_num_batched_tokens=BUDGET,
                                                     speculation="off"))
    args.vocab = min(40_000, rt.tokenizer.vocab_size)
    for policy, bound in args.specs:  # warm-up, untimed: the first steps of each shape build their buffers
        flood(rt.engine, policy, bound, -1, args, requests=8)
    runs: dict[str, list[dict]] = {f"{p}:{b}": [] for p, b in args.specs}
    for rnd in range(args.rounds):
        for policy, bound in args.specs if rnd % 2 == 0 else args.specs[::-1]:
            r = flood(rt.engine, policy, bound, rnd, args)
            runs[f"{policy}:{bound}"].append(r)
            print(f"round {rnd + 1}/{args.rounds} {policy}:{bound}: {r['makespan_s']:.2f} s, {r['steps']} steps, "
                  f"{r['preemptions']} preemptions, C's TTFT p99 {r['c_ttft_p99_s'] or float('nan'):.3f} s",
                  flush=True)
    first = f"{args.specs[0][0]}:{args.specs[0][1]}"
    base = statistics.median(r["makespan_s"] for r in runs[first])
    res = {"workload": "fairness flood replayed in one process", "seats": SEATS, "budget": BUDGET,
           "a_prompt": args.a_prompt, "b_prompt": args.b_prompt, "requests": args.requests,
           "c_interval_s": args.c_interval_s, "rounds": args.rounds, "baseline": first, "specs": {}, **environment()}
    for spec, rs in runs.items():
        makespan = statistics.median(r["makespan_s"] for r in rs)
        p99s = [r["c_ttft_p99_s"] for r in rs if r["c_ttft_p99_s"] is not None]
        res["specs"][spec] = {"makespan_s": makespan, "makespan_s_rounds": [r["makespan_s"] for r in rs],
                              "throughput_vs_first": base / makespan,
                              "steps": statistics.median(r["steps"] for r in rs),
                              "preemptions": statistics.median(r["preemptions"] for r in rs),
                              "c_ttft_p99_s": statistics.median(p99s) if p99s else None}
    path = write_result("fairness_replay", res)
    print_table(f"fairness replay in one process (written to {path})",
                [(spec, f"{s['makespan_s']:.2f} s, {s['throughput_vs_first']:.3f} of {first}'s throughput, "
                        f"{s['steps']:.0f} steps, C's TTFT p99 "
                        f"{s['c_ttft_p99_s'] if s['c_ttft_p99_s'] is None else round(s['c_ttft_p99_s'], 3)} s")
                 for spec, s in res["specs"].items()])
    return res


if __name__ == "__main__":
    main()
