"""The gRPC server: InferenceService over the engine loop, grpc.health.v1, reflection, graceful drain.

Health: NOT_SERVING until the model is loaded and a warm-up generation ran; SERVING then; NOT_SERVING
for good once draining starts, and while the engine loop reports itself unhealthy.
Shutdown (SIGTERM / SIGINT): health NOT_SERVING, new requests UNAVAILABLE, running requests get
`drain_grace_s` to finish, the rest are aborted, then the process exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.adapter_refs import AdapterResolver, LocalAdapters
from service.api.convert import RequestConverter
from service.api.errors import ErrorInterceptor
from service.api.gen.loraserve.v1 import inference_pb2, inference_pb2_grpc
from service.api.inference import InferenceServicer
from service.config import AdapterConfig, EngineConfig, RuntimeConfig, ServerConfig
from service.engine.sampling import SamplingParams
from service.loop import EngineLoop
from service.runtime.builder import Runtime

log = structlog.get_logger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MAX_RPC_THREADS = 256  # past this, RPCs queue inside grpc; the engine's own waiting queue is the real bound
SPARE_RPC_THREADS = 8  # health checks, tokenize and refusals never wait behind generations


class LoraServer:
    """One gRPC server over one runtime. `start()` returns once it is SERVING (or raises)."""

    def __init__(self, runtime: Runtime, resolver: AdapterResolver | None = None,
                 config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.runtime = runtime
        self.health = health.HealthServicer()
        self._ready = False
        self._draining = False
        self._health_lock = threading.Lock()
        self.loop = EngineLoop(runtime.engine, on_health=self._on_loop_health)
        converter = RequestConverter(runtime.tokenizer, runtime.runner.max_model_len, runtime.runner.vocab_size,
                                     resolver or LocalAdapters())
        ec = runtime.engine.config
        workers = self.config.grpc_workers or min(ec.max_num_seqs + ec.max_waiting, MAX_RPC_THREADS) + SPARE_RPC_THREADS
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently share its connections.
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                                  interceptors=[ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.loop, converter), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(_NOT_SERVING)
        self.port = 0
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host  # IPv6 literal
        return f"{host}:{self.port}"

    def start(self) -> LoraServer:
        bind = self.address.rpartition(":")[0]
        try:
            self.port = self.server.add_insecure_port(f"{bind}:{self.config.port}")
        except RuntimeError:  # grpc's way of saying the bind failed
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {bind}:{self.config.port}: the address is in use or not available "
                          "(choose another --port, or --port 0 for any free one)")
        self.loop.start()
        self.server.start()  # listening, but NOT_SERVING until the warm-up below
        if self.config.warmup:
            self._warm_up()
        with self._health_lock:
            self._ready = True
        self._on_loop_health(self.loop.healthy)
        log.info("server_ready", address=self.address, services=[INFERENCE_SERVICE])
        return self

    def _warm_up(self) -> None:
        """One short greedy generation: the first steps pay one-off costs (allocations, kernel choice)."""
        t0 = time.perf_counter()
        ids = self.runtime.tokenizer.encode("Hello") or [0]
        handle = self.loop.submit("warmup", ids, SamplingParams(max_tokens=2, temperature=0))
        for out in handle:
            if out.finished and out.error:
                raise RuntimeError(f"the warm-up generation failed: {out.error}")
        log.info("warmup_done", ms=round((time.perf_counter() - t0) * 1000, 1))

    # ---- health -------------------------------------------------------------------------
    def _set_health(self, status: int) -> None:
        for name in ("", INFERENCE_SERVICE):
            self.health.set(name, status)

    def _on_loop_health(self, healthy: bool) -> None:
        with self._health_lock:
            if not self._ready or self._draining:
                return
            self._set_health(_SERVING if healthy else _NOT_SERVING)
        if not healthy:
            log.error("engine_loop_unhealthy")

    # ---- shutdown -----------------------------------------------------------------------
    def shutdown(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new requests, let running ones finish within the grace, stop."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        with self._health_lock:
            if self._draining:
                return
            self._draining = True
            self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
        log.info("server_draining", grace_s=grace)
        self.loop.drain(grace)
        # Requests are done; give RPC threads a moment to send their last messages, then close.
        self.server.stop(grace=2.0).wait()
        self.loop.stop()
        self._stopped.set()
        log.info("server_stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def build_server(rc: RuntimeConfig, ec: EngineConfig, ac: AdapterConfig, sc: ServerConfig,
                 adapters: Sequence[tuple[str, str]] = ()) -> LoraServer:
    """Load the model, register `--adapter NAME=DIR`s, and build the (not yet started) server."""
    from service.runtime.builder import build_runtime

    rt = build_runtime(rc, ec, ac)
    local = LocalAdapters()
    for name, path in adapters:
        if not Path(path).is_dir():
            raise NotADirectoryError(f"--adapter {name}={path}: {path} is not a directory "
                                     "(expected adapter_config.json + adapter_model.safetensors)")
        vid = rt.add_local_adapter(path)
        local.add(name, vid)
        log.info("adapter_registered", name=name, version_id=vid, path=str(path))
    return LoraServer(rt, local, sc)


def serve(rc: RuntimeConfig, ec: EngineConfig, ac: AdapterConfig, sc: ServerConfig,
          adapters: Sequence[tuple[str, str]] = ()) -> int:
    """Run until SIGTERM / SIGINT, then drain and return 0."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    # Installed before the model loads, so a SIGTERM during a slow start still exits cleanly.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = build_server(rc, ec, ac, sc, adapters)
        if stop.is_set():
            return 0
        server.start()
        while not stop.wait(1.0):
            if not server.loop.alive:
                log.error("engine_loop_died")
                server.shutdown(0)
                return 1
        server.shutdown()
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
