"""Streamed messages against throughput: `loraserve serve` on the default model with each `--stream-interval` of
--intervals (default 1 and 4) in turn, --calls GenerateStream calls at once (64) from this process, a thread per call
(as a synchronous gRPC client runs them), --requests in all (192), each a distinct ~32-token question completed to
--max-tokens tokens (48, ignore_eos). A fresh server per interval and round; the intervals take turns, their order
reversed every other round, so a drift of the machine's speed falls on each.

Reported per interval: the tokens/s the clients received (median over the rounds, and each round), the messages per
request, the server's CPU seconds and its threads' involuntary context switches per 1,000 tokens, and
`throughput_vs_first` (its median over the first interval's). The client shares the server's cores, as the
other served benches' clients do: with fewer messages both sides wake less. Written to bench/results/streaming.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import environment, print_table, questions, write_result
from bench.fairness import proc_usage


def load(target: str, prompts: list[str], calls: int, max_tokens: int) -> dict:
    """Every prompt streamed, `calls` at once: tokens/s and messages the client received."""
    import grpc

    from service.api.gen.loraserve.v1 import inference_pb2 as pb
    from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
    from service.client import build_request

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        def one(text: str) -> tuple[int, int]:
            req = build_request(pb.GenerateStreamRequest, text, temperature=0, max_tokens=max_tokens, ignore_eos=True)
            tokens = messages = 0
            for msg in stub.GenerateStream(req, timeout=600):
                tokens += len(msg.token_ids)
                messages += 1
            return tokens, messages

        one("Warm up: say hello.")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(calls) as pool:
            done = list(pool.map(one, prompts))
        wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in done)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "messages_per_request": sum(m for _, m in done) / len(done)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.streaming", description=__doc__.split("\n\n")[0])
    ap.add_argument("--intervals", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="the servers' --stream-interval values, comma-separated (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=64, help="calls at once")
    ap.add_argument("--requests", type=int, default=192, help="calls in all, per server")
    ap.add_argument("--max-tokens", type=int, default=48)
    args, _ = ap.parse_known_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.requests < 1 or args.max_tokens < 1 or not args.intervals \
            or min(args.intervals) < 1:
        ap.error("--rounds, --calls, --requests, --max-tokens and every interval must be >= 1")

    from service.runtime.loader import default_model_path
    from tests.api.serve_process import ServeProcess

    prompts = questions(args.requests)
    runs: dict[int, list[dict]] = {i: [] for i in args.intervals}
    for rnd in range(args.rounds):
        for interval in args.intervals if rnd % 2 == 0 else args.intervals[::-1]:
            server = ServeProcess("--max-num-seqs", str(args.calls), "--speculation", "off", "--stream-interval",
                                  str(interval), ready_timeout=300)
            try:
                before = proc_usage(server.proc.pid)
                r = load(server.address, prompts, args.calls, args.max_tokens)
                after = proc_usage(server.proc.pid)
            finally:
                server.stop()
            r |= {k: after[k] - before[k] for k in after}
            runs[interval].append(r)
            print(f"round {rnd + 1}/{args.rounds} --stream-interval {interval}: {r['tok_s']:.1f} tokens/s, "
                  f"{r['messages_per_request']:.1f} messages a request, server CPU "
                  f"{r.get('server_cpu_s', float('nan')):.1f} s", flush=True)
    base = statistics.median(r["tok_s"] for r in runs[args.intervals[0]])
    res: dict = {"workload": "streaming", "model": default_model_path().name, "calls": args.calls,
                 "requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds,
                 "client": "one process, a thread per GenerateStream call", "intervals": {}, **environment()}
    rows = []
    for interval, rs in runs.items():
        tok_s = statistics.median(r["tok_s"] for r in rs)
        per_k = {key: statistics.median(r[key] / r["tokens"] * 1000 for r in rs)
                 for key in ("server_cpu_s", "server_involuntary_switches") if all(key in r for r in rs)}
        res["intervals"][str(interval)] = {
            "tok_s": tok_s, "tok_s_rounds": [r["tok_s"] for r in rs], "throughput_vs_first": tok_s / base,
            "messages_per_request": statistics.median(r["messages_per_request"] for r in rs),
            **{f"{key}_per_1k_tokens": v for key, v in per_k.items()}}
        each = ", ".join(f"{r['tok_s']:.0f}" for r in rs)
        rows.append((f"--stream-interval {interval}",
                     f"{tok_s:.1f} tokens/s ({each}), {tok_s / base:.3f} of "
                     f"{args.intervals[0]}'s; {res['intervals'][str(interval)]['messages_per_request']:.1f} messages "
                     "a request" + "".join(f"; {key.replace('_', ' ')} {v:.3f} per 1k tokens"
                                            for key, v in per_k.items())))
    path = write_result("streaming", res)
    print_table(f"streamed messages and throughput (written to {path})", rows)
    return res


if __name__ == "__main__":
    main()
