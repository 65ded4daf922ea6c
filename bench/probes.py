"""What a client (or an operator) can watch of a running server from outside: health checks, the server
process's resident memory, its Prometheus metrics, and the status a call ended with."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from bench.online import percentile


class Periodic:
    """Calls `fn()` every `period_s` on its own thread until `stop()`; keeps what it returns, with the time.
    A call slower than the period delays the next one (no catch-up burst)."""

    def __init__(self, fn: Callable[[], Any], period_s: float, name: str) -> None:
        self.fn, self.period_s = fn, period_s
        self.samples: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def _run(self) -> None:
        next_at = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.time(), self.fn()))
            next_at = max(next_at + self.period_s, time.perf_counter())
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def stop(self) -> list[tuple[float, Any]]:
        self._stop.set()
        self._thread.join(30)
        return self.samples

    def between(self, t0: float, t1: float) -> list[Any]:
        return [v for t, v in list(self.samples) if t0 <= t <= t1]


class HealthProbe:
    """grpc.health.v1 Check of the whole server over its own channel (as a load balancer would)."""

    def __init__(self, target: str, timeout_s: float = 5.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s

    def __call__(self) -> dict:
        t0 = time.perf_counter()
        try:
            resp = self.stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
            code, status = "OK", health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as e:
            code, status = e.code().name, None
        return {"latency_s": time.perf_counter() - t0, "code": code, "status": status}

    def close(self) -> None:
        self.channel.close()


def summarize_health(samples: list[dict]) -> dict:
    answered = [s["latency_s"] for s in samples if s["code"] == "OK"]
    return {"checks": len(samples), "answered": len(answered),
            "serving": sum(1 for s in samples if s["status"] == "SERVING"),
            "failures": dict(Counter(s["code"] for s in samples if s["code"] != "OK")),
            "latency_p50_ms": percentile(answered, 0.5) * 1000, "latency_p99_ms": percentile(answered, 0.99) * 1000,
            "latency_max_ms": max(answered, default=float("nan")) * 1000}


def process_status(pid: int) -> dict[str, float]:
    """A process's resident memory (VmRSS, and its anonymous and file-backed parts, MiB) and thread count;
    nan once it is gone."""
    fields = {"VmRSS:": "rss_mib", "RssAnon:": "rss_anon_mib", "RssFile:": "rss_file_mib"}
    out = {name: float("nan") for name in (*fields.values(), "threads")}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, *rest = line.split()
                if key in fields:
                    out[fields[key]] = int(rest[0]) / 1024
                elif key == "Threads:":
                    out["threads"] = int(rest[0])
    except OSError:
        pass
    return out


def rss_mib(pid: int) -> float:
    return process_status(pid)["rss_mib"]


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """The server's metrics as {'name{labels}': value} (comments and help lines left out)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def outcome(err: grpc.RpcError) -> str:
    """A failed call's status code name; RESOURCE_EXHAUSTED split by whether it carries a RetryInfo."""
    code = err.code()
    if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return code.name
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # status details that contradict the code: count as without
        status = None
    retry = status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    return "RESOURCE_EXHAUSTED+RetryInfo" if retry else "RESOURCE_EXHAUSTED"


_IDS = re.compile(r"request id [0-9A-Za-z_-]+|[0-9a-f]{16,}")


def message_shape(details: str | None) -> str:
    """A status message with its request ids blanked, so equal refusals count together."""
    return _IDS.sub("…", details or "")[:200]
