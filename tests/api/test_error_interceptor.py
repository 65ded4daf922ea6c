"""The error interceptor's safety nets, on a bare gRPC server with a test servicer (no model): a status message
of any size reaches the client capped, undecodable bytes are INVALID_ARGUMENT, and log lines that clients cause
stay within their rate bound."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from service.api.decoding import DecodeInterceptor
from service.api.errors import MAX_STATUS_MESSAGE_BYTES, ErrorInterceptor, ErrorLogs, cap_message
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.log_budget import LogBudget
from service.server import HealthServicer

SERVICE = "loraserve.test.Echo"  # under /loraserve.: the interceptors wrap it like a real loraserve RPC


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Echo(grpc.GenericRpcHandler):
    """/Fail raises ValueError(the request's text), /Text answers the request's text, /Count counts a stream."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        des, ser = pb.TokenizeRequest.FromString, pb.TokenizeResponse.SerializeToString
        name = details.method.rsplit("/", 1)[1]
        if name == "Fail":
            return grpc.unary_unary_rpc_method_handler(self._fail, des, ser)
        if name == "Text":
            return grpc.unary_unary_rpc_method_handler(lambda r, c: pb.TokenizeResponse(tokens=[r.text]), des, ser)
        if name == "Count":
            return grpc.stream_unary_rpc_method_handler(
                lambda it, c: pb.TokenizeResponse(token_ids=[sum(1 for _ in it)]), des, ser)
        return None

    @staticmethod
    def _fail(request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        raise ValueError(request.text)


@pytest.fixture
def echo():
    logs = ErrorLogs(refusals=LogBudget(_Lines(), "rpc_refusals_suppressed", "refusals", rate_per_s=1000, burst=1000))
    server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor(logs), DecodeInterceptor()])
    server.add_generic_rpc_handlers((Echo(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, logs.refusals.logger
    channel.close()
    server.stop(None)


class _Lines:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda event, **fields: self.lines.append((level, event, fields))


def call(channel: grpc.Channel, method: str, request: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=10)
    return info.value


def test_a_value_error_of_1_mib_reaches_the_client_as_invalid_argument_with_a_short_message(echo):
    channel, lines = echo
    err = call(channel, "Fail", pb.TokenizeRequest(text="é" * 2**20).SerializeToString())
    # Whole, the message would overflow gRPC's 16 KiB of trailing metadata: RESOURCE_EXHAUSTED "Stream removed".
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("éé") and err.details().endswith("... (1048576 chars)")
    assert len(err.details().encode()) <= MAX_STATUS_MESSAGE_BYTES + 30
    logged = [f for _, event, f in lines.lines if event == "rpc_refused"]
    assert len(logged) == 1 and len(logged[0]["message"]) < 1100  # the log line is capped too


def test_cap_message_keeps_short_messages_and_cuts_on_a_character_boundary():
    assert cap_message("short") == "short"
    assert cap_message("x" * 1024) == "x" * 1024
    capped = cap_message("€" * 400, limit=100)  # 3 bytes each: 33 whole characters fit
    assert capped == "€" * 33 + "... (400 chars)"


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"],
                         ids=["bad field key", "length past the end", "text not UTF-8"])
def test_undecodable_bytes_are_invalid_argument_naming_the_message_type(echo, data):
    err = call(echo[0], "Text", data)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("the request is not a valid loraserve.v1.TokenizeRequest message: "), err.details()


def test_an_undecodable_message_in_a_request_stream_is_refused_there(echo):
    good = pb.TokenizeRequest(text="t5").SerializeToString()
    count = echo[0].stream_unary(f"/{SERVICE}/Count")
    assert pb.TokenizeResponse.FromString(count(iter([good, good]), timeout=10)).token_ids == [2]
    with pytest.raises(grpc.RpcError) as info:
        count(iter([good, b"\xff", good]), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid loraserve.v1.TokenizeRequest message" in info.value.details()


def test_grpc_logs_no_traceback_for_undecodable_bytes(echo, caplog):
    call(echo[0], "Text", b"\xff")
    assert "Exception deserializing" not in caplog.text


def test_health_watch_holds_no_rpc_thread_behind_the_decode_interceptor():
    # grpc's Watch is non-blocking; wrapped without its hints, each Watch would hold an RPC thread for its life,
    # and a few unauthenticated watchers would starve the server.
    status = HealthServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), interceptors=[ErrorInterceptor(), DecodeInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(4)]
        assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 4
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=3).status == health_pb2.HealthCheckResponse.SERVING
        status.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert next(watches[0]).status == health_pb2.HealthCheckResponse.NOT_SERVING
        for w in watches:
            w.cancel()
    finally:
        server.stop(None)


# ---- the log budget ----------------------------------------------------------------------------------------
def budget(clock: FakeClock, **kw) -> tuple[LogBudget, _Lines]:
    lines = _Lines()
    return LogBudget(lines, "rpc_refusals_suppressed", "refusals", clock=clock, **{"rate_per_s": 10, "burst": 5, **kw}), lines


def test_log_budget_lets_a_burst_through_then_its_rate():
    clock = FakeClock()
    b, lines = budget(clock, summary_s=3600)
    assert [b.emit("info", "rpc_refused", "INVALID_ARGUMENT", n=i) for i in range(8)] == [True] * 5 + [False] * 3
    clock.t += 0.15  # one and a half tokens more, at 10 a second
    assert b.emit("info", "rpc_refused", "INVALID_ARGUMENT") and not b.emit("info", "rpc_refused", "NOT_FOUND")
    clock.t += 60  # refills to the burst, never past it
    assert sum(b.emit("info", "rpc_refused", "X") for _ in range(10)) == 5
    assert [e for _, e, _ in lines.lines] == ["rpc_refused"] * 11
    b.close()


def test_log_budget_summarises_what_it_dropped():
    clock = FakeClock()
    b, lines = budget(clock, burst=1, summary_s=3600)
    for code in ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "UNAUTHENTICATED"]:
        b.emit("info", "rpc_refused", code)
    assert b.flush() == 3
    level, event, fields = lines.lines[-1]
    assert (level, event) == ("warning", "rpc_refusals_suppressed")
    assert fields["message"] == "suppressed 3 similar refusals"
    assert fields["kinds"] == {"INVALID_ARGUMENT": 2, "UNAUTHENTICATED": 1}
    assert b.flush() == 0  # nothing new: no second summary
    b.close()


def test_log_budget_summary_comes_by_itself_after_its_window():
    b, lines = budget(FakeClock(), burst=1, summary_s=0.05)
    for _ in range(3):
        b.emit("info", "rpc_refused", "INVALID_ARGUMENT")
    deadline = time.monotonic() + 5
    while not any(e == "rpc_refusals_suppressed" for _, e, _ in lines.lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [f["count"] for _, e, f in lines.lines if e == "rpc_refusals_suppressed"] == [2]
    b.close()


def test_log_budget_refuses_a_budget_that_cannot_work():
    with pytest.raises(ValueError, match="rate_per_s > 0"):
        LogBudget(_Lines(), "e", "refusals", rate_per_s=0, burst=1)


def test_the_real_servers_refusals_go_through_the_budget():
    with capture_logs() as logs:
        b = ErrorLogs().refusals
        for _ in range(b.burst + 50):
            b.emit("info", "rpc_refused", "INVALID_ARGUMENT")
        b.close()
    assert sum(1 for e in logs if e["event"] == "rpc_refused") <= b.burst + 1  # + what refilled meanwhile
    assert [e["count"] for e in logs if e["event"] == "rpc_refusals_suppressed"][0] >= 49
