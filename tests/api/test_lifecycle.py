"""Cancellation, deadlines, overload, health and drain over a real socket (tiny model). A request that must
stay in flight is kept there by holding the engine loop between steps, never by slowing steps down."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.loop import UNHEALTHY_AFTER_FAILURES, wait_until
from tests.api.conftest import rpc_error

LONG = pb.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def long_stream(server, text: str = "t5 t6 t7", **kw):
    return server.stub.GenerateStream(pb.GenerateStreamRequest(text=text, sampling=LONG, **kw))


def health(server, service: str = "") -> str:
    stub = health_pb2_grpc.HealthStub(server.channel)
    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def engine_busy(server) -> bool:
    return server.engine_call(lambda e: e.has_unfinished())


def test_cancel_mid_stream_frees_every_block(make_server):
    server = make_server()
    call = long_stream(server)
    got = [next(call)]
    server.hold()  # the request stays in flight, its blocks held, while the client cancels
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in got)
    assert server.blocks_in_use() > 0
    call.cancel()
    assert wait_until(lambda: not engine_busy(server), 5)  # aborted while held: no step needed
    server.wait_idle_and_intact()
    assert call.code() == grpc.StatusCode.CANCELLED
    server.resume()


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_deadline_exceeded_aborts_the_sequence(make_server, rpc):
    server = make_server()
    server.hold()  # nothing runs: the request waits in the queue past its deadline
    cls = pb.GenerateRequest if rpc == "Generate" else pb.GenerateStreamRequest
    t0 = time.monotonic()
    err = rpc_error(getattr(server.stub, rpc), cls(text="t5 t6", sampling=LONG), timeout=0.4)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    assert wait_until(lambda: not engine_busy(server), 5)  # aborted by the RPC's end, still held
    server.resume()
    server.wait_idle_and_intact()


def test_the_engine_stops_a_request_whose_deadline_passed(make_server):
    """The deadline travels with the request: the engine ends it even if nobody aborts it (CANCELLED, with
    a deadline error, billed for what it did)."""
    from service.engine.outputs import ErrorKind
    from service.engine.request import RequestSpec
    from service.engine.sampling import SamplingParams

    server = make_server()
    loop = server.server.loop
    spec = RequestSpec("direct", (5, 6), SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
                       deadline=time.monotonic())  # passed by the time the engine looks at it
    final = [o for o in loop.submit(spec)][-1].final
    assert final.finish_reason.value == "cancelled" and final.error.kind is ErrorKind.DEADLINE_EXCEEDED
    assert final.usage.output_tokens == 0
    server.wait_idle_and_intact()


def test_overload_is_refused_quickly_with_a_retry_hint_while_health_stays_serving(make_server):
    server = make_server(max_num_seqs=1, max_waiting=1)
    running = long_stream(server)
    next(running)  # the first request runs (started alone: two at once could both sit in the queue) ...
    server.hold()
    waiting = long_stream(server, "t8 t9")
    assert wait_until(lambda: server.engine_call(lambda e: e.stats.num_waiting) == 1, 5)  # ... the second waits
    t0 = time.monotonic()
    err = rpc_error(server.stub.Generate, pb.GenerateRequest(text="t5", sampling=LONG), timeout=10)
    assert time.monotonic() - t0 < 1
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waiting queue is full" in err.details() and "retry after" in err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() > 0
    assert health(server) == "SERVING"
    running.cancel()
    waiting.cancel()
    assert wait_until(lambda: not engine_busy(server), 5)
    server.resume()
    server.wait_idle_and_intact()


def test_health_follows_the_engine_loop(make_server):
    server = make_server()
    assert health(server) == health(server, "loraserve.v1.InferenceService") == "SERVING"
    assert rpc_error(health, server, "no.such.Service").code() == grpc.StatusCode.NOT_FOUND
    engine = server.runtime.engine
    step = engine.step

    def broken():
        raise RuntimeError("simulated engine fault")

    engine.step = broken  # every step fails from now on: after a few failed steps in a row, unhealthy
    for _ in range(UNHEALTHY_AFTER_FAILURES):
        err = rpc_error(server.stub.Generate, pb.GenerateRequest(text="t5"), timeout=10)
        assert err.code() == grpc.StatusCode.INTERNAL and "engine step failed" in err.details()
    assert wait_until(lambda: health(server) == "NOT_SERVING", 5)
    engine.step = step  # fixed: the next request's steps succeed, and health follows
    assert server.stub.Generate(pb.GenerateRequest(text="t5", sampling=pb.SamplingParams(max_tokens=2))).text
    assert wait_until(lambda: health(server) == "SERVING", 5)


def test_health_list_is_unimplemented_not_unknown(make_server, caplog):
    # grpc's servicer lacks List: UNKNOWN "Method not implemented!" and a traceback per call, for anyone.
    server = make_server()
    err = rpc_error(health_pb2_grpc.HealthStub(server.channel).List, health_pb2.HealthListRequest(), timeout=5)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and "use Check or Watch" in err.details()
    assert "Traceback" not in caplog.text


def test_health_is_not_serving_before_start(tiny, tmp_path):
    from service.builder import build_runtime
    from service.config import EngineConfig, RuntimeConfig, ServerConfig, ServiceConfig
    from service.server import LoraServer

    rt = build_runtime(RuntimeConfig(model=str(tiny[0]), dtype="float32", kv_cache_gib=0.004, threads=1),
                       EngineConfig())
    server = LoraServer(rt, ServerConfig(port=0), ServiceConfig(data_dir=str(tmp_path)))
    resp = server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_drain_finishes_running_requests_and_refuses_new_ones(make_server):
    server = make_server(drain_grace_s=30)
    req = pb.GenerateStreamRequest(text="t5 t6", sampling=pb.SamplingParams(temperature=0, max_tokens=60,
                                                                           ignore_eos=True))
    call = server.stub.GenerateStream(req)
    first = next(call)
    server.hold()  # still running when the drain starts
    stopper = threading.Thread(target=server.server.shutdown)
    stopper.start()
    assert wait_until(lambda: health(server) == "NOT_SERVING", 5)
    err = rpc_error(server.stub.Generate, pb.GenerateRequest(text="t5"), timeout=5)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
    server.resume()
    rest = list(call)  # the running request completes normally
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 60
    stopper.join(10)
    assert not stopper.is_alive() and server.server.wait(0)


def test_drain_past_the_grace_period_ends_running_requests_unavailable(make_server):
    server = make_server()
    call = long_stream(server)
    next(call)
    server.hold()  # it cannot finish within the grace
    t0 = time.monotonic()
    server.server.shutdown(grace_s=0.2)
    assert time.monotonic() - t0 < 5
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shut down before the request finished" in info.value.details()


def test_the_last_message_waits_for_the_usage_row(make_server):
    """A response goes out only once its usage row is committed: a client that received it is billed, even if
    the process dies right after (the kill -9 test in test_service_process runs that end to end)."""
    server = make_server()
    ledger = server.server.ledger
    real = ledger.record_many
    entered, gate = threading.Event(), threading.Event()

    def slow_commit(records):
        entered.set()
        gate.wait(10)
        return real(records)

    ledger.record_many = slow_commit
    got: list = []
    for rpc, cls in (("Generate", pb.GenerateRequest), ("GenerateStream", pb.GenerateStreamRequest)):
        entered.clear()
        gate.clear()
        got.clear()

        def call(rpc=rpc, cls=cls):
            result = getattr(server.stub, rpc)(cls(text="t5 t6", sampling=pb.SamplingParams(
                max_tokens=3, temperature=0, ignore_eos=True)))
            got.append(result if rpc == "Generate" else list(result)[-1])

        t = threading.Thread(target=call)
        t.start()
        assert entered.wait(10)  # the engine finished the request; its row is being committed ...
        assert not wait_until(lambda: bool(got), 0.5)  # ... and the answer waits for it (it would take ms)
        gate.set()
        t.join(10)
        assert got and ledger.get(got[0].request_id).output_tokens == 3


def test_serve_builds_the_model_on_a_thread_that_ends_before_the_engine_starts(tmp_path, monkeypatch):
    """`serve` loads and prepares the model on a passing thread (kernels.threads.in_passing_thread), not on the main
    thread that lives on: the engine's loop thread is then the one thread with OpenMP workers. A build that fails
    there fails `serve` on the main thread with its own error."""
    from service import server as server_mod
    from service.config import AdapterConfig, EngineConfig, RuntimeConfig, ServerConfig, ServiceConfig

    seen: list[threading.Thread] = []

    def build(*args, **kwargs):
        seen.append(threading.current_thread())
        raise RuntimeError("the model file is unreadable")

    monkeypatch.setattr(server_mod, "build_server", build)
    with pytest.raises(RuntimeError, match="the model file is unreadable"):
        server_mod.serve(RuntimeConfig(), EngineConfig(), AdapterConfig(), ServerConfig(port=0),
                         ServiceConfig(data_dir=str(tmp_path)))
    assert len(seen) == 1 and seen[0] is not threading.main_thread() and not seen[0].is_alive()


def test_serve_freezes_what_the_start_built_before_serving(tmp_path, monkeypatch):
    """Before the server starts, `serve` moves every object the start built out of the collector's generations
    (`gc.freeze`): full collections then walk only what came after, not the ~230,000 startup objects (~120 ms of a
    stalled engine loop each time with the default model). The bad input here is none: a server whose engine loop
    is already dead makes `serve` return 1 after its first check."""
    import gc
    from types import SimpleNamespace

    from service import server as server_mod
    from service.config import AdapterConfig, EngineConfig, RuntimeConfig, ServerConfig, ServiceConfig

    frozen_at_start: list[int] = []

    class Server:
        loop = SimpleNamespace(alive=False)

        def start(self) -> None:
            frozen_at_start.append(gc.get_freeze_count())

        def shutdown(self, grace: float | None = None) -> None:
            pass

    monkeypatch.setattr(server_mod, "build_server", lambda *a, **k: Server())
    gc.unfreeze()
    try:
        assert server_mod.serve(RuntimeConfig(), EngineConfig(), AdapterConfig(), ServerConfig(port=0),
                                ServiceConfig(data_dir=str(tmp_path))) == 1
    finally:
        gc.unfreeze()
    assert frozen_at_start and frozen_at_start[0] > 1000
