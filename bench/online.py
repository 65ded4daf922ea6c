"""Online benchmark: the *mixed* workload's requests over gRPC from this (client) process to a
`loraserve serve` process, with Poisson arrivals at fractions of the measured offline capacity.

1. Start the server (default model, the workload's adapters registered with --adapter) and warm it up.
2. Capacity: submit a burst of requests at once over gRPC; capacity = finished requests per second.
3. For each load level (25/50/75/100% of capacity): requests arrive as a Poisson process, each one
   streamed (GenerateStream); per request the client records time to first token (first message with
   tokens) and time per output token (the rest of the stream over the remaining tokens).
Reported per level: TTFT and TPOT p50/p90/p99, throughput, and goodput (requests per second that met the
SLO: TTFT <= --slo-ttft-s and TPOT <= --slo-tpot-s).
4. Both fronts: the same server serves gRPC and the OpenAI-compatible HTTP API; bursts of --front-streams
   concurrent streams (the same token-id prompts, fresh ones per burst so that no burst rides another's prefix
   cache) alternate between gRPC GenerateStream and HTTP /v1/completions with stream=true, --front-rounds times
   each. HTTP's TTFT p50 and throughput as ratios to gRPC's: `http_ttft_p50_ratio`, `http_throughput_ratio`.
Written to bench/results/online.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import chat_prompts, environment, print_table, write_result
from service.client import LoraServeClient


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def one_request(client: LoraServeClient, ids: list[int], adapter: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for msg in client.generate_stream_messages(token_ids=ids, adapter=adapter, temperature=0,
                                               max_tokens=new_tokens, min_tokens=new_tokens):
        if msg.token_ids:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            n += len(msg.token_ids)
    ttft = (first - t0) if first is not None else float("nan")
    tpot = (last - first) / (n - 1) if n > 1 and first is not None else float("nan")
    return {"ttft": ttft, "tpot": tpot, "tokens": n, "latency": time.perf_counter() - t0}


def one_http_request(http, base_model: str, ids: list[int], adapter: str, new_tokens: int) -> dict:
    """The same request as `one_request`, streamed over the HTTP front (SSE chunks of /v1/completions)."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    body = {"model": adapter or base_model, "prompt": ids, "stream": True, "temperature": 0,
            "max_tokens": new_tokens, "min_tokens": new_tokens, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        buf = b""
        for data in r.iter_raw():  # events split on the blank line by hand: the client's CPU is the server's too
            buf += data
            *events, buf = buf.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk = json.loads(event[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    ttft = (first - t0) if first is not None else float("nan")
    tpot = (last - first) / (n - 1) if n > 1 and first is not None else float("nan")
    return {"ttft": ttft, "tpot": tpot, "tokens": n, "latency": time.perf_counter() - t0}


def run_http_burst(base_url: str, base_model: str, prompts: list[list[int]], adapters: list[str],
                   new_tokens: int) -> dict:
    """Every prompt at once over the HTTP front, one client thread per stream (as `run_level` does over gRPC)."""
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    with httpx.Client(base_url=base_url, timeout=600, limits=limits) as http, \
            ThreadPoolExecutor(len(prompts)) as pool:
        t_start = time.perf_counter()

        def go(ids: list[int], adapter: str) -> None:
            r = one_http_request(http, base_model, ids, adapter, new_tokens)
            with lock:
                results.append(r)

        for f in [pool.submit(go, ids, adapters[i % len(adapters)]) for i, ids in enumerate(prompts)]:
            f.result()
        wall = time.perf_counter() - t_start
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "tok_s": tokens / wall, "req_s": len(results) / wall,
            "results": results}


def compare_fronts(server, base_model: str, prompts: list[list[int]], names: list[str], streams: int,
                   rounds: int, new_tokens: int) -> dict:
    """Bursts of `streams` concurrent streams, alternating gRPC and HTTP, `rounds` each, fresh prompts each."""
    base_url = f"http://127.0.0.1:{server.http_port}"
    run_http_burst(base_url, base_model, prompts[:4], names, 4)  # warm the HTTP path
    runs: dict[str, list[dict]] = {"grpc": [], "http": []}
    for r in range(rounds):
        for k, front in enumerate(("grpc", "http") if r % 2 == 0 else ("http", "grpc")):
            start = (2 * r + k) * streams
            batch = prompts[start:start + streams]
            cpu = time.process_time()
            lvl = (run_level(server.address, batch, names, new_tokens, None, 100 + r) if front == "grpc"
                   else run_http_burst(base_url, base_model, batch, names, new_tokens))
            lvl["client_cpu_s"] = time.process_time() - cpu  # the client shares the machine with the server
            rs = lvl.pop("results")
            lvl["ttft_p50_s"] = percentile([x["ttft"] for x in rs], 0.5)
            lvl["tpot_p50_s"] = percentile([x["tpot"] for x in rs if x["tpot"] == x["tpot"]], 0.5)
            runs[front].append(lvl)
    out: dict = {"front_streams": streams, "front_rounds": rounds, "fronts": runs}
    for front in ("grpc", "http"):
        out[f"{front}_ttft_p50_s"] = statistics.median(x["ttft_p50_s"] for x in runs[front])
        out[f"{front}_tok_s"] = statistics.median(x["tok_s"] for x in runs[front])
        out[f"{front}_client_cpu_s"] = statistics.median(x["client_cpu_s"] for x in runs[front])
    out["http_ttft_p50_ratio"] = out["http_ttft_p50_s"] / out["grpc_ttft_p50_s"]
    out["http_throughput_ratio"] = out["http_tok_s"] / out["grpc_tok_s"]
    return out


def run_level(target: str, prompts: list[list[int]], adapters: list[str], new_tokens: int, rate: float | None,
              seed: int) -> dict:
    """rate None: everything at once (the capacity burst); else Poisson arrivals at `rate` requests/s."""
    rng = random.Random(seed)
    results: list[dict] = []
    lock = threading.Lock()
    with LoraServeClient(target, timeout=600) as client, ThreadPoolExecutor(len(prompts)) as pool:
        t_start = time.perf_counter()
        futures = []
        next_at = t_start
        for i, ids in enumerate(prompts):
            if rate is not None:
                next_at += rng.expovariate(rate)
                time.sleep(max(0.0, next_at - time.perf_counter()))

            def go(ids: list[int], adapter: str) -> None:
                r = one_request(client, ids, adapter, new_tokens)
                with lock:
                    results.append(r)

            futures.append(pool.submit(go, ids, adapters[i % len(adapters)]))
        for f in futures:
            f.result()
        wall = time.perf_counter() - t_start
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": wall, "tok_s": tokens / wall, "req_s": len(results) / wall,
            "results": results}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.online", description=__doc__)
    ap.add_argument("--adapters", type=int, default=32, help="adapters of the mixed workload (0 = base model)")
    ap.add_argument("--capacity-requests", type=int, default=64, help="requests of the capacity burst")
    ap.add_argument("--requests", type=int, default=32, help="requests per load level")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--levels", default="0.25,0.5,0.75,1.0", help="fractions of the measured capacity")
    ap.add_argument("--slo-ttft-s", type=float, default=5.0)
    ap.add_argument("--slo-tpot-s", type=float, default=0.25)
    ap.add_argument("--threads", type=int, help="server torch threads (default: all cores)")
    ap.add_argument("--front-streams", type=int, default=64, help="concurrent streams of a front comparison burst")
    ap.add_argument("--front-rounds", type=int, default=2, help="bursts per front (alternated)")
    args = ap.parse_args(argv)

    from bench.engine import load_hf_default_model
    from bench.multi_lora import RANKS, TARGETS, make_adapters
    from service.builder import load_tokenizer
    from service.runtime.loader import default_model_path
    from tests.api.serve_process import ServeProcess

    with tempfile.TemporaryDirectory() as tmp:
        names: list[str] = [""]
        serve_args = ["--max-num-seqs", str(max(args.capacity_requests, args.requests, args.front_streams)),
                      "--max-batched-tokens", "2048", "--http-port", "0"]
        if args.threads:
            serve_args += ["--threads", str(args.threads)]
        if args.adapters:
            _, dirs = make_adapters(load_hf_default_model(), args.adapters, Path(tmp))
            names = [f"a{i}" for i in range(args.adapters)]
            serve_args += ["--max-active-adapters", str(args.adapters)]
            for name, d in zip(names, dirs):
                serve_args += ["--adapter", f"{name}={d}"]
        tok = load_tokenizer(default_model_path())
        n_level = max(args.capacity_requests, args.requests * 2)
        prompts = chat_prompts(tok, n_level + 2 * args.front_rounds * args.front_streams)
        front_prompts, prompts = prompts[n_level:], prompts[:n_level]
        server = ServeProcess(*serve_args, ready_timeout=300)
        try:
            run_level(server.address, prompts[:4], names, 4, None, 0)  # warm: adapters loaded and activated
            cap = run_level(server.address, prompts[:args.capacity_requests], names, args.new_tokens, None, 1)
            res = {"workload": "mixed-online", "adapters": args.adapters, "ranks": list(RANKS) if args.adapters
                   else [], "targets": TARGETS if args.adapters else [], "new_tokens": args.new_tokens,
                   "model": default_model_path().name, "transport": "gRPC GenerateStream, separate processes; "
                   "the front comparison also HTTP /v1/completions (SSE)",
                   "slo": {"ttft_s": args.slo_ttft_s, "tpot_s": args.slo_tpot_s},
                   "capacity_tok_s": cap["tok_s"], "capacity_req_s": cap["req_s"], "levels": [], **environment()}
            for j, frac in enumerate(float(x) for x in args.levels.split(",")):
                rate = frac * cap["req_s"]
                # Fresh prompts per level (a second half of the pool, rotated): no level rides another's cache.
                start = args.requests + (j * 7) % args.requests
                lvl = run_level(server.address, (prompts * 2)[start:start + args.requests], names,
                                args.new_tokens, rate, 10 + j)
                rs = lvl.pop("results")
                ttft = [r["ttft"] for r in rs]
                tpot = [r["tpot"] for r in rs if r["tpot"] == r["tpot"]]
                good = sum(1 for r in rs if r["ttft"] <= args.slo_ttft_s and r["tpot"] <= args.slo_tpot_s)
                res["levels"].append({
                    "load_fraction": frac, "arrival_rate_req_s": rate, **lvl,
                    **{f"ttft_p{int(q * 100)}_s": percentile(ttft, q) for q in (0.5, 0.9, 0.99)},
                    **{f"tpot_p{int(q * 100)}_s": percentile(tpot, q) for q in (0.5, 0.9, 0.99)},
                    "ttft_mean_s": statistics.fmean(ttft), "goodput_req_s": good / lvl["wall_s"],
                    "slo_met_fraction": good / len(rs)})
            res.update(compare_fronts(server, default_model_path().name, front_prompts, names, args.front_streams,
                                      args.front_rounds, args.new_tokens))
        finally:
            server.stop()
    path = write_result("online", res)
    rows = [("capacity", f"{cap['tok_s']:.1f} tok/s, {cap['req_s']:.3f} req/s over gRPC")]
    for lvl in res["levels"]:
        rows.append((f"{lvl['load_fraction']:.0%} load",
                     f"TTFT p50/p90/p99 {lvl['ttft_p50_s']:.2f}/{lvl['ttft_p90_s']:.2f}/{lvl['ttft_p99_s']:.2f} s, "
                     f"TPOT p50/p90/p99 {lvl['tpot_p50_s'] * 1000:.0f}/{lvl['tpot_p90_s'] * 1000:.0f}/"
                     f"{lvl['tpot_p99_s'] * 1000:.0f} ms, goodput {lvl['goodput_req_s']:.3f} req/s "
                     f"({lvl['slo_met_fraction']:.0%} in SLO)"))
    rows.append((f"fronts, {res['front_streams']} streams",
                 f"TTFT p50 gRPC {res['grpc_ttft_p50_s']:.2f} s, HTTP {res['http_ttft_p50_s']:.2f} s "
                 f"(ratio {res['http_ttft_p50_ratio']:.3f}); throughput gRPC {res['grpc_tok_s']:.1f}, HTTP "
                 f"{res['http_tok_s']:.1f} tok/s (ratio {res['http_throughput_ratio']:.3f}); client CPU per burst "
                 f"gRPC {res['grpc_client_cpu_s']:.1f} s, HTTP {res['http_client_cpu_s']:.1f} s"))
    print_table(f"online (written to {path})", rows)
    return res


if __name__ == "__main__":
    main()
