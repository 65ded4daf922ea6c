"""Fairness benchmark: three tenants over gRPC, each from its own client process, against one `loraserve serve`
on the default model, once with `--scheduling-policy vtc` and once with `fcfs`.

- A floods: --a-concurrency streamed requests always outstanding (4x B's), prompts --a-prompt tokens (8x B's);
- B is backlogged too: --b-concurrency requests outstanding (as many as the server runs at once), short prompts;
- C is light: one short request every --c-interval-s seconds, one at a time; its TTFT is what a well-behaved
  tenant feels.

Every prompt is distinct (a numbered preamble), so prefix-cache hits are rare; the client counts only computed
prompt tokens (usage.input_tokens - cached_input_tokens) anyway, at the request's first token, and every
output token when its message arrives. Service is weighted like the server's counters (1 per prompt token, 2
per output token, divided by the tenant's weight: all 1 here), and measured over a window after a warm-up.

Reported per policy: each tenant's weighted service/s; `backlogged_service_ratio` (max over min of A's and
B's service per unit weight: 1.0 is perfectly fair; target within 1.2); C's TTFT p50/p99 with the flood vs C
alone on the idle server (`light_ttft_p99_ratio`) and vs C beside B's backlog without A's flood
(`light_ttft_p99_ratio_vs_no_flood`: what the flood itself costs C); total weighted service/s, with
`throughput_vs_fcfs` = vtc's over fcfs's. fcfs figures carry an `fcfs_` prefix. Written to
bench/results/fairness.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

from bench.common import TOPICS, environment, print_table, write_result
from bench.online import percentile

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


def run_tenant(target: str, tenant: str, concurrency: int, words: int, max_tokens: int, interval_s: float,
               t_end: float, out: mp.Queue) -> None:
    """A client process: `concurrency` threads each keep one streamed request outstanding until t_end (with
    interval_s > 0: one thread, one request per interval). Puts a list of request records on `out`."""
    from service.client import LoraServeClient

    records: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    with LoraServeClient(target, api_key=KEYS[tenant], timeout=600) as client:
        def worker() -> None:
            next_at = time.time()
            while time.time() < t_end:
                if interval_s:
                    time.sleep(max(0.0, next_at - time.time()))
                    next_at += interval_s
                with lock:
                    i = next(counter)
                sent = time.time()
                rec: dict = {"sent": sent, "first": None, "tokens": []}
                try:
                    for msg in client.generate_stream_messages(prompt_text(tenant, i, words), temperature=0,
                                                               max_tokens=max_tokens, ignore_eos=True):
                        now = time.time()
                        if msg.token_ids:
                            rec["first"] = rec["first"] or now
                            rec["tokens"].append((now, len(msg.token_ids)))
                        if msg.HasField("usage"):
                            rec["computed_prompt"] = msg.usage.input_tokens - msg.usage.cached_input_tokens
                except Exception as e:  # noqa: BLE001 - counted, not fatal: the report says how many
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                with lock:
                    records.append(rec)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put((tenant, records))


def service_in(records: list[dict], w0: float, w1: float) -> float:
    """Weighted service a tenant received within [w0, w1): prompt at its first token, outputs as they came."""
    total = 0.0
    for r in records:
        if r.get("first") is not None and w0 <= r["first"] < w1:
            total += W_IN * r.get("computed_prompt", 0)
        total += sum(W_OUT * n for t, n in r["tokens"] if w0 <= t < w1)
    return total


def ttfts(records: list[dict], w0: float, w1: float) -> list[float]:
    return [r["first"] - r["sent"] for r in records if r.get("first") is not None and w0 <= r["sent"] < w1]


def scenario(target: str, plan: dict[str, tuple[int, int, int, float]], warmup_s: float, window_s: float) -> dict:
    """Run the tenants of `plan` (tenant -> concurrency, words, max_tokens, interval) in their own processes."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    t0 = time.time() + 3.0  # the processes' start-up (imports) falls before the warm-up
    t_end = t0 + warmup_s + window_s
    procs = [ctx.Process(target=run_tenant, args=(target, tenant, *spec, t_end, out)) for tenant, spec in plan.items()]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=warmup_s + window_s + 900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    w0, w1 = t0 + warmup_s, t_end
    res: dict = {"window_s": window_s}
    for tenant, records in results.items():
        errors = [r["error"] for r in records if "error" in r]
        res[tenant] = {"requests": len(records), "errors": len(errors), "first_error": errors[0] if errors else None,
                       "service_per_s": service_in(records, w0, w1) / window_s, "ttft": ttfts(records, w0, w1)}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.fairness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="server: requests running at once")
    ap.add_argument("--max-batched-tokens", type=int, default=512, help="server: token budget of one step")
    ap.add_argument("--a-concurrency", type=int, default=32)
    ap.add_argument("--b-concurrency", type=int, default=8)
    ap.add_argument("--b-words", type=int, default=40, help="B's and C's prompt length in words (A: 8x)")
    ap.add_argument("--max-tokens", type=int, default=32, help="A's and B's output tokens (C: half)")
    ap.add_argument("--c-interval-s", type=float, default=0.5)
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--threads", type=int, help="server torch threads (default: all cores)")
    args = ap.parse_args(argv)

    from service.runtime.loader import default_model_path
    from tests.api.serve_process import ServeProcess

    a = (args.a_concurrency, 8 * args.b_words, args.max_tokens, 0.0)
    b = (args.b_concurrency, args.b_words, args.max_tokens, 0.0)
    c = (1, args.b_words, max(1, args.max_tokens // 2), args.c_interval_s)
    res: dict = {"workload": "fairness", "model": default_model_path().name,
                 "transport": "gRPC GenerateStream, one client process per tenant",
                 "server": {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens},
                 "tenants": {"a": {"concurrency": a[0], "prompt_words": a[1], "max_tokens": a[2]},
                             "b": {"concurrency": b[0], "prompt_words": b[1], "max_tokens": b[2]},
                             "c": {"interval_s": c[3], "prompt_words": c[1], "max_tokens": c[2]}},
                 "weights": {"input_token": W_IN, "output_token": W_OUT}, **environment()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tenants = tenants_file(Path(tmp) / "tenants.yaml")
        for policy in ("vtc", "fcfs"):
            serve_args = ["--tenants", str(tenants), "--scheduling-policy", policy, "--max-num-seqs",
                          str(args.max_num_seqs), "--max-batched-tokens", str(args.max_batched_tokens)]
            if args.threads:
                serve_args += ["--threads", str(args.threads)]
            server = ServeProcess(*serve_args, ready_timeout=300)
            try:
                window = args.window_s
                alone = scenario(server.address, {"c": c}, 2.0, min(20.0, window))
                no_flood = scenario(server.address, {"b": b, "c": c}, args.warmup_s, window / 2)
                flood = scenario(server.address, {"a": a, "b": b, "c": c}, args.warmup_s, window)
            finally:
                server.stop()
            sa, sb = flood["a"]["service_per_s"], flood["b"]["service_per_s"]
            p99 = {name: percentile(s["c"]["ttft"], 0.99) for name, s in
                   (("alone", alone), ("no_flood", no_flood), ("flood", flood))}
            p50 = {name: percentile(s["c"]["ttft"], 0.5) for name, s in
                   (("alone", alone), ("no_flood", no_flood), ("flood", flood))}
            prefix = "" if policy == "vtc" else "fcfs_"
            figures = {
                "backlogged_service_ratio": max(sa, sb) / min(sa, sb) if min(sa, sb) > 0 else float("inf"),
                "light_ttft_p99_ratio": p99["flood"] / p99["alone"],
                "light_ttft_p99_ratio_vs_no_flood": p99["flood"] / p99["no_flood"],
                "total_service_per_s": sum(flood[t]["service_per_s"] for t in "abc"),
                "service_per_s": {t: flood[t]["service_per_s"] for t in "abc"},
                "light_ttft_p50_s": p50, "light_ttft_p99_s": p99,
                "requests": {t: flood[t]["requests"] for t in "abc"},
                "errors": {t: flood[t]["errors"] for t in "abc"},
                "first_errors": [flood[t]["first_error"] for t in "abc" if flood[t]["first_error"]],
            }
            res.update({prefix + k: v for k, v in figures.items()})
            rows += [(f"{policy}: service/s A, B, C", ", ".join(f"{flood[t]['service_per_s']:.0f}" for t in "abc")
                      + f" (A:B ratio {figures['backlogged_service_ratio']:.2f})"),
                     (f"{policy}: C TTFT p50/p99", f"alone {p50['alone']:.3f}/{p99['alone']:.3f} s, beside B "
                      f"{p50['no_flood']:.3f}/{p99['no_flood']:.3f} s, A flooding {p50['flood']:.3f}/"
                      f"{p99['flood']:.3f} s")]
    res["throughput_vs_fcfs"] = res["total_service_per_s"] / res["fcfs_total_service_per_s"]
    path = write_result("fairness", res)
    rows += [("throughput vtc / fcfs", f"{res['throughput_vs_fcfs']:.3f}")]
    print_table(f"fairness (written to {path})", rows)
    return res


if __name__ == "__main__":
    main()
