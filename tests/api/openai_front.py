"""What the OpenAI-front tests share: a tiny-model server with its HTTP port (alice limited to 2 requests at once,
bob unlimited, spans kept), and the calls they make to it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.tracing import make_tracer_provider
from tests.api.conftest import TENANT_KEYS, Server, write_tenants

ALICE = TENANT_KEYS["alice"]
BOB = TENANT_KEYS["bob"]  # no limits (alice may run 2 requests at once)
GREEDY = {"temperature": 0, "max_tokens": 8}
CHAT = [{"role": "user", "content": "t5 t6 t7"}]


def serve(tiny: tuple[Path, Path], root: Path) -> Iterator[Server]:
    """A module fixture's body: the server, with `spans`, `base_url` and `model` (the base model's id)."""
    tenants = write_tenants(root / "tenants.yaml", alice_limits="{max_concurrent_requests: 2}")
    exporter = InMemorySpanExporter()
    s = Server(tiny[0], root / "data", adapter=tiny[1], service={"tenants_file": tenants, "metrics_port": 0},
               server={"http_port": 0}, tracer_provider=make_tracer_provider(exporters=[exporter]))
    s.spans = exporter
    s.base_url = f"http://127.0.0.1:{s.server.http_port}"
    s.model = s.server.base_model
    yield s
    s.close()


def client(served: Server, key: str = ALICE, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=key, max_retries=0, **kw)


def post(served: Server, path: str, body: bytes | str | dict, key: str | None = ALICE, **headers: str
         ) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps(body)
    hdrs = {"content-type": "application/json", **headers}
    if key is not None:
        hdrs["authorization"] = f"Bearer {key}"
    return httpx.post(served.base_url + path, content=body, headers=hdrs, timeout=30)


def grpc_alice(served: Server) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {ALICE}")]
