"""The error interceptor's safety nets, on a bare gRPC server with a test servicer (no model): a status message
of any size reaches the client capped, and undecodable bytes are INVALID_ARGUMENT."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from structlog.testing import capture_logs

from service.api.decoding import DecodeInterceptor
from service.api.errors import MAX_STATUS_MESSAGE_BYTES, ErrorInterceptor, cap_message
from service.api.gen.loraserve.v1 import inference_pb2 as pb

SERVICE = "loraserve.test.Echo"  # under /loraserve.: the interceptors wrap it like a real loraserve RPC


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
    server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor(), DecodeInterceptor()])
    server.add_generic_rpc_handlers((Echo(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(None)


def call(channel: grpc.Channel, method: str, request: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=10)
    return info.value


def test_a_value_error_of_1_mib_reaches_the_client_as_invalid_argument_with_a_short_message(echo):
    with capture_logs() as logs:
        err = call(echo, "Fail", pb.TokenizeRequest(text="é" * 2**20).SerializeToString())
    # Whole, the message would overflow gRPC's 16 KiB of trailing metadata: RESOURCE_EXHAUSTED "Stream removed".
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("éé") and err.details().endswith("... (1048576 chars)")
    assert len(err.details().encode()) <= MAX_STATUS_MESSAGE_BYTES + 30
    logged = [e for e in logs if e["event"] == "rpc_refused"]
    assert len(logged) == 1 and len(logged[0]["message"]) < 1100  # the log line is capped too


def test_cap_message_keeps_short_messages_and_cuts_on_a_character_boundary():
    assert cap_message("short") == "short"
    assert cap_message("x" * 1024) == "x" * 1024
    capped = cap_message("€" * 400, limit=100)  # 3 bytes each: 33 whole characters fit
    assert capped == "€" * 33 + "... (400 chars)"


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"],
                         ids=["bad field key", "length past the end", "text not UTF-8"])
def test_undecodable_bytes_are_invalid_argument_naming_the_message_type(echo, data):
    err = call(echo, "Text", data)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("the request is not a valid loraserve.v1.TokenizeRequest message: "), err.details()


def test_an_undecodable_message_in_a_request_stream_is_refused_there(echo):
    good = pb.TokenizeRequest(text="t5").SerializeToString()
    count = echo.stream_unary(f"/{SERVICE}/Count")
    assert pb.TokenizeResponse.FromString(count(iter([good, good]), timeout=10)).token_ids == [2]
    with pytest.raises(grpc.RpcError) as info:
        count(iter([good, b"\xff", good]), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid loraserve.v1.TokenizeRequest message" in info.value.details()


def test_grpc_logs_no_traceback_for_undecodable_bytes(echo, caplog):
    call(echo, "Text", b"\xff")
    assert "Exception deserializing" not in caplog.text
