"""The bounds no tenant can push past: gRPC message size, prompt bytes (configured), and Tokenize counted
against the tenant's concurrency and token rate like a generation. Bad input only; no timing."""

from __future__ import annotations

import grpc
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.cli import build_parser, serve_configs
from service.client import LoraServeClient
from service.config import ServerConfig
from tests.api.conftest import TENANT_KEYS, rpc_error, write_tenants

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_message_over_the_receive_bound_is_resource_exhausted(make_server):
    """gRPC itself refuses the message before our code sees it, with RESOURCE_EXHAUSTED (its code for a
    message over max_receive_message_length); under the bound, our own prompt bound answers INVALID_ARGUMENT."""
    server = make_server(server={"max_message_mib": 2, "max_prompt_bytes": 100})
    for rpc in (server.stub.Generate, server.stub.Tokenize):
        cls = pb.GenerateRequest if rpc is server.stub.Generate else pb.TokenizeRequest
        err = rpc_error(rpc, cls(text="x" * (2 * 2**20 + 1)), timeout=30)
        assert err.code() == EXHAUSTED, err.details()
        assert "larger than max" in err.details() and str(2 * 2**20) in err.details()
        err = rpc_error(rpc, cls(text="x" * (2**20)), timeout=30)
        assert err.code() == INVALID and "text has 1048576 bytes" in err.details()
        assert "at most 100 bytes (server.max_prompt_bytes)" in err.details()
    assert server.stub.Tokenize(pb.TokenizeRequest(text="t5 t6")).token_ids  # the server is fine after


def test_the_default_receive_bound_is_4_mib(make_server):
    server = make_server()
    err = rpc_error(server.stub.Tokenize, pb.TokenizeRequest(text="x" * (4 * 2**20 + 1)), timeout=30)
    assert err.code() == EXHAUSTED and str(4 * 2**20) in err.details()


def test_bounds_from_flags_and_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server: {max_message_mib: 8, max_prompt_bytes: 65536, max_upload_mib: 16}\n")
    _, _, _, sc, svc = serve_configs(build_parser().parse_args(["serve", "--config", str(path)]))
    assert (sc.max_message_mib, sc.max_prompt_bytes, svc.max_upload_mib) == (8, 65536, 16)
    args = ["serve", "--config", str(path), "--max-message-mib", "6", "--max-prompt-bytes", "1000",
            "--max-upload-mib", "32"]
    _, _, _, sc, svc = serve_configs(build_parser().parse_args(args))
    assert (sc.max_message_mib, sc.max_prompt_bytes, svc.max_upload_mib) == (6, 1000, 32)
    _, _, _, sc, _ = serve_configs(build_parser().parse_args(["serve"]))
    assert (sc.max_message_mib, sc.max_prompt_bytes, sc.stream_interval) == (4, None, 1)
    _, _, _, sc, _ = serve_configs(build_parser().parse_args(["serve", "--stream-interval", "4"]))
    assert sc.stream_interval == 4


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_message_mib": 1}, "max_message_mib=1 is invalid: must be in [2, 2047] (uploads arrive in 1 MiB chunks)"),
    ({"max_message_mib": 4096}, "max_message_mib=4096 is invalid"),
    ({"max_prompt_bytes": 0}, "max_prompt_bytes=0 is invalid: must be >= 1"),
    ({"stream_interval": 0}, "stream_interval=0 is invalid: must be a whole number of tokens in [1, 1024]"),
    ({"stream_interval": 2.5}, "stream_interval=2.5 is invalid"),
    ({"stream_interval": True}, "stream_interval=True is invalid"),
])
def test_bad_bounds_are_refused(fields, message):
    with pytest.raises(ValueError) as info:
        ServerConfig(**fields)
    assert message in str(info.value)


def tenant_client(server, who: str) -> LoraServeClient:
    return LoraServeClient(server.target, api_key=TENANT_KEYS[who], timeout=60)


def test_tokenize_takes_one_of_the_tenants_concurrent_requests(make_server, tmp_path):
    """alice may run one request at a time: while her stream runs, her Tokenize is refused like a second
    generation would be; bob is not affected; once the stream ended her Tokenize runs (its lease was let go)."""
    limits = "{max_concurrent_requests: 1}"
    server = make_server(service={"tenants_file": write_tenants(tmp_path / "t.yaml", limits)})
    with tenant_client(server, "alice") as alice, tenant_client(server, "bob") as bob:
        stream = alice.generate_stream_messages("t5 t6", temperature=0, max_tokens=30, ignore_eos=True)
        next(stream)
        server.hold()  # the stream stays in flight
        try:
            err = rpc_error(alice.tokenize, "t5 t6 t7")
            assert err.code() == EXHAUSTED and "max_concurrent_requests=1" in err.details()
            assert len(bob.tokenize("t5 t6 t7")) == 3
        finally:
            server.resume()
        list(stream)
        for _ in range(3):  # each Tokenize releases its lease when it returns
            assert len(alice.tokenize("t5 t6 t7")) == 3
        err = rpc_error(alice.tokenize, "t5 " * 5000)  # refused before the lease: nothing is held after
        assert err.code() == INVALID
        assert len(alice.tokenize("t5")) == 1


def test_tokenize_is_charged_to_tokens_per_minute(make_server, tmp_path):
    """A bucket of 25 tokens: 10-token Tokenize calls drain it, then the next is refused for the token rate."""
    server = make_server(service={"tenants_file": write_tenants(tmp_path / "t.yaml", "{tokens_per_minute: 25}")})
    text = " ".join(f"t{i}" for i in range(5, 15))  # 10 tokens
    with tenant_client(server, "alice") as alice:
        admitted = 0
        with pytest.raises(grpc.RpcError) as info:
            while admitted < 5:
                assert len(alice.tokenize(text)) == 10
                admitted += 1
        assert admitted == 3  # 25 -> 15 -> 5 -> -5: the fourth finds the bucket empty
        err = info.value
        assert err.code() == EXHAUSTED and "tokens_per_minute=25" in err.details()
        chat = [{"role": "user", "content": "t5"}]
        assert rpc_error(alice.tokenize, messages=chat).code() == EXHAUSTED
        assert rpc_error(alice.generate, "t5", temperature=0, max_tokens=2).code() == EXHAUSTED
