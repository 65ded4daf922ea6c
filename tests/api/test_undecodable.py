"""Request bytes that do not parse, on every RPC of the real server: INVALID_ARGUMENT naming the message type
for an authenticated caller (and on health and reflection, which need no key), UNAUTHENTICATED (and not a
word about the bytes) for anyone else on a loraserve RPC; an upload that breaks in the middle stores nothing;
and a flood of them writes a bounded number of log lines."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from service.api.errors import REFUSALS_BURST, REFUSALS_PER_S
from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from tests.api.conftest import TENANT_KEYS, Server, tenants_server
from tests.api.fuzzing import CONFIG, WEIGHTS, Case, all_rpcs, open_rpcs, send

ALICE = (("authorization", f"Bearer {TENANT_KEYS['alice']}"),)
GARBAGE = b"\xff\xff\xff\xff"  # a field key whose varint never ends: no parser accepts it
RPCS = all_rpcs()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = tenants_server(tiny, tmp_path_factory.mktemp("undecodable"))
    yield s
    s.close()


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_undecodable_request_is_invalid_argument(server: Server, rpc):
    code, details = send(server.channel, Case(rpc, [GARBAGE], "alice"), ALICE)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert details == (f"the request is not a valid {rpc.request.DESCRIPTOR.full_name} message: "
                       "wire format was corrupt")


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
def test_undecodable_request_without_a_key_is_unauthenticated_and_says_nothing_of_it(server: Server, rpc):
    code, details = send(server.channel, Case(rpc, [GARBAGE], None), ())
    assert code is grpc.StatusCode.UNAUTHENTICATED, details
    assert "valid" not in details and "message" not in details


@pytest.mark.parametrize("rpc", open_rpcs(), ids=[r.name for r in open_rpcs()])
def test_undecodable_request_to_health_or_reflection_is_invalid_argument_without_a_traceback(server, rpc, caplog):
    # No key is needed there: grpc's INTERNAL and its traceback per call would let anyone flood the log.
    code, details = send(server.channel, Case(rpc, [GARBAGE], None), ())
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"the request is not a valid {rpc.request.DESCRIPTOR.full_name} message")
    assert "Exception" not in caplog.text


def test_text_that_is_not_utf8_is_named(server: Server):
    generate = next(r for r in RPCS if r.name == "Generate")
    code, details = send(server.channel, Case(generate, [b"\x12\x02\xc3\x28"], "alice"), ALICE)  # text = C3 28
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "the request is not a valid loraserve.v1.GenerateRequest message: string field had bad UTF-8"


def test_upload_with_an_undecodable_chunk_in_the_middle_stores_nothing(server: Server, tiny):
    files = [(CONFIG, (tiny[1] / CONFIG).read_bytes()), (WEIGHTS, (tiny[1] / WEIGHTS).read_bytes())]
    data = b"".join(d for _, d in files)
    manifest = apb.UploadManifest(name="broken", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    msgs = [apb.UploadAdapterRequest(manifest=manifest).SerializeToString()]
    msgs += [apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f, data=d)).SerializeToString() for f, d in files]
    store = Path(server.server.service_config.data_dir) / "adapters"
    before = sorted(p.name for p in store.rglob("*"))
    upload = next(r for r in RPCS if r.name == "UploadAdapter")

    code, details = send(server.channel, Case(upload, [msgs[0], msgs[1], GARBAGE, msgs[2]], "alice"), ALICE)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("the request is not a valid loraserve.v1.UploadAdapterRequest message")
    listed = server.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=ALICE).adapters
    assert "broken" not in [a.name for a in listed]
    assert sorted(p.name for p in store.rglob("*")) == before
    assert send(server.channel, Case(upload, msgs, "alice"), ALICE)[0] is grpc.StatusCode.OK  # the same, whole


def test_a_flood_of_undecodable_requests_logs_a_bounded_number_of_lines(server: Server):
    tokenize = server.channel.unary_unary("/loraserve.v1.InferenceService/Tokenize")
    n = REFUSALS_BURST + 200
    server.server.errors.logs.refusals.flush()
    with capture_logs() as logs:
        t0 = time.monotonic()
        for _ in range(n):
            with pytest.raises(grpc.RpcError):
                tokenize(GARBAGE, metadata=ALICE, timeout=10)
        elapsed = time.monotonic() - t0
        server.server.errors.logs.refusals.flush()
    refused = [e for e in logs if e["event"] == "rpc_refused"]
    assert len(refused) <= REFUSALS_BURST + REFUSALS_PER_S * elapsed + 1
    summary = [e for e in logs if e["event"] == "rpc_refusals_suppressed"]
    assert len(refused) + sum(e["count"] for e in summary) == n
    assert summary[0]["message"] == f"suppressed {summary[0]['count']} similar refusals"
    assert server.stub.Tokenize(pb.TokenizeRequest(text="t5"), metadata=ALICE).token_ids  # still answering
