"""Fairness benchmark: three tenants over gRPC, each from its own client process, against one `loraserve serve`
on the default model, once with `--scheduling-policy vtc` and once with `fcfs`.

- A floods: 4x B's requests outstanding at once, prompts 4x B's, half B's output: each request about twice
  B's work, as many requests in all, so A's work outlasts B's;
- B is backlogged too: --b-concurrency requests outstanding (twice what the server runs at once), short prompts;
- C is light: one short request every --c-interval-s seconds, open loop; its TTFT is what a well-behaved tenant
  feels. By default the interval is set from the machine (`calibrate`): C asks for --c-share (a tenth) of the
  weighted service the server gives B's requests alone, measured on the first server before the first round.
  (It was a fixed 0.25 s, set on a 2-core AVX512-BF16 machine; on a 2-core AVX2 machine, whose steps are 4-5x
  longer, that made C a flood of its own: its TTFT p99 under the flood was 104 s.)

Every prompt is distinct (a numbered preamble), so prefix-cache hits are rare; the client counts only computed
prompt tokens (usage.input_tokens - cached_input_tokens), at the request's first token, and every output
token when its message arrives. Service is weighted like the server's counters (1 per prompt token, 2 per
output token, divided by the tenant's weight: all 1 here).

Reported per policy: each tenant's weighted service/s over the window in which A and B are both backlogged
(from the warm-up's end until the first of them has fewer requests outstanding than the server runs at once);
`backlogged_service_ratio` (max over min of A's and B's service per unit weight: 1.0 is perfectly fair);
C's TTFT p50/p99 in that window vs C alone on the idle server (`light_ttft_p99_ratio`) and vs C beside B's
backlog without A's flood (`light_ttft_p99_ratio_vs_no_flood`: what the flood itself costs C); and
`throughput_vs_fcfs`: the total throughput, vtc over fcfs: the weighted service every tenant received from
the start until A's and B's fixed work (all their requests, the same under both policies) was done, over that
time (C's share counts: a policy that serves C meanwhile does work that the other leaves for later).
`ab_work_throughput_vs_fcfs` counts A's and B's work alone. fcfs figures carry an `fcfs_` prefix. Written to
bench/results/fairness.json.

The flood runs --rounds times per policy (default 3), the policies alternating, each on a fresh server: one run's
makespan varies by ~10% on this machine, so `throughput_vs_fcfs` is the ratio of the two policies' medians (each
round's ratio is reported too); the service ratio and C's TTFT percentiles pool every round's window, and C alone
runs in every round, right before that round's flood on the same server.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import TOPICS, environment, print_table, write_result
from bench.online import percentile
from bench.probes import scrape

# The server's counters read before and after each flood (bench/probes.scrape): what the engine did meanwhile.
ENGINE_COUNTERS = {"steps": "loraserve_engine_step_seconds_count", "step_s": "loraserve_engine_step_seconds_sum",
                   "preemptions": "loraserve_num_preemptions_total", "prompt_tokens": "loraserve_prompt_tokens_total",
                   "prefix_hit_tokens": "loraserve_prefix_cache_hits_total"}
KEYS = {"a": "fairness-bench-key-tenant-a", "b": "fairness-bench-key-tenant-b",
        "c": "fairness-bench-key-tenant-c"}
W_IN, W_OUT = 1.0, 2.0


def tenants_file(path: Path) -> Path:
    from service.tenants import hash_api_key

    lines = ["tenants:"]
    for tenant, key in KEYS.items():
        lines += [f"  - id: {tenant}", f"    api_keys: [\"{hash_api_key(key)}\"]", "    weight: 1"]
    path.write_text("\n".join(lines) + "\n")
    return path


def prompt_text(tenant: str, i: int, words: int) -> str:
    """A distinct prompt of about `words` words (a numbered preamble keeps prompts from sharing a prefix)."""
    parts = [f"Ticket {tenant}-{i}-{i * 7919 % 10007}."]
    k = 0
    while sum(len(p.split()) for p in parts) < words:
        topic = TOPICS[(i + k) % len(TOPICS)]
        parts.append(f"Site {1000 + 37 * (i + k)} reports an issue with {topic}; what should be checked first?")
        k += 1
    return " ".join(parts)


def run_tenant(target: str, tenant: str, concurrency: int, words: int, max_tokens: int, count: int,
               interval_s: float, backlog_below: int, t_start: float, stop: mp.Event, out: mp.Queue,
               series: str) -> None:
    """A client process. Backlogged (interval_s 0): `concurrency` streamed requests kept outstanding until `count`
    were sent; `backlog_end` is when fewer than `backlog_below` were left outstanding (from then on the server may
    hold none of them waiting). Light (interval_s > 0): one request every interval_s seconds until `stop` is set.
    Puts (tenant, records, backlog_end, cpu_s) on `out`: cpu_s is the CPU seconds this client process used from
    t_start on (it shares the machine's cores with the server).

    Every stream of the process runs on one asyncio event loop (grpc.aio): the load generator wakes once for the
    messages that arrive together instead of once per stream thread, so it takes less of the cores the server
    runs on (measured over whole runs: a thread per stream 0.9-1.1 CPU seconds a flood and 27-32 thousand
    involuntary context switches of the server's threads; one event loop 0.7-0.9 s and 22-25 thousand)."""
    import asyncio

    import grpc

    from service.api.gen.loraserve.v1 import inference_pb2 as pb
    from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
    from service.client import build_request

    records: list[dict] = []
    state = {"next": 0, "outstanding": 0, "backlog_end": None}
    metadata = (("authorization", f"Bearer {KEYS[tenant]}"),)

    async def one(stub: pb_grpc.InferenceServiceStub, i: int) -> None:
        rec: dict = {"sent": time.time(), "first": None, "tokens": []}
        req = build_request(pb.GenerateStreamRequest, prompt_text(tenant + series, i, words), temperature=0,
                            max_tokens=max_tokens, ignore_eos=True)
        try:
            async for msg in stub.GenerateStream(req, metadata=metadata, timeout=900):
                now = time.time()
                if msg.token_ids:
                    rec["first"] = rec["first"] or now
                    rec["tokens"].append((now, len(msg.token_ids)))
                if msg.HasField("usage"):
                    rec["computed_prompt"] = msg.usage.input_tokens - msg.usage.cached_input_tokens
                if msg.HasField("timings"):  # the server's own view, from the request's arrival at the engine
                    rec["engine_ttft"], rec["engine_queue"] = msg.timings.ttft_ms / 1e3, msg.timings.queue_ms / 1e3
        except Exception as e:  # noqa: BLE001 - counted, not fatal: the report says how many
            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rec["done"] = time.time()
        records.append(rec)

    async def main() -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await channel.channel_ready()
            await asyncio.sleep(max(0.0, t_start - time.time()))
            cpu0 = time.process_time()
            if interval_s:
                tasks = []
                next_at = time.time()
                while not stop.is_set():
                    tasks.append(asyncio.create_task(one(stub, len(tasks))))
                    next_at += interval_s
                    await asyncio.sleep(max(0.0, next_at - time.time()))
                await asyncio.gather(*tasks)
            else:
                async def worker() -> None:
                    while state["next"] < count:
                        i = state["next"]
                        state["next"] += 1
                        state["outstanding"] += 1
                        await one(stub, i)
                        state["outstanding"] -= 1
                        if (state["backlog_end"] is None and state["next"] >= count
                                and state["outstanding"] < backlog_below):
                            state["backlog_end"] = time.time()

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.process_time() - cpu0

    cpu_s = asyncio.run(main())
    out.put((tenant, records, state["backlog_end"], cpu_s))


def proc_usage(pid: int) -> dict[str, float]:
    """A process's CPU seconds and its threads' involuntary context switches so far (Linux /proc; empty
    elsewhere): taken before and after a flood, what the server's process spent meanwhile."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        switches = 0
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            for line in status.read_text().splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    # After the ")" that ends the command name: utime and stime are the 12th and 13th fields.
    return {"server_cpu_s": (int(fields[11]) + int(fields[12])) / tick, "server_involuntary_switches": switches}


def service_in(records: list[dict], w0: float, w1: float) -> float:
    """Weighted service a tenant received within [w0, w1): prompt at its first token, outputs as they came."""
    total = 0.0
    for r in records:
        if r.get("first") is not None and w0 <= r["first"] < w1:
            total += W_IN * r.get("computed_prompt", 0)
        total += sum(W_OUT * n for t, n in r["tokens"] if w0 <= t < w1)
    return total


def ttfts(records: list[dict], w0: float, w1: float, key: str | None = None) -> list[float]:
    """TTFTs of the requests sent within [w0, w1) as the client saw them, or the server's `key` figure."""
    return [r["first"] - r["sent"] if key is None else r[key] for r in records
            if r.get("first") is not None and w0 <= r["sent"] < w1 and (key is None or key in r)]


def pooled(runs: list[dict], key: str, q: float) -> float:
    """The q-quantile of C's `key` figures over several scenario runs."""
    return percentile([x for r in runs for x in r["c"][key]], q)


def scenario(target: str, plan: dict[str, tuple[int, int, int, int, float]], warmup_s: float,
             backlog_below: int, series: str, light_s: float | None = None) -> dict:
    """Run the tenants of `plan` (tenant -> concurrency, words, max_tokens, count, interval_s), each in its own
    process. The light tenant (interval_s > 0) runs until every backlogged tenant is done (or for light_s
    seconds when it runs alone). The window: from warmup_s after the start until the first backlogged tenant
    stops being backlogged. `series` goes into every prompt: no scenario finds another's prompts cached."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    stop = ctx.Event()
    t0 = time.time() + 3.0  # the processes' start-up (imports) falls before it
    procs = [ctx.Process(target=run_tenant, args=(target, tenant, *spec, backlog_below, t0, stop, out, series))
             for tenant, spec in plan.items()]
    for p in procs:
        p.start()
    backlogged = [t for t, spec in plan.items() if not spec[4]]
    results: dict[str, tuple[list[dict], float | None]] = {}
    cpu: dict[str, float] = {}
    if backlogged:
        while len(results) < len(backlogged):
            tenant, records, end, cpu[tenant] = out.get(timeout=1800)
            results[tenant] = (records, end)
    else:
        time.sleep(max(0.0, t0 + (light_s or 10.0) - time.time()))
    stop.set()
    while len(results) < len(procs):
        tenant, records, end, cpu[tenant] = out.get(timeout=600)
        results[tenant] = (records, end)
    for p in procs:
        p.join(timeout=60)
    w0 = t0 + warmup_s
    ends = [results[t][1] for t in backlogged if results[t][1] is not None]
    w1 = min(ends) if ends else max(r["done"] for recs, _ in results.values() for r in recs)
    res: dict = {"window_s": w1 - w0}
    for tenant, (records, _) in results.items():
        errors = [r["error"] for r in records if "error" in r]
        service = service_in(records, w0, w1)
        res[tenant] = {"records": records, "requests": len(records), "errors": len(errors),
                       "first_error": errors[0] if errors else None, "client_cpu_s": cpu[tenant],
                       "service": service, "service_per_s": service / (w1 - w0), "ttft": ttfts(records, w0, w1),
                       "engine_ttft": ttfts(records, w0, w1, "engine_ttft"),
                       "engine_queue": ttfts(records, w0, w1, "engine_queue")}
    if backlogged:
        # Throughput: the same work under either policy (every backlogged request, all of it), over the time
        # from the start until the last of it finished.
        recs = [r for t in backlogged for r in results[t][0]]
        work = sum(W_IN * r.get("computed_prompt", 0) + W_OUT * sum(n for _, n in r["tokens"]) for r in recs)
        res["work"] = work
        end = max(r["done"] for r in recs)
        res["makespan_s"] = end - t0
        res["work_per_s"] = work / res["makespan_s"]
        # Everything the engine delivered meanwhile, C's share included: the total throughput
        res["total_work_per_s"] = sum(service_in(recs_t, t0, end) for recs_t, _ in results.values()) / (end - t0)
    return res


def calibrate(target: str, b: tuple, seats: int, share: float, c_max_tokens: int) -> dict:
    """C's interval for this machine: B's requests alone (twice the seats outstanding, four times the seats in
    all) give the weighted service/s the server delivers; C, whose request is B's prompt and `c_max_tokens`
    outputs, sends one every interval so that it asks for `share` of it."""
    concurrency, words, max_tokens = 2 * seats, b[1], b[2]
    run = scenario(target, {"b": (concurrency, words, max_tokens, 4 * seats, 0.0)}, 0.0, seats, "-calibration")
    records = [r for r in run["b"]["records"] if "error" not in r]
    if not records:
        raise RuntimeError(f"calibration: every request failed ({run['b']['first_error']})")
    prompt = statistics.mean(r.get("computed_prompt", 0) for r in records)
    c_work = W_IN * prompt + W_OUT * c_max_tokens
    return {"service_per_s": run["work_per_s"], "b_prompt_tokens": prompt, "c_work_per_request": c_work,
            "share": share, "c_interval_s": round(c_work / (share * run["work_per_s"]), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.fairness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="server: requests running at once")
    ap.add_argument("--max-batched-tokens", type=int, default=512, help="server: token budget of one step")
    ap.add_argument("--b-concurrency", type=int, default=16, help="B's requests outstanding (A: 4x)")
    ap.add_argument("--b-requests", type=int, default=160, help="B's requests in all (A: as many, each about twice "
                    "the work)")
    ap.add_argument("--b-words", type=int, default=20, help="B's and C's prompt length in words (A: 4x)")
    ap.add_argument("--max-tokens", type=int, default=16, help="B's output tokens (A and C: half)")
    ap.add_argument("--c-interval-s", type=float, help="C's interval between requests (default: from --c-share)")
    ap.add_argument("--c-share", type=float, default=0.1, help="C's demand as a fraction of the weighted service "
                    "the server gives B's requests alone, measured before the first round (sets C's interval)")
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--max-shared-prefill-tokens", type=int, help="server, vtc: the most prompt tokens of a step "
                    "while tenants share the engine (default: the server's)")
    ap.add_argument("--stream-interval", type=int, help="server: tokens a streamed message gathers (default: the "
                    "server's)")
    ap.add_argument("--threads", type=int, help="server torch threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=3, help="flood runs per policy, alternating policies, each after "
                    "C alone on the same server (C beside B's backlog: the first round only)")
    ap.add_argument("--alone-s", type=float, help="seconds of C alone per round (default: 20 of C's intervals, at "
                    "least 10 s)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least one round per policy is needed")
    if args.c_interval_s is not None and args.c_interval_s <= 0:
        ap.error(f"--c-interval-s {args.c_interval_s}: C's interval must be positive")
    if args.alone_s is not None and args.alone_s <= 0:
        ap.error(f"--alone-s {args.alone_s}: C alone needs a positive number of seconds")
    if not 0 < args.c_share < 1:
        ap.error(f"--c-share {args.c_share}: C's share must be between 0 and 1")

    from service.config import EngineConfig, ServerConfig
    from service.runtime.loader import default_model_path
    from tests.api.serve_process import ServeProcess

    half = max(1, args.max_tokens // 2)
    a = (4 * args.b_concurrency, 4 * args.b_words, half, args.b_requests, 0.0)
    b = (args.b_concurrency, args.b_words, args.max_tokens, args.b_requests, 0.0)
    c = [1, args.b_words, half, 0, args.c_interval_s]  # the interval is set by `calibrate` when not given
    res: dict = {"workload": "fairness", "model": default_model_path().name,
                 "transport": "gRPC GenerateStream, one client process per tenant, its streams on one asyncio loop",
                 "server": {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
                            "max_shared_prefill_tokens": args.max_shared_prefill_tokens
                            or EngineConfig.max_shared_prefill_tokens,
                            "stream_interval": args.stream_interval or ServerConfig.stream_interval},
                 "tenants": {name: {"concurrency": spec[0], "prompt_words": spec[1], "max_tokens": spec[2],
                                    "requests": spec[3], "interval_s": spec[4]}
                             for name, spec in (("a", a), ("b", b), ("c", c))},
                 "weights": {"input_token": W_IN, "output_token": W_OUT}, "rounds": args.rounds, **environment()}
    rows = []
    policies = ("vtc", "fcfs")
    floods: dict[str, list[dict]] = {p: [] for p in policies}
    alone: dict[str, list[dict]] = {p: [] for p in policies}
    no_flood: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tenants = tenants_file(Path(tmp) / "tenants.yaml")
        for rnd in range(args.rounds):
            # A fresh server per policy and round (no prefix cache or counters carried over); the order of the
            # two policies alternates, so a drift of the machine's speed during the run falls on both.
            for policy in policies if rnd % 2 == 0 else policies[::-1]:
                serve_args = ["--tenants", str(tenants), "--scheduling-policy", policy, "--max-num-seqs",
                              str(args.max_num_seqs), "--max-batched-tokens", str(args.max_batched_tokens),
                              "--metrics-port", "0"]
                if args.threads:
                    serve_args += ["--threads", str(args.threads)]
                if args.max_shared_prefill_tokens:
                    serve_args += ["--max-shared-prefill-tokens", str(args.max_shared_prefill_tokens)]
                if args.stream_interval:
                    serve_args += ["--stream-interval", str(args.stream_interval)]
                server = ServeProcess(*serve_args, ready_timeout=300)
                try:
                    seats = args.max_num_seqs
                    if c[4] is None:
                        res["calibration"] = calibrate(server.address, b, seats, args.c_share, half)
                        c[4] = res["calibration"]["c_interval_s"]
                        res["tenants"]["c"]["interval_s"] = c[4]
                        print(f"calibration: B's requests alone {res['calibration']['service_per_s']:.0f} weighted "
                              f"service/s; C sends one every {c[4]:.2f} s", flush=True)
                    # C alone in every round, right before the flood: the machine's speed drifts between rounds,
                    # and C's TTFT with A flooding is held against C's alone in the same rounds
                    alone[policy].append(scenario(server.address, {"c": c}, 1.0, seats, f"-{rnd}alone",
                                                  light_s=args.alone_s or max(10.0, 20 * c[4])))
                    if rnd == 0:
                        # a short warm-up: B's backlog alone may end within the flood's (an empty window)
                        no_flood[policy] = scenario(server.address, {"b": b, "c": c}, min(args.warmup_s, 1.0), seats,
                                                    f"-{rnd}beside")
                    port = next(e for e in server.events() if e.get("event") == "server_ready")["metrics_port"]
                    before = scrape(port) | proc_usage(server.proc.pid)
                    floods[policy].append(scenario(server.address, {"a": a, "b": b, "c": c}, args.warmup_s, seats,
                                                   f"-{rnd}flood"))
                    after = scrape(port) | proc_usage(server.proc.pid)
                    engine = {name: after.get(key, 0.0) - before.get(key, 0.0) for name, key in ENGINE_COUNTERS.items()}
                    engine |= {key: after[key] - before[key] for key in after if key.startswith("server_")}
                    engine["client_cpu_s"] = sum(floods[policy][-1][t]["client_cpu_s"] for t in "abc")
                    floods[policy][-1]["engine"] = engine
                finally:
                    server.stop()
                f = floods[policy][-1]
                e = f["engine"]
                print(f"round {rnd + 1}/{args.rounds} {policy}: A:B {f['a']['service_per_s']:.0f}:"
                      f"{f['b']['service_per_s']:.0f}/s, A's and B's work in {f['makespan_s']:.1f} s, C's TTFT p99 "
                      f"alone {percentile(alone[policy][-1]['c']['ttft'], 0.99):.3f} s, flood "
                      f"{percentile(f['c']['ttft'], 0.99):.3f} s; engine: {e['steps']:.0f} steps, "
                      f"{e['step_s'] / max(e['steps'], 1) * 1e3:.1f} ms each, {e['preemptions']:.0f} preemptions, "
                      f"{e['prompt_tokens']:.0f} prompt tokens ({e['prefix_hit_tokens']:.0f} cached); CPU s: server "
                      f"{e.get('server_cpu_s', float('nan')):.1f} ({e.get('server_involuntary_switches', 0):.0f} "
                      f"involuntary switches), clients {e['client_cpu_s']:.1f}", flush=True)
    for policy in policies:
        rounds, beside_b = floods[policy], no_flood[policy]
        # Pooled over the rounds: each tenant's service over the sum of the windows, C's TTFTs of every window.
        window = sum(r["window_s"] for r in rounds)
        service = {t: sum(r[t]["service"] for r in rounds) / window for t in "abc"}
        sa, sb = service["a"], service["b"]
        flood_ttft = [x for r in rounds for x in r["c"]["ttft"]]
        ttft = {"alone": [x for r in alone[policy] for x in r["c"]["ttft"]], "no_flood": beside_b["c"]["ttft"],
                "flood": flood_ttft}
        p99 = {name: percentile(v, 0.99) for name, v in ttft.items()}
        p50 = {name: percentile(v, 0.5) for name, v in ttft.items()}
        work_per_s = [r["work_per_s"] for r in rounds]
        total_per_s = [r["total_work_per_s"] for r in rounds]
        prefix = "" if policy == "vtc" else "fcfs_"
        figures = {
            "backlogged_service_ratio": max(sa, sb) / min(sa, sb) if min(sa, sb) > 0 else float("inf"),
            "backlogged_service_ratio_rounds": [max(r["a"]["service_per_s"], r["b"]["service_per_s"])
                                                / max(1e-9, min(r["a"]["service_per_s"], r["b"]["service_per_s"]))
                                                for r in rounds],
            "light_ttft_p99_ratio": p99["flood"] / p99["alone"],
            "light_ttft_p99_ratio_vs_no_flood": p99["flood"] / p99["no_flood"],
            "service_per_s": service, "window_s": window,
            "work_per_s": statistics.median(work_per_s), "work_per_s_rounds": work_per_s,
            "total_work_per_s": statistics.median(total_per_s), "total_work_per_s_rounds": total_per_s,
            "makespan_s_rounds": [r["makespan_s"] for r in rounds],
            "engine_rounds": [r["engine"] for r in rounds],
            "light_ttft_p99_s_rounds": [{"alone": percentile(q["c"]["ttft"], 0.99),
                                         "flood": percentile(r["c"]["ttft"], 0.99)}
                                        for q, r in zip(alone[policy], rounds)],
            "light_ttft_p50_s": p50, "light_ttft_p99_s": p99,
            # the same requests' TTFT and queueing as the server measured them (from arrival at the engine)
            "light_engine_ttft_p50_p99_s": {name: [pooled(runs, "engine_ttft", q) for q in (0.5, 0.99)]
                                            for name, runs in (("alone", alone[policy]), ("flood", rounds))},
            "light_engine_queue_p50_p99_s": {name: [pooled(runs, "engine_queue", q) for q in (0.5, 0.99)]
                                             for name, runs in (("alone", alone[policy]), ("flood", rounds))},
            "light_ttft_samples": {name: len(v) for name, v in ttft.items()},
            "requests": {t: sum(r[t]["requests"] for r in rounds) for t in "abc"},
            "errors": {t: sum(r[t]["errors"] for r in rounds) + beside_b.get(t, {}).get("errors", 0) for t in "abc"},
            "first_errors": [r[t]["first_error"] for r in rounds for t in "abc" if r[t]["first_error"]],
        }
        res.update({prefix + k: v for k, v in figures.items()})
        rows += [(f"{policy}: service/s A, B, C", ", ".join(f"{service[t]:.0f}" for t in "abc")
                  + f" over {window:.0f} s in {len(rounds)} rounds"
                  + f" (A:B ratio {figures['backlogged_service_ratio']:.2f})"),
                 (f"{policy}: C TTFT p50/p99", f"alone {p50['alone']:.3f}/{p99['alone']:.3f} s, beside B "
                  f"{p50['no_flood']:.3f}/{p99['no_flood']:.3f} s, A flooding {p50['flood']:.3f}/"
                  f"{p99['flood']:.3f} s ({len(flood_ttft)} samples)"),
                 (f"{policy}: C TTFT p50/p99 in the engine", ", ".join(
                     f"{name} {v[0]:.3f}/{v[1]:.3f} s" for name, v in figures["light_engine_ttft_p50_p99_s"].items())
                  + " (queued " + ", ".join(f"{name} {v[0]:.3f}/{v[1]:.3f} s"
                                            for name, v in figures["light_engine_queue_p50_p99_s"].items()) + ")"),
                 (f"{policy}: all of A's and B's work", f"{rounds[0]['work']:.0f} in "
                  + ", ".join(f"{r['makespan_s']:.1f}" for r in rounds)
                  + f" s: median {figures['work_per_s']:.0f}/s; with C's service meanwhile (total) median "
                  + f"{figures['total_work_per_s']:.0f}/s")]
    res["throughput_vs_fcfs"] = res["total_work_per_s"] / res["fcfs_total_work_per_s"]
    res["throughput_vs_fcfs_rounds"] = [v / f for v, f in zip(res["total_work_per_s_rounds"],
                                                              res["fcfs_total_work_per_s_rounds"])]
    res["ab_work_throughput_vs_fcfs"] = res["work_per_s"] / res["fcfs_work_per_s"]
    path = write_result("fairness", res)
    rows += [("total throughput vtc / fcfs", f"{res['throughput_vs_fcfs']:.3f} (medians; per round "
             + ", ".join(f"{x:.2f}" for x in res["throughput_vs_fcfs_rounds"]) + ")"),
             ("A's and B's work vtc / fcfs", f"{res['ab_work_throughput_vs_fcfs']:.3f}")]
    print_table(f"fairness (written to {path})", rows)
    return res


if __name__ == "__main__":
    main()
