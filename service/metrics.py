"""Prometheus metrics of one server, on a side HTTP port.

Labels are bounded: finish reasons, and in `lora_requests_info` the adapter versions running and waiting
(at most `max_active_adapters` running). Nothing is labelled by tenant: per-tenant figures live in spans,
logs and the usage ledger, where an unbounded set of tenants costs nothing.

Beside our own `loraserve_*` names, the metrics the Kubernetes inference gateway's endpoint picker reads from a
model server are exported under the names and in the shape vLLM gives them (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc` and its older name `vllm:gpu_cache_usage_perc`,
`vllm:lora_requests_info`, `vllm:cache_config_info`), so the picker's defaults work unchanged. Its LoRA
affinity compares a request's `model` with the adapters listed in `vllm:lora_requests_info`, so there the
adapters are listed by the references requests named them with (`allcaps`, `alice/bot@2`), not by version id.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from service.engine.engine import LLMEngine
from service.engine.outputs import EngineStats, FinalOutput
from service.engine.speculative import MAX_DRAFT_TOKENS

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
P = "loraserve_"
V = "vllm:"  # the gateway-facing names (the inference gateway's model-server protocol, as vLLM exports it)
MAX_NAMED_VERSIONS = 4096  # adapter versions whose request names are remembered (least recently named go)
MAX_NAMES_PER_VERSION = 4  # references kept per version (e.g. `allcaps`, `local/allcaps`, `allcaps@1`)


class ServerMetrics:
    """Every metric of the server in its own registry (several servers in one test process never clash)."""

    def __init__(self, model_name: str, *, block_size: int = 0, num_blocks: int = 0) -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        m = ["model_name"]
        self.v_running = Gauge(V + "num_requests_running", "Requests in the running batch (gateway protocol: "
                               "TotalRunningRequests).", m, registry=r).labels(model_name)
        self.v_waiting = Gauge(V + "num_requests_waiting", "Requests waiting to be scheduled (gateway protocol: "
                               "TotalQueuedRequests).", m, registry=r).labels(model_name)
        self.v_kv_usage = Gauge(V + "kv_cache_usage_perc", "Fraction of paged KV blocks in use, 0 to 1 (gateway "
                                "protocol: KVCacheUtilization).", m, registry=r).labels(model_name)
        self.v_gpu_kv_usage = Gauge(V + "gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc, under the "
                                    "name older endpoint pickers read.", m, registry=r).labels(model_name)
        self.v_lora_info = Gauge(V + "lora_requests_info", "Adapters running and waiting, by the references "
                                 "requests named them with (the `model` of an HTTP request, the `adapter` of a "
                                 "gRPC one); max_lora: adapters one batch can hold. The value is the time of the "
                                 "update.", ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        Gauge(V + "cache_config_info", "The paged KV cache's shape (value 1): tokens per block and blocks.",
              ["block_size", "num_gpu_blocks"], registry=r).labels(str(block_size), str(num_blocks)).set(1)
        self._names: OrderedDict[str, list[str]] = OrderedDict()  # version id -> references, newest last
        self._v_lora_labels: tuple[str, str, str] | None = None
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "Fraction of paged KV blocks in use (0 to 1).",
                              registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first output token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to finish.", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Arrival to first scheduled.",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Output tokens of finished requests.", registry=r)
        self.finished = Counter(P + "request_finished", "Finished requests by finish reason.", ["finished_reason"],
                                registry=r)
        self.preemptions = Counter(P + "num_preemptions", "Requests preempted (their KV recomputed later).",
                                   registry=r)
        self.prefix_queries = Counter(P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter(P + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.lora_info = Gauge(P + "lora_requests_info", "Adapters (version ids) running and waiting; the value "
                               "is the time of the update.",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self.adapter_load = Histogram(P + "adapter_load_seconds", "Reading, validating and laying out one adapter "
                                      "version in host memory.", buckets=_LOAD_BUCKETS, registry=r)
        self.adapter_load_failures = Counter(P + "adapter_load_failures", "Adapter loads that failed.", registry=r)
        self.step_seconds = Histogram(P + "engine_step_seconds", "Wall time of one engine step.",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.spec_drafts = Counter(P + "spec_decode_draft_tokens", "Draft tokens verified (speculative decoding).",
                                   registry=r)
        self.spec_accepted = Counter(P + "spec_decode_accepted_tokens", "Draft tokens accepted (each a token that "
                                     "cost no step of its own).", registry=r)
        self.spec_accepted_len = Histogram(P + "spec_decode_acceptance_length", "Drafts accepted per verify pass.",
                                           buckets=tuple(float(b) for b in range(MAX_DRAFT_TOKENS + 1)), registry=r)
        self.client_stalls = Counter(P + "client_stalls", "Calls cancelled because their client stopped reading "
                                     "(write) or sending (read) for longer than the stall timeout.",
                                     ["direction"], registry=r)
        self._last: EngineStats | None = None
        self._lora_labels: tuple[str, str, str] | None = None
        self._lock = threading.Lock()
        self._http: Any = None
        self.port = 0

    # ---- hooks (engine loop thread) -----------------------------------------------------
    def on_step(self, engine: LLMEngine, seconds: float) -> None:
        self.step_seconds.observe(seconds)
        self.observe_stats(engine.stats)

    def observe_stats(self, s: EngineStats) -> None:
        with self._lock:
            last, self._last = self._last, s
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        self.v_running.set(s.num_running)
        self.v_waiting.set(s.num_waiting)
        self.v_kv_usage.set(s.kv_cache_usage)
        self.v_gpu_kv_usage.set(s.kv_cache_usage)
        if last is not None:
            self.preemptions.inc(max(0, s.preemptions - last.preemptions))
            self.prefix_queries.inc(max(0, s.prefix_cache_queried_tokens - last.prefix_cache_queried_tokens))
            self.prefix_hits.inc(max(0, s.prefix_cache_hit_tokens - last.prefix_cache_hit_tokens))
            self.spec_drafts.inc(max(0, s.spec_draft_tokens - last.spec_draft_tokens))
            self.spec_accepted.inc(max(0, s.spec_accepted_tokens - last.spec_accepted_tokens))
            before = last.spec_accepted_lengths or (0,) * len(s.spec_accepted_lengths)
            for length, (now, then) in enumerate(zip(s.spec_accepted_lengths, before)):
                for _ in range(now - then):
                    self.spec_accepted_len.observe(length)
        labels = (",".join(sorted(s.running_adapters)), ",".join(sorted(s.waiting_adapters)),
                  str(s.max_active_adapters))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)  # one series: the current state
            self._lora_labels = labels
        now = time.time()
        self.lora_info.labels(*labels).set(now)
        v_labels = (self._named(s.running_adapters), self._named(s.waiting_adapters), str(s.max_active_adapters))
        if v_labels != self._v_lora_labels:
            if self._v_lora_labels is not None:
                self.v_lora_info.remove(*self._v_lora_labels)
            self._v_lora_labels = v_labels
        self.v_lora_info.labels(*v_labels).set(now)

    def adapter_named(self, version_id: str, reference: str) -> None:
        """A request named adapter version `version_id` by `reference` (any thread)."""
        if not reference:
            return
        with self._lock:
            names = self._names.get(version_id)
            if names is None:
                names = self._names[version_id] = []
                while len(self._names) > MAX_NAMED_VERSIONS:
                    self._names.popitem(last=False)
            else:
                self._names.move_to_end(version_id)
            if reference in names:
                return
            names.append(reference)
            del names[:-MAX_NAMES_PER_VERSION]

    def _named(self, versions: frozenset[str]) -> str:
        """The references requests used for `versions`, comma-separated and sorted (a version never named,
        e.g. one a client gave by id only, is listed by its id)."""
        with self._lock:
            out = {name for v in versions for name in (self._names.get(v) or [v])}
        return ",".join(sorted(out))

    def on_finished(self, final: FinalOutput) -> None:
        reason = final.finish_reason.value
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(final.usage.input_tokens)
        self.generation_tokens.inc(final.usage.output_tokens)
        t = final.timings
        self.e2e.observe(t.total_s)
        if t.queue_s is not None:
            self.queue.observe(t.queue_s)
        if t.ttft_s is not None:
            self.ttft.observe(t.ttft_s)
        if t.tpot_s is not None:
            self.tpot.observe(t.tpot_s)

    def observe_client_stall(self, direction: str) -> None:
        self.client_stalls.labels(direction).inc()

    def observe_adapter_load(self, seconds: float, ok: bool) -> None:
        if ok:
            self.adapter_load.observe(seconds)
        else:
            self.adapter_load_failures.inc()

    # ---- HTTP ---------------------------------------------------------------------------
    def text(self) -> tuple[bytes, str]:
        """The exposition and its content type (the HTTP front's /metrics, where the gateway scrapes)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = any free port); returns the port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e} "
                          "(choose another --metrics-port, or 0 for any free one)") from None
        self._http = server
        self.port = server.server_address[1]
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
