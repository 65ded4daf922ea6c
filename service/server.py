"""The gRPC server: InferenceService, AdapterService and UsageService over one engine loop, with
tenants (API keys, mTLS), grpc.health.v1, reflection, Prometheus metrics, tracing and a graceful drain.

Health: NOT_SERVING until the model is loaded and a warm-up generation ran; SERVING then; NOT_SERVING
for good once draining starts, and while the engine loop reports itself unhealthy. `serve` first opens the
adapter store: while it cannot (credentials, bucket, endpoint) it logs why, answers health NOT_SERVING on the
port and retries every few seconds; then, with a PostgreSQL control plane (`database.url`), it connects to the
database and migrates its schema in the same way (NOT_SERVING and retried while it cannot be reached); then it
loads the model.
Shutdown (SIGTERM / SIGINT): health NOT_SERVING, new requests UNAVAILABLE, running requests get
`drain_grace_s` to finish, the rest are aborted, then the process exits 0.
"""

from __future__ import annotations

import gc
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import anyio
import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from adapters.cache import LoaderFromStore
from adapters.pg import PgDatabase
from adapters.registry_types import DatabaseUnavailable
from adapters.store import Store, StoreError
from adapters.stores import open_store
from kernels.threads import in_passing_thread, serial_thread
from service.accounting import Accounting, UsageWriter
from service.adapter_manager import AdapterManager
from service.api.adapter_service import AdapterServicer
from service.api.auth import Authenticator, AuthInterceptor
from service.api.convert import RequestConverter
from service.api.decoding import DecodeInterceptor
from service.api.errors import ErrorInterceptor
from service.api.gen.loraserve.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from service.api.generation import GenerationPath
from service.api.http_server import HttpServer
from service.api.inference import InferenceServicer
from service.api.openai_app import HttpFront, OpenAIApp, list_models
from service.api.stalls import CallSlots, StallWatchdog
from service.api.usage_service import UsageServicer
from service.builder import Runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig, ServerConfig, ServiceConfig
from service.control_plane import connect as connect_database
from service.control_plane import open_control_plane
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.limits import TenantLimiter
from service.loop import EngineLoop
from service.metrics import ServerMetrics
from service.tenants import TenantDirectory
from service.tracing import make_tracer_provider
from service.usage import Pricing

log = structlog.get_logger(__name__)
T = TypeVar("T")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADAPTER_SERVICE = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
USAGE_SERVICE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name
SERVICES = (INFERENCE_SERVICE, ADAPTER_SERVICE, USAGE_SERVICE)
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
HTTP_START_THREADS = 32  # HTTP calls being started at once (tokenizer, format compile); the rest wait their turn
SPARE_HTTP_CONNECTIONS = 64  # HTTP calls beyond every running and waiting request (health, metrics, models)
MAX_RPC_THREADS = 256  # past this, RPCs queue inside grpc; the engine's own waiting queue is the real bound
SPARE_RPC_THREADS = 8  # kept from generations and uploads: health checks and short calls never wait on them


class HealthServicer(health.HealthServicer):
    """grpc's health servicer, with List answered UNIMPLEMENTED: grpcio-health-checking's generated base has List
    but its servicer does not implement it, so every call (no key needed) was UNKNOWN "Method not implemented!"
    with a traceback in the log. Check and Watch are grpc's."""

    def List(self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "grpc.health.v1.Health/List is not implemented by this server: use Check or Watch")


def store_from(svc: ServiceConfig) -> Store:
    if svc.store_kind == "s3":
        settings = {"bucket": svc.s3_bucket, "prefix": svc.s3_prefix, "endpoint_url": svc.s3_endpoint_url,
                    "region": svc.s3_region}
        return open_store("s3", **{k: v for k, v in settings.items() if v is not None})
    return open_store("filesystem", path=svc.store_path or str(Path(svc.data_dir) / "adapters"))


def _bind_host(sc: ServerConfig) -> str:
    return f"[{sc.host}]" if ":" in sc.host else sc.host  # IPv6 literal


