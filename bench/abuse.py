"""Abuse benchmark: what the served product does when a tenant misbehaves or the load is far past capacity.

A `loraserve serve` process on the default model with the demo tenants file (alice and bob:
max_concurrent_requests 32 each; ops: admin), a short --client-stall-timeout-s, metrics on a side port.
This (client) process then runs:

A) Unread streams. alice opens --unread-streams GenerateStream calls (chat prompt, logprobs=20 so a message
   is ~1 KB, max_tokens 256, EOS ignored) over a channel whose HTTP/2 window is small and never grows,
   reads the first message of each and nothing more. Meanwhile health is checked every 100 ms and bob runs
   sequential streamed requests; his TTFT is compared with the same requests run alone just before.
   Reported: alice's calls accepted / refused (status and message), health latency and failures, bob's TTFT
   alone vs during, the server's loraserve_client_stalls_total{direction="write"} once the stall timeout
   has passed, whether alice is served again, and whether loraserve_num_requests_running is back to 0.
B) 3x overload. Capacity first (a burst of --capacity-requests unary calls at once, half alice's, half
   bob's: requests/s), then --overload-s of Poisson arrivals at --overload-factor x that rate, split
   between alice and bob, unary Generate with max_tokens 64 and a --deadline-s deadline. Reported: every
   call's status (OK, RESOURCE_EXHAUSTED with / without RetryInfo, DEADLINE_EXCEEDED, UNAVAILABLE, other),
   health every 500 ms, the server's RSS before / peak during / after, and the usage ledger (GetUsage as
   ops, every tenant, grouped by tenant, from the overload's start) against what the clients saw.

It reports; it does not pass or fail. Written to bench/results/abuse.json.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from bench.common import SYSTEM_PROMPT, environment, print_table, questions, write_result
from bench.online import percentile
from bench.probes import (
    HealthProbe,
    Periodic,
    message_shape,
    outcome,
    process_status,
    rss_mib,
    scrape,
    summarize_health,
)
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from service.client import LoraServeClient, build_request

REPO = Path(__file__).resolve().parents[1]
TENANTS_FILE = REPO / "service" / "demo" / "tenants.yaml"
# The demo keys published in that file's comments.
KEYS = {"alice": "demo-alice-key-not-secret", "bob": "demo-bob-key-not-secret", "ops": "demo-ops-key-not-secret"}
# A client that never lets its window grow: once a stream's few KB are buffered, the server's writes block.
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8192)]
STALLS = 'loraserve_client_stalls_total{direction="write"}'
RUNNING = "loraserve_num_requests_running"
B_FIRST_QUESTION = 10_000  # B's prompts share no question with A's


def auth(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def ttft(stub: pb_grpc.InferenceServiceStub, question: str, tenant: str, max_tokens: int) -> dict:
    """One streamed request: time to the first message with tokens, or the status it failed with."""
    req = build_request(pb.GenerateStreamRequest, messages=chat(question), temperature=0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    first = None
    try:
        for msg in stub.GenerateStream(req, metadata=auth(tenant), timeout=60):
            if msg.token_ids and first is None:
                first = time.perf_counter() - t0
        return {"code": "OK", "ttft_s": first}
    except grpc.RpcError as e:
        return {"code": outcome(e), "ttft_s": None, "message": message_shape(e.details())}


def summarize_ttft(results: list[dict]) -> dict:
    ok = [r["ttft_s"] for r in results if r["code"] == "OK" and r["ttft_s"] is not None]
    return {"requests": len(results), "ok": len(ok), "failures": dict(Counter(r["code"] for r in results
                                                                            if r["code"] != "OK")),
            "ttft_p50_s": percentile(ok, 0.5), "ttft_p99_s": percentile(ok, 0.99)}


def wait_for(fn, timeout_s: float, period_s: float = 0.5) -> tuple[bool, float]:
    """Polls fn() until true or timeout; (became true, seconds waited)."""
    t0 = time.perf_counter()
    while True:
        if fn():
            return True, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            return False, time.perf_counter() - t0
        time.sleep(period_s)


# ---- A: unread streams ---------------------------------------------------------------------
def unread_streams(target: str, metrics_port: int, args: argparse.Namespace) -> dict:
    normal = grpc.insecure_channel(target)
    stub = pb_grpc.InferenceServiceStub(normal)
    # Distinct prompts for alice, bob and B (each a unique question after the shared system prompt).
    bob_qs = questions(args.unread_streams + args.bob_requests)[args.unread_streams:]
    for q in bob_qs:  # their prompts in the prefix cache, as they will be in both timed passes
        ttft(stub, q, "bob", 1)
    alone = [ttft(stub, q, "bob", args.bob_tokens) for q in bob_qs]

    health = Periodic(HealthProbe(target), 0.1, "health-a").start()
    bob_during: list[dict] = []
    stop_bob = threading.Event()

    def bob_loop() -> None:
        i = 0
        while not stop_bob.is_set():
            bob_during.append(ttft(stub, bob_qs[i % len(bob_qs)], "bob", args.bob_tokens))
            i += 1

    bob = threading.Thread(target=bob_loop, name="bob", daemon=True)
    bob.start()
    slow = grpc.insecure_channel(target, options=SLOW_READER)
    alice = pb_grpc.InferenceServiceStub(slow)
    sp = dict(temperature=0, max_tokens=256, ignore_eos=True, logprobs=20)
    t_open = time.perf_counter()
    calls = [alice.GenerateStream(build_request(pb.GenerateStreamRequest, messages=chat(q), **sp),
                                  metadata=auth("alice"))
             for q in questions(args.unread_streams)]
    accepted, refused, first_bytes = [], Counter(), []
    for call in calls:  # the call objects stay referenced: dropping one would cancel it client-side
        try:
            first_bytes.append(next(call).ByteSize())
            accepted.append(call)
        except StopIteration:
            refused["ended without a message"] += 1
        except grpc.RpcError as e:
            refused[f"{outcome(e)}: {message_shape(e.details())}"] += 1
    t_read = time.perf_counter() - t_open

    def stalls() -> float:
        return scrape(metrics_port).get(STALLS, 0.0)

    all_cut, waited = wait_for(lambda: stalls() >= len(accepted), args.stall_timeout_s + args.stall_grace_s)
    stop_bob.set()
    bob.join(120)
    health_samples = [v for _, v in health.stop()]
    health.fn.close()
    after = scrape(metrics_port)
    try:
        resp = stub.Generate(build_request(pb.GenerateRequest, messages=chat("Is the service up again?"),
                                           temperature=0, max_tokens=16), metadata=auth("alice"), timeout=60)
        alice_again = {"code": "OK", "output_tokens": resp.usage.output_tokens}
    except grpc.RpcError as e:
        alice_again = {"code": outcome(e), "message": message_shape(e.details())}
    idle, idle_wait = wait_for(lambda: scrape(metrics_port).get(RUNNING, -1) == 0, 15)
    for call in accepted:
        call.cancel()
    slow.close()
    normal.close()
    return {
        "unread_streams": args.unread_streams, "stall_timeout_s": args.stall_timeout_s,
        "alice": {"accepted": len(accepted), "refused": dict(refused), "open_and_first_read_s": t_read,
                  "first_message_bytes_mean": sum(first_bytes) / len(first_bytes) if first_bytes else None},
        "health": summarize_health(health_samples),
        "bob_alone": summarize_ttft(alone), "bob_during": summarize_ttft(bob_during),
        "stalls_write": after.get(STALLS, 0.0), "all_accepted_cut": all_cut,
        "seconds_to_stall_count": t_read + waited,
        "running_after_stalls": after.get(RUNNING), "alice_again": alice_again,
        "running_back_to_zero": idle, "running_zero_wait_s": idle_wait,
    }


# ---- B: overload ---------------------------------------------------------------------------
class Calls:
    """Unary Generate calls sent as futures (no client thread per call); each outcome recorded on completion."""

    def __init__(self, target: str, deadline_s: float, new_tokens: int) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.deadline_s, self.new_tokens = deadline_s, new_tokens
        self.results: list[dict] = []
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def send(self, tenant: str, question: str) -> None:
        req = build_request(pb.GenerateRequest, messages=chat(question), temperature=0,
                            max_tokens=self.new_tokens, min_tokens=self.new_tokens)
        t0 = time.perf_counter()
        with self._lock:
            self._pending += 1
        fut = self.stub.Generate.future(req, metadata=auth(tenant), timeout=self.deadline_s)
        fut.add_done_callback(lambda f: self._done(f, tenant, t0))

    def _done(self, fut: grpc.Future, tenant: str, t0: float) -> None:
        r = {"tenant": tenant, "sent_at": t0, "latency_s": time.perf_counter() - t0, "output_tokens": 0}
        err = fut.exception()
        if err is None:
            r.update(code="OK", output_tokens=fut.result().usage.output_tokens)
        else:
            r.update(code=outcome(err), message=message_shape(err.details()))
        with self._lock:
            self.results.append(r)
            self._pending -= 1
            self._idle.notify_all()

    def wait(self, timeout_s: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        self.channel.close()


def capacity(target: str, n: int, new_tokens: int, qs: list[str]) -> dict:
    calls = Calls(target, 600, new_tokens)
    t0 = time.perf_counter()
    for i in range(n):
        calls.send(("alice", "bob")[i % 2], qs[i])
    calls.wait(600)
    wall = time.perf_counter() - t0
    calls.close()
    ok = [r for r in calls.results if r["code"] == "OK"]
    return {"requests": n, "ok": len(ok), "wall_s": wall, "req_s": len(ok) / wall,
            "tok_s": sum(r["output_tokens"] for r in ok) / wall,
            "failures": dict(Counter(r["code"] for r in calls.results if r["code"] != "OK"))}


def overload(server, args: argparse.Namespace) -> dict:
    qs = questions(B_FIRST_QUESTION + args.capacity_requests + 4000)[B_FIRST_QUESTION:]
    cap = capacity(server.address, args.capacity_requests, args.new_tokens, qs)
    rate = args.overload_factor * cap["req_s"]
    pid = server.proc.pid
    health = Periodic(HealthProbe(server.address), 0.5, "health-b").start()
    proc = Periodic(lambda: process_status(pid), 0.5, "proc").start()
    time.sleep(1.0)
    rss_before = rss_mib(pid)
    calls = Calls(server.address, args.deadline_s, args.new_tokens)
    rng = random.Random(7)
    t_start_wall = time.time()
    t0 = next_at = time.perf_counter()
    sent = 0
    while True:
        next_at += rng.expovariate(rate)
        if next_at - t0 >= args.overload_s:
            break
        time.sleep(max(0.0, next_at - time.perf_counter()))
        calls.send("alice" if rng.random() < 0.5 else "bob", qs[args.capacity_requests + sent % 4000])
        sent += 1
    sending_s = time.perf_counter() - t0
    drained = calls.wait(args.deadline_s + 30)
    wall_s = time.perf_counter() - t0  # first arrival to the last call's end
    t_end_wall = time.time()
    time.sleep(args.idle_s)
    status_after = process_status(pid)
    rss_after = status_after["rss_mib"]
    health_samples = health.stop()
    proc_samples = proc.stop()
    rss_samples = [(t, v["rss_mib"]) for t, v in proc_samples]
    calls.close()
    during = [v for t, v in rss_samples if t_start_wall <= t <= t_end_wall]
    for r in calls.results:
        r["sent_at"] -= t0
    return {"capacity": cap, "factor": args.overload_factor, "arrival_rate_req_s": rate, "sent": sent,
            "sending_s": sending_s, "wall_s": wall_s, "all_calls_ended": drained, "deadline_s": args.deadline_s,
            "new_tokens": args.new_tokens, "results": calls.results, "start_time": t_start_wall,
            "health": summarize_health([v for t, v in health_samples if t_start_wall <= t <= t_end_wall]),
            "rss_mib": {"before": rss_before, "peak_during": max(during, default=float("nan")),
                        "after_idle": rss_after, "idle_s": args.idle_s,
                        "every_10s": timeline([(t - t_start_wall, v) for t, v in rss_samples], max)},
            "server_status_after_idle": status_after,
            "rss_anon_mib_every_10s": timeline([(t - t_start_wall, v["rss_anon_mib"]) for t, v in proc_samples], max),
            "server_threads_every_10s": timeline([(t - t_start_wall, v["threads"]) for t, v in proc_samples], max)}


def timeline(points: list[tuple[float, float]], agg, bin_s: float = 10.0) -> dict[str, float]:
    """agg of the values of each bin_s bin of time offsets (negative offsets: before the run), by bin start."""
    bins: dict[int, list[float]] = {}
    for t, v in points:
        bins.setdefault(int(t // bin_s), []).append(v)
    return {f"{k * bin_s:g}s": agg(vs) for k, vs in sorted(bins.items())}


def ledger_vs_clients(target: str, start_time: float, results: list[dict]) -> dict:
    with LoraServeClient(target, api_key=KEYS["ops"], timeout=30) as ops:
        rows = ops.get_usage(tenant="*", group_by="tenant", start_time=start_time)
    out = {}
    for tenant in ("alice", "bob"):
        mine = [r for r in results if r["tenant"] == tenant]
        ok = [r for r in mine if r["code"] == "OK"]
        row = next((r for r in rows if r.tenant == tenant), None)
        led = {"requests": 0, "failed": 0, "cancelled": 0, "output_tokens": 0, "input_tokens": 0}
        if row is not None:
            led = {"requests": row.requests, "failed": row.failed_requests, "cancelled": row.cancelled_requests,
                   "output_tokens": row.output_tokens, "input_tokens": row.input_tokens}
        finished = led["requests"] - led["failed"] - led["cancelled"]
        out[tenant] = {"clients_ok": len(ok), "clients_ok_output_tokens": sum(r["output_tokens"] for r in ok),
                       "clients_by_code": dict(Counter(r["code"] for r in mine)), "ledger": led,
                       "ledger_finished": finished, "finished_minus_ok": finished - len(ok),
                       "ledger_tokens_minus_ok_tokens": led["output_tokens"] - sum(r["output_tokens"] for r in ok)}
    out["other_tenants"] = [{"tenant": r.tenant, "requests": r.requests} for r in rows
                            if r.tenant not in ("alice", "bob")]
    return out


def summarize_overload(b: dict) -> dict:
    results = b.pop("results")
    ok = [r["latency_s"] for r in results if r["code"] == "OK"]
    messages = Counter(f"{r['code']}: {r['message']}" for r in results if r["code"] != "OK")
    return {**b, "by_code": dict(Counter(r["code"] for r in results)),
            "by_tenant_code": {t: dict(Counter(r["code"] for r in results if r["tenant"] == t))
                               for t in ("alice", "bob")},
            "by_code_every_10s_sent": {code: timeline([(r["sent_at"], 1) for r in results if r["code"] == code], sum)
                                       for code in sorted({r["code"] for r in results})},
            "ok_latency_p50_s": percentile(ok, 0.5), "ok_latency_p99_s": percentile(ok, 0.99),
            "ok_req_s": len(ok) / b["wall_s"], "refusal_messages": dict(messages.most_common(8))}


# ---- run -----------------------------------------------------------------------------------
def server_log_events(server) -> dict:
    """Warnings and errors the server logged, counted by event."""
    return dict(Counter(e.get("event", "?") for e in server.events() if e.get("level") in ("warning", "error")))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="bench.abuse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unread-streams", type=int, default=300, help="A: streams alice opens and never reads")
    ap.add_argument("--stall-timeout-s", type=float, default=5.0, help="the server's --client-stall-timeout-s")
    ap.add_argument("--stall-grace-s", type=float, default=30.0, help="A: how long past it to wait for the stalls")
    ap.add_argument("--bob-requests", type=int, default=8, help="A: bob's distinct prompts (alone: one pass)")
    ap.add_argument("--bob-tokens", type=int, default=4,
                    help="A: bob's max_tokens (few: more TTFT samples while alice's streams are held)")
    ap.add_argument("--capacity-requests", type=int, default=64, help="B: the capacity burst")
    ap.add_argument("--overload-factor", type=float, default=3.0, help="B: arrival rate / measured capacity")
    ap.add_argument("--overload-s", type=float, default=60.0, help="B: how long arrivals come")
    ap.add_argument("--deadline-s", type=float, default=30.0, help="B: every call's deadline")
    ap.add_argument("--new-tokens", type=int, default=64, help="B: output tokens per request (fixed)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="B: idle time before the RSS 'after' sample")
    ap.add_argument("--threads", type=int, help="server torch threads (default: all cores)")
    ap.add_argument("--scenarios", default="A,B", help="which to run: A, B or A,B")
    ap.add_argument("--server-log", metavar="FILE", help="also write the server's JSON log lines here")
    args = ap.parse_args(argv)

    from service.runtime.loader import default_model_path
    from tests.api.serve_process import ServeProcess

    serve_args = ["--tenants", str(TENANTS_FILE), "--client-stall-timeout-s", str(args.stall_timeout_s),
                  "--metrics-port", "0"]
    if args.threads:
        serve_args += ["--threads", str(args.threads)]
    server = ServeProcess(*serve_args, ready_timeout=300)
    res: dict = {"workload": "abuse", "model": default_model_path().name, "tenants_file": "service/demo/tenants.yaml",
                 "server_args": serve_args, "transport": "gRPC, separate server process", **environment()}
    try:
        ready = next(e for e in server.events() if e.get("event") == "server_ready")
        metrics_port = ready["metrics_port"]  # --metrics-port 0: the port it took is in the ready line
        res["server_at_ready"] = process_status(server.proc.pid)
        chosen = {s.strip().upper() for s in args.scenarios.split(",")}
        if "A" in chosen:
            res["unread_streams"] = unread_streams(server.address, metrics_port, args)
            res["server_after_a"] = process_status(server.proc.pid)
        if "B" in chosen:
            b = overload(server, args)
            start, results = b["start_time"], b["results"]
            res["overload"] = summarize_overload(b)
            res["overload"]["ledger"] = ledger_vs_clients(server.address, start, results)
        res["metrics_at_end"] = {k: v for k, v in scrape(metrics_port).items()
                                 if k.startswith(("loraserve_client_stalls", "loraserve_num_requests",
                                                  "loraserve_request_finished_total"))}
        res["server_warnings"] = server_log_events(server)
    finally:
        server.stop()
        if args.server_log:
            Path(args.server_log).write_text("\n".join(server.lines) + "\n")
    path = write_result("abuse", res)
    print_report(res, path)
    return res


def print_report(res: dict, path: Path) -> None:
    rows: list[tuple[str, str]] = []
    if "unread_streams" in res:
        a = res["unread_streams"]
        h, alone, during = a["health"], a["bob_alone"], a["bob_during"]
        rows += [
            ("A alice streams", f"{a['unread_streams']} opened: {a['alice']['accepted']} accepted, refused "
                                f"{a['alice']['refused']} (first message ~{a['alice']['first_message_bytes_mean'] or 0:.0f} B)"),
            ("A health (100 ms)", f"{h['answered']}/{h['checks']} answered, p50/p99/max {h['latency_p50_ms']:.1f}/"
                                  f"{h['latency_p99_ms']:.1f}/{h['latency_max_ms']:.1f} ms, failures {h['failures']}"),
            ("A bob TTFT alone", f"p50/p99 {alone['ttft_p50_s']:.3f}/{alone['ttft_p99_s']:.3f} s ({alone['ok']} ok)"),
            ("A bob TTFT during", f"p50/p99 {during['ttft_p50_s']:.3f}/{during['ttft_p99_s']:.3f} s ({during['ok']} "
                                  f"ok, failures {during['failures']})"),
            ("A stalls (write)", f"{a['stalls_write']:.0f}, counted {a['seconds_to_stall_count']:.1f} s after the first open "
                                 f"(stall timeout {a['stall_timeout_s']:g} s; all accepted cut: {a['all_accepted_cut']})"),
            ("A afterwards", f"alice again: {a['alice_again']['code']}; running {a['running_after_stalls']} -> "
                             f"{'0' if a['running_back_to_zero'] else 'NOT 0'} after {a['running_zero_wait_s']:.1f} s"),
        ]
    if "overload" in res:
        b = res["overload"]
        cap, h, rss = b["capacity"], b["health"], b["rss_mib"]
        threads = b["server_threads_every_10s"]
        rows += [
            ("B capacity", f"{cap['req_s']:.2f} req/s, {cap['tok_s']:.0f} tok/s ({cap['ok']}/{cap['requests']} ok)"),
            ("B offered", f"{b['arrival_rate_req_s']:.2f} req/s x {b['sending_s']:.0f} s = {b['sent']} calls, "
                          f"deadline {b['deadline_s']:g} s"),
            ("B outcomes", str(b["by_code"])),
            ("B OK", f"{b['ok_req_s']:.2f} req/s over {b['wall_s']:.0f} s, latency p50/p99 {b['ok_latency_p50_s']:.1f}/"
                     f"{b['ok_latency_p99_s']:.1f} s"),
            ("B health (500 ms)", f"{h['answered']}/{h['checks']} answered, {h['serving']} SERVING, p50/p99/max "
                                  f"{h['latency_p50_ms']:.1f}/{h['latency_p99_ms']:.1f}/{h['latency_max_ms']:.1f} ms"),
            ("B server RSS", f"before {rss['before']:.0f} MiB, peak {rss['peak_during']:.0f} MiB, after "
                             f"{rss['idle_s']:g} s idle {rss['after_idle']:.0f} MiB (at ready "
                             f"{res['server_at_ready']['rss_mib']:.0f}); threads up to {max(threads.values()):.0f}"),
        ]
        for tenant in ("alice", "bob"):
            t = b["ledger"][tenant]
            led = t["ledger"]
            rows.append((f"B ledger {tenant}", f"ledger {led['requests']} requests ({led['failed']} failed, "
                         f"{led['cancelled']} cancelled), {led['output_tokens']} output tokens; clients "
                         f"{t['clients_ok']} OK, {t['clients_ok_output_tokens']} tokens; finished-OK "
                         f"{t['finished_minus_ok']}, tokens-OK tokens {t['ledger_tokens_minus_ok_tokens']}"))
    rows.append(("server warnings", str(res.get("server_warnings", {}))))
    print_table(f"abuse (written to {path})", rows)


if __name__ == "__main__":
    main()
