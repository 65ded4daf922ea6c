"""The fuzzer of tests/api/test_fuzz.py against a server on the real default model (its BPE tokenizer, chat
template and vocabulary): no INTERNAL or UNKNOWN, and afterwards the server still answers Paris.

CI sends LORASERVE_FUZZ_DEFAULT_COUNT (default 300) cases; `make fuzz` sends more."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.builder import build_runtime
from service.client import LoraServeClient
from service.config import EngineConfig, RuntimeConfig, ServerConfig, ServiceConfig
from service.server import LoraServer
from tests.api.conftest import TENANT_KEYS, write_tenants
from tests.api.fuzzing import CONFIG, WEIGHTS, send
from tests.api.test_fuzz import NEVER, cases, metadata

COUNT = int(os.environ.get("LORASERVE_FUZZ_DEFAULT_COUNT", "300"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-default")
    rt = build_runtime(RuntimeConfig(kv_cache_gib=0.25, max_model_len=2048), EngineConfig(max_num_seqs=8))
    svc = ServiceConfig(data_dir=str(root / "data"), tenants_file=write_tenants(root / "t.yaml"))
    server = LoraServer(rt, ServerConfig(port=0), svc).start()
    yield server
    server.shutdown(grace_s=0)


def test_the_default_model_server_takes_the_fuzz_and_still_answers_paris(served):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    demo = Path(__file__).resolve().parents[2] / "adapters" / "demo" / "allcaps"  # a real adapter of this model
    strategy = cases((demo / CONFIG).read_bytes(), (demo / WEIGHTS).read_bytes())

    def check(case) -> None:
        code, details = send(channel, case, metadata(case.caller))
        assert code not in NEVER, f"{case.rpc.name} as {case.caller}: {code.name} {details[:300]!r}"

    run = settings(max_examples=COUNT, deadline=None, database=None, phases=[Phase.generate],
                   suppress_health_check=list(HealthCheck))
    run(given(case=strategy)(check))()
    channel.close()
    with LoraServeClient(f"127.0.0.1:{served.port}", api_key=TENANT_KEYS["alice"], timeout=60) as c:
        r = c.generate("What is the capital of France?", chat=True, temperature=0, max_tokens=16)
    assert "Paris" in r.text and r.finish_reason == pb.FINISH_REASON_EOS
    assert served.loop.call(lambda e: e.pool.num_in_use) == 0