def _listen(server: grpc.Server, sc: ServerConfig, svc: ServiceConfig) -> int:
    """Add the configured port (TLS when the service config has a certificate) to `server`; the port bound."""
    bind = _bind_host(sc)
    creds = None
    if svc.tls_cert is not None:
        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise OSError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None

        ca = read(svc.tls_client_ca, "client CA") if svc.tls_client_ca else None
        creds = grpc.ssl_server_credentials([(read(svc.tls_key, "key"), read(svc.tls_cert, "certificate"))],
                                            root_certificates=ca, require_client_auth=ca is not None)
    try:
        if creds is None:
            port = server.add_insecure_port(f"{bind}:{sc.port}")
        else:
            port = server.add_secure_port(f"{bind}:{sc.port}", creds)
    except RuntimeError:  # grpc's way of saying the bind failed
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {bind}:{sc.port}: the address is in use or not available "
                      "(choose another --port, or --port 0 for any free one)")
    return port


class LoraServer:
    """One gRPC server over one runtime: inference, adapters, usage, health, reflection, metrics.
    `start()` returns once it is SERVING (or raises)."""

    def __init__(self, runtime: Runtime, config: ServerConfig | None = None, service: ServiceConfig | None = None,
                 *, tracer_provider: TracerProvider | None = None, startup_adapters: Sequence[tuple[str, str]] = (),
                 store: Store | None = None, tenants: TenantDirectory | None = None,
                 database: PgDatabase | None = None) -> None:
        self.config = config or ServerConfig()
        self.service_config = svc = service or ServiceConfig()
        self.runtime = runtime
        self.health = HealthServicer()
        self._ready = False
        self._draining = False
        self._health_lock = threading.Lock()
        loaded = runtime.loaded
        self.base_model = Path(loaded.source).name

        # Tenants, adapters, usage: everything a request is checked against, before the model serves.
        self.tenants = tenants or load_tenants(svc)
        if not self.tenants.auth_required:
            log.warning("auth_disabled", reason="no tenants file: every call is the admin tenant 'default'")
        runtime.engine.set_tenant_weights(self.tenants.weight)
        data = Path(svc.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.store = store or store_from(svc)
        pricing = Pricing(input_per_1k=svc.price_input_per_1k, cached_input_per_1k=svc.price_cached_input_per_1k,
                          output_per_1k=svc.price_output_per_1k, unit=svc.price_unit)
        self.control = open_control_plane(svc, self.store, pricing, db=database)
        self.registry = self.control.registry
        # A replica's requests hold adapter versions with a lease every replica's delete sees (PostgreSQL).
        holds = self.control.holds(runtime.adapters)
        self.metrics = ServerMetrics(self.base_model, block_size=runtime.engine.pool.block_size,
                                     num_blocks=runtime.engine.pool.num_blocks)
        store_loader = LoaderFromStore(self.store, loaded.arch, loaded.model_id,
                                       max_rank=runtime.adapter_config.max_lora_rank)

        def timed_loader(version_id: str):  # noqa: ANN202 - the ParsedAdapter of the store loader
            t0 = time.perf_counter()
            try:
                parsed = store_loader(version_id)
            except BaseException:
                self.metrics.observe_adapter_load(time.perf_counter() - t0, ok=False)
                raise
            self.metrics.observe_adapter_load(time.perf_counter() - t0, ok=True)
            return parsed

        runtime.adapter_loader = timed_loader
        self.adapters = AdapterManager(self.registry, self.store, runtime.adapters, loaded.arch,
                                       loaded.model_id, runtime.adapter_config.max_lora_rank)
        for name, path in startup_adapters:
            self.adapters.register_dir(name, path)
        self.ledger = self.control.ledger  # what GetUsage reads: with PostgreSQL, every replica's usage
        self.usage_writer = UsageWriter(self.control.outbox, on_written=self.control.usage_written)
        self.tracer_provider = tracer_provider or make_tracer_provider(otlp_endpoint=svc.otlp_endpoint)
        accounting = Accounting(self.usage_writer, self.metrics, holds)
        self.loop = EngineLoop(runtime.engine, on_health=self._on_loop_health, on_finished=accounting.on_finished,
                               on_step=self.metrics.on_step)
        converter = RequestConverter(runtime.tokenizer, runtime.runner.max_model_len, runtime.runner.vocab_size,
                                     self.adapters, max_prompt_bytes=self.config.max_prompt_bytes,
                                     structured=runtime.structured)
        ec = runtime.engine.config
        workers = self.config.grpc_workers or min(ec.max_num_seqs + ec.max_waiting, MAX_RPC_THREADS) + SPARE_RPC_THREADS
        # Generations and uploads together never take the last threads: health and short calls keep those.
        self.call_slots = CallSlots(workers - min(SPARE_RPC_THREADS, workers // 2))
        self.watchdog = StallWatchdog(self.config.client_stall_timeout_s, self.metrics.observe_client_stall)
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently share its connections.
        # The receive bound is set here rather than left to grpc's default (also 4 MiB), so it is ours to
        # document and configure: a larger message is refused with RESOURCE_EXHAUSTED before it is parsed.
        # Interceptors, outermost first: errors -> status codes, then authentication, then undecodable requests
        # refused (so a caller without credentials hears UNAUTHENTICATED, never what the parser said).
        self.errors = ErrorInterceptor()
        self.authenticator = Authenticator(self.tenants)
        interceptors = [self.errors, AuthInterceptor(self.authenticator), DecodeInterceptor()]
        self.server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc",
                                                     initializer=serial_thread),
                                  interceptors=interceptors,
                                  options=[("grpc.so_reuseport", 0),
                                           ("grpc.max_receive_message_length", self.config.max_message_mib * 2**20)])
        # One request path behind both fronts: validation, limits, tracing and usage are written once.
        self.generations = GenerationPath(
            self.loop, converter, base_model=self.base_model, limiter=TenantLimiter(),
            tracer=self.tracer_provider.get_tracer("loraserve"), adapters=holds, watchdog=self.watchdog,
            call_slots=self.call_slots, on_adapter_named=self.metrics.adapter_named,
            stream_interval=self.config.stream_interval)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.generations), self.server)
        self.http = self._http_front(ec) if self.config.http_port is not None else None
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterServicer(self.adapters, svc.max_upload_mib * 2**20, watchdog=self.watchdog,
                            call_slots=self.call_slots), self.server)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(self.ledger, self._adapter_owner, runtime.engine.scheduler.fair), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(_NOT_SERVING)
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._started_at = time.time()
        self._stopped = threading.Event()

    def _http_front(self, ec: EngineConfig) -> HttpServer:
        front = HttpFront(
            path=self.generations, auth=self.authenticator, base_model=self.base_model,
            list_models=lambda tenant: list_models(self.registry, tenant, self.base_model, self._started_at),
            serving=self.serving, draining=lambda: self._draining, metrics_text=self.metrics.text, logs=self.errors.logs,
            start_limiter=anyio.CapacityLimiter(HTTP_START_THREADS))
        svc = self.service_config
        tls = None
        if svc.tls_cert is not None:
            tls = {"ssl_certfile": svc.tls_cert, "ssl_keyfile": svc.tls_key}
            if svc.tls_client_ca:
                tls.update(ssl_ca_certs=svc.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return HttpServer(OpenAIApp(front).app, self.config.host, self.config.http_port or 0,
                          max_body_bytes=self.config.max_message_mib * 2**20,
                          max_connections=ec.max_num_seqs + ec.max_waiting + SPARE_HTTP_CONNECTIONS, tls=tls)

    def serving(self) -> bool:
        """Loaded, warmed up, not draining, and the engine loop healthy (gRPC health SERVING; HTTP /health 200)."""
        return self._ready and not self._draining and self.loop.healthy

    def _adapter_owner(self, tenant: str, name: str, admin: bool) -> str | None:
        try:
            return self.registry.resolve(tenant, name, admin=admin).owner
        except (LookupError, ValueError):
            return None

    @property
    def address(self) -> str:
        return f"{_bind_host(self.config)}:{self.port}"

    def start(self) -> LoraServer:
        svc = self.service_config
        self.port = _listen(self.server, self.config, svc)
        if svc.metrics_port is not None:
            self.metrics_port = self.metrics.serve(svc.metrics_host or self.config.host, svc.metrics_port)
        self.loop.start()
        self.control.start()
        self.watchdog.start()
        self.server.start()  # listening, but NOT_SERVING until the warm-up below
        if self.http is not None:
            self.http_port = self.http.start().port
        if self.config.warmup:
            self._warm_up()
        with self._health_lock:
            self._ready = True
        self._on_loop_health(self.loop.healthy)
        log.info("server_ready", address=self.address, services=list(SERVICES), tls=svc.tls_cert is not None,
                 mtls=svc.tls_client_ca is not None, auth=self.tenants.auth_required,
                 metrics_port=self.metrics_port or None, http_port=self.http_port or None)
        return self

    def _warm_up(self) -> None:
        """One short greedy generation: the first steps pay one-off costs (allocations, kernel choice)."""
        t0 = time.perf_counter()
        ids = self.runtime.tokenizer.encode("Hello") or [0]
        handle = self.loop.submit(RequestSpec("warmup", tuple(ids), SamplingParams(max_tokens=2, temperature=0)))
        for out in handle:
            if out.final is not None and out.final.error is not None:
                raise RuntimeError(f"the warm-up generation failed: {out.final.error.message}")
        self.loop.call(lambda engine: engine.scheduler.fair.forget_idle())  # the warm-up was nobody's service
        log.info("warmup_done", ms=round((time.perf_counter() - t0) * 1000, 1))

    # ---- health -------------------------------------------------------------------------
    def _set_health(self, status: int) -> None:
        for name in ("", *SERVICES):
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
        # Requests are done; give both fronts a moment to send their last messages, then close.
        if self.http is not None:
            self.http.stop(timeout=2.0)
        self.server.stop(grace=2.0).wait()
        self.loop.stop()
        self.close()
        self._stopped.set()
        log.info("server_stopped")

    def close(self) -> None:
        """Flush usage, close the databases, the metrics endpoint and the tracer (after the loop stopped)."""
        self.watchdog.stop()
        self.usage_writer.close()
        self.control.close()
        self.metrics.close()
        self.tracer_provider.shutdown()
        self.errors.logs.close()  # the summary of refusals not logged, if any

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def load_tenants(svc: ServiceConfig) -> TenantDirectory:
    return TenantDirectory.load(svc.tenants_file) if svc.tenants_file else TenantDirectory.open_access()


def _check_startup_files(svc: ServiceConfig, adapters: Sequence[tuple[str, str]]) -> TenantDirectory:
    """Check what start-up reads before the slow model load; returns the tenants (read once)."""
    for name, path in adapters:
        if not Path(path).is_dir():
            raise NotADirectoryError(f"--adapter {name}={path}: {path} is not a directory "
                                     "(expected adapter_config.json + adapter_model.safetensors)")
    return load_tenants(svc)


def build_server(rc: RuntimeConfig, ec: EngineConfig, ac: AdapterConfig, sc: ServerConfig,
                 svc: ServiceConfig | None = None, adapters: Sequence[tuple[str, str]] = (), *,
                 store: Store | None = None, tenants: TenantDirectory | None = None,
                 database: PgDatabase | None = None) -> LoraServer:
    """Load the model, open the data directory, register `--adapter NAME=DIR`s; the server is not started."""
    from service.builder import build_runtime

    svc = svc or ServiceConfig()
    tenants = tenants or _check_startup_files(svc, adapters)
    store = store or store_from(svc)  # an unreachable store fails before the model load too
    database = database or connect_database(svc)  # and so does an unreachable database
    rt = build_runtime(rc, ec, ac)
    return LoraServer(rt, sc, svc, startup_adapters=adapters, store=store, tenants=tenants, database=database)


STORE_RETRY_S = 3.0
STORE_RELOG_S = 60.0  # an unchanged store problem is logged again this often


class _StoreWait(grpc.GenericRpcHandler):
    """Listens on the server's port while the adapter store or the database cannot be used: health NOT_SERVING
    for every service, every other call UNAVAILABLE naming the problem, so probes and clients learn why."""

    def __init__(self, sc: ServerConfig, svc: ServiceConfig, problem: str, retry_s: float,
                 what: str = "the adapter store") -> None:
        self.problem, self.retry_s, self.what = problem, retry_s, what
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-wait"),
                                  options=[("grpc.so_reuseport", 0)])
        status = HealthServicer()
        for name in ("", *SERVICES):
            status.set(name, _NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(status, self.server)
        self.server.add_generic_rpc_handlers((self,))  # after health: it answers everything else
        self.port = _listen(self.server, sc, svc)
        self.address = f"{_bind_host(sc)}:{self.port}"
        self.server.start()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(self._refuse)  # any call shape; no message is read

    def _refuse(self, requests: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"the server is starting: {self.what} cannot be used "
                                                   f"({self.problem}); retrying every {self.retry_s:g}s")


def _open_waiting(open_it: Callable[[], T], failure: type[Exception], what: str, event: str, sc: ServerConfig,
                  svc: ServiceConfig, stop: threading.Event, retry_s: float) -> tuple[T, ServerConfig] | None:
    """open_it(); while it raises `failure`, log `event` (error), listen with health NOT_SERVING and retry every
    `retry_s`; then free the port for the real server (the returned config names the port bound, also with
    --port 0). None if `stop` is set first. Any other error (a config wrong as written) fails at once."""
    try:
        return open_it(), sc
    except failure as e:
        problem = str(e)
    waiting = _StoreWait(sc, svc, problem, retry_s, what)
    log.error(event, error=problem, address=waiting.address, retry_s=retry_s)
    logged = time.monotonic()
    try:
        while not stop.wait(retry_s):
            try:
                opened = open_it()
            except failure as e:
                if str(e) != waiting.problem or time.monotonic() - logged > STORE_RELOG_S:
                    log.error(event, error=str(e), address=waiting.address, retry_s=retry_s)
                    logged = time.monotonic()
                waiting.problem = str(e)
                continue
            log.info(event.replace("_unavailable", "_available"), **{event.split("_")[0]: repr(opened)})
            return opened, replace(sc, port=waiting.port)
        return None
    finally:
        waiting.server.stop(grace=None).wait()


def open_store_waiting(sc: ServerConfig, svc: ServiceConfig, stop: threading.Event,
                       retry_s: float = STORE_RETRY_S) -> tuple[Store, ServerConfig] | None:
    """Open the adapter store. While it cannot be used (credentials, bucket, endpoint: StoreError), log why,
    listen with health NOT_SERVING and retry every `retry_s`; then free the port for the real server. None if
    `stop` is set first. A store config that is invalid as written (ValueError) fails at once."""
    return _open_waiting(lambda: store_from(svc), StoreError, "the adapter store", "store_unavailable", sc, svc,
                         stop, retry_s)


def open_database_waiting(sc: ServerConfig, svc: ServiceConfig, stop: threading.Event,
                          retry_s: float = STORE_RETRY_S) -> tuple[PgDatabase | None, ServerConfig] | None:
    """Connect to the control-plane database (PostgreSQL; None for SQLite) and migrate its schema, waiting as
    `open_store_waiting` does while it cannot be reached (`database_unavailable`). A database migrated by a newer
    server (SchemaTooNew, a ValueError) fails at once."""
    return _open_waiting(lambda: connect_database(svc), DatabaseUnavailable, "the control-plane database",
                         "database_unavailable", sc, svc, stop, retry_s)


def serve(rc: RuntimeConfig, ec: EngineConfig, ac: AdapterConfig, sc: ServerConfig, svc: ServiceConfig | None = None,
          adapters: Sequence[tuple[str, str]] = ()) -> int:
    """Run until SIGTERM / SIGINT, then drain and return 0."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    # Installed before the model loads, so a SIGTERM during a slow start still exits cleanly.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        svc = svc or ServiceConfig()
        tenants = _check_startup_files(svc, adapters)
        opened = open_store_waiting(sc, svc, stop)
        if opened is None:
            return 0
        store, sc = opened
        connected = open_database_waiting(sc, svc, stop)
        if connected is None:
            return 0
        database, sc = connected
        try:
            # Loaded on a thread that ends here: the engine's loop thread is then the one thread with OpenMP workers
            # (see kernels.threads.in_passing_thread: on a 2-CPU machine every step ran 1.3-1.5x slower otherwise).
            server = in_passing_thread(
                lambda: build_server(rc, ec, ac, sc, svc, adapters, store=store, tenants=tenants, database=database))
        except BaseException:
            if database is not None:
                database.close()
            raise
        if stop.is_set():
            return 0
        # What the start built (modules, the tokenizer's tables, the weights' objects: ~230,000 objects with the
        # default model) leaves the collector's generations: a full collection walks every tracked object, ~120 ms
        # on the default model during which the engine loop stands still; frozen, it walks only what came after.
        gc.collect()
        gc.freeze()
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
