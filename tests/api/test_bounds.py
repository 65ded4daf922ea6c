"""The bounds no tenant can push past: gRPC message size and prompt bytes (configured). Bad input only; no timing."""

from __future__ import annotations

import grpc
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.cli import build_parser, serve_configs
from service.config import ServerConfig
from tests.api.conftest import rpc_error

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
    assert (sc.max_message_mib, sc.max_prompt_bytes) == (4, None)


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_message_mib": 1}, "max_message_mib=1 is invalid: must be in [2, 2047] (uploads arrive in 1 MiB chunks)"),
    ({"max_message_mib": 4096}, "max_message_mib=4096 is invalid"),
    ({"max_prompt_bytes": 0}, "max_prompt_bytes=0 is invalid: must be >= 1"),
])
def test_bad_bounds_are_refused(fields, message):
    with pytest.raises(ValueError) as info:
        ServerConfig(**fields)
    assert message in str(info.value)
