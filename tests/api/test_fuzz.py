"""No input takes the service down: every RPC fuzzed with hypothesis-generated messages and damaged bytes,
with and without a valid API key, and health and reflection, which need none. Every call must end with a status that names the problem (never INTERNAL or
UNKNOWN, never a message past the cap); a caller without a valid key learns nothing but UNAUTHENTICATED; and
afterwards the server is healthy, still generates, and its KV pool is whole.

CI sends LORASERVE_FUZZ_COUNT (default 2000, ~20 s) cases; `make fuzz` sends 100,000 and prints the status histogram."""

from __future__ import annotations

import collections
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from tests.api.conftest import TENANT_KEYS, Server, tenants_server
from tests.api.fuzzing import (
    CONFIG,
    LONG_TIMEOUT_S,
    WEIGHTS,
    Case,
    all_rpcs,
    open_rpcs,
    payloads,
    send,
    upload_streams,
)

COUNT = int(os.environ.get("LORASERVE_FUZZ_COUNT", "2000"))
ROUND = 10_000  # hypothesis runs of at most this many cases: its memory of tried cases grows with each
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
CLIENT_SIDE = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)  # the fuzzer's own doing
MAX_DETAILS = 600  # a message quotes a few dozen characters of the input, never all of it
# Mostly with a valid key; else a wrong key, none, or authorization metadata that is wrong in form.
BAD_AUTH = {"stranger": ("Bearer not-a-key-0123456789",), "basic": ("Basic YWxpY2U6cHc=",), "no-key": ("Bearer ",),
            "huge-key": ("Bearer " + "k" * 6000,), "two-keys": ("Bearer not-a-key", f"Bearer {TENANT_KEYS['alice']}")}
_KEYED = st.sampled_from(["alice", "alice", "ops", "bob"])
CALLERS = st.one_of(_KEYED, _KEYED, _KEYED, st.sampled_from([None, *BAD_AUTH]))
TIMEOUTS = st.sampled_from([LONG_TIMEOUT_S] * 18 + [0.001, 0.02])  # a few expire in the middle of the call
RPCS = all_rpcs()
OPEN = [r for r in open_rpcs() if r.name != "Watch"]  # Watch streams until cancelled: test_undecodable covers it


def metadata(caller: str | None) -> tuple:
    if caller is None:
        return ()
    values = BAD_AUTH.get(caller) or (f"Bearer {TENANT_KEYS[caller]}",)
    return tuple(("authorization", v) for v in values)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = tenants_server(tiny, tmp_path_factory.mktemp("fuzz"))
    yield s
    s.close()


def cases(config: bytes, weights: bytes) -> st.SearchStrategy[Case]:
    per_rpc = []
    for rpc in RPCS + OPEN:
        if rpc.name == "UploadAdapter":
            requests = upload_streams(config, weights)
        elif rpc.client_streaming:  # reflection: a few requests on one stream
            requests = st.lists(payloads(rpc), min_size=1, max_size=3)
        else:
            requests = payloads(rpc).map(lambda b: [b])
        streaming = rpc.client_streaming or rpc.server_streaming
        per_rpc.append(st.builds(Case, st.just(rpc), requests, CALLERS, TIMEOUTS,
                                 st.booleans() if streaming else st.just(False)))
    return st.one_of(per_rpc)


def test_rpcs_cover_every_service():
    names = {r.name for r in RPCS}
    assert len(RPCS) == 13 and {"Generate", "GenerateStream", "UploadAdapter", "GetUsage"} <= names
    assert {"Check", "ServerReflectionInfo"} <= {r.name for r in OPEN}


def test_no_input_gets_internal_or_unknown(server: Server, tiny, capsys):
    codes: collections.Counter[str] = collections.Counter()
    per_rpc: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    strategy = cases((tiny[1] / CONFIG).read_bytes(), (tiny[1] / WEIGHTS).read_bytes())

    def check(case: Case) -> None:
        code, details = send(server.channel, case, metadata(case.caller))
        codes[code.name] += 1
        per_rpc[case.rpc.name][code.name] += 1
        where = f"{case.rpc.name} as {case.caller}: {code.name} {details[:300]!r}"
        assert code not in NEVER, where
        if case.timeout == LONG_TIMEOUT_S:  # no call may hang
            assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, where
        if not case.cancel:
            assert code is not grpc.StatusCode.CANCELLED, where
        assert len(details) <= MAX_DETAILS, where
        if case.caller not in TENANT_KEYS and code not in CLIENT_SIDE and case.rpc in RPCS:
            assert code is grpc.StatusCode.UNAUTHENTICATED, where  # no parser or validation output before auth

    alice = metadata("alice")
    probe = pb.GenerateRequest(text="t5 t6 t7", sampling=pb.SamplingParams(max_tokens=4, temperature=0,
                                                                            ignore_eos=True))
    before = server.stub.Generate(probe, metadata=alice, timeout=30).token_ids
    t0 = time.perf_counter()
    for first in range(0, COUNT, ROUND):
        run = settings(max_examples=min(ROUND, COUNT - first), deadline=None, database=None,
                       phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
        run(given(case=strategy)(check))()
    wall = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nfuzz: {sum(codes.values())} calls in {wall:.1f} s; status codes: "
              f"{dict(codes.most_common())}")
        for name, seen in sorted(per_rpc.items()):
            print(f"  {name}: {dict(seen.most_common())}")

    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.stub.Generate(probe, metadata=alice, timeout=30).token_ids == before  # and the same answer
    assert server.adapters.ListAdapters(apb.ListAdaptersRequest(), metadata=alice, timeout=10) is not None
    server.wait_idle_and_intact()
