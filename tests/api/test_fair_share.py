"""GetFairShare over a real server: the weights of the tenants file, the service each tenant received (checked
against the usage its own calls returned), who may read whose, and the `loraserve fair-share` command."""

from __future__ import annotations

import json

import grpc
import pytest

from service.api.gen.loraserve.v1 import inference_pb2 as ipb
from service.api.gen.loraserve.v1 import usage_pb2 as upb
from service.tenants import hash_api_key
from tests.api.conftest import TENANT_KEYS, Server, rpc_error
from tests.api.serve_process import cli


def auth(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TENANT_KEYS[who]}"),)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    tenants = root / "tenants.yaml"
    tenants.write_text(f"""
tenants:
  - id: alice
    api_keys: ["{hash_api_key(TENANT_KEYS['alice'])}"]
    weight: 2
  - id: bob
    api_keys: ["{hash_api_key(TENANT_KEYS['bob'])}"]
  - id: ops
    admin: true
    api_keys: ["{hash_api_key(TENANT_KEYS['ops'])}"]
""")
    s = Server(tiny[0], root / "data", service={"tenants_file": str(tenants)}, enable_prefix_caching=False)
    yield s
    s.close()


def generate(server: Server, who: str, words: str, max_tokens: int) -> ipb.GenerateResponse:
    req = ipb.GenerateRequest(text=words, sampling=ipb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                      ignore_eos=True))
    return server.stub.Generate(req, metadata=auth(who), timeout=60)


def test_service_is_the_weighted_tokens_each_tenant_was_served(server):
    alice = [generate(server, "alice", "t7 t8 t9 t10 t11", 6) for _ in range(2)]
    bob = generate(server, "bob", "t20 t21 t22", 4)
    resp = server.usage.GetFairShare(upb.GetFairShareRequest(), metadata=auth("alice"), timeout=10)
    assert resp.policy == "vtc" and resp.input_token_weight == 1.0 and resp.output_token_weight == 2.0
    [mine] = resp.tenants
    # no prefix caching here: every prompt token was computed
    served = sum(r.usage.input_tokens + 2 * r.usage.output_tokens for r in alice)
    assert (mine.tenant, mine.weight, mine.requests) == ("alice", 2.0, 0)
    assert mine.service == pytest.approx(served / 2), [str(r.usage) for r in alice]
    every = server.usage.GetFairShare(upb.GetFairShareRequest(tenant="*"), metadata=auth("ops"), timeout=10)
    by_id = {t.tenant: t for t in every.tenants}
    assert by_id["bob"].weight == 1.0
    # bob came back from idle after alice's calls: he starts at least where the last tenant left off
    assert by_id["bob"].service >= bob.usage.input_tokens + 2 * bob.usage.output_tokens
    assert [t.tenant for t in every.tenants] == sorted(by_id)


def test_an_idle_tenant_reads_its_own_zero_share(server):
    resp = server.usage.GetFairShare(upb.GetFairShareRequest(tenant="ops"), metadata=auth("ops"), timeout=10)
    assert [(t.tenant, t.weight, t.requests) for t in resp.tenants] == [("ops", 1.0, 0)]


def test_a_tenant_may_not_read_every_tenant(server):
    err = rpc_error(server.usage.GetFairShare, upb.GetFairShareRequest(tenant="*"), metadata=auth("alice"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tenant='*'" in err.details() and "admin" in err.details()


def test_another_tenant_gets_the_same_answer_whether_it_exists_or_not(server):
    errs = [rpc_error(server.usage.GetFairShare, upb.GetFairShareRequest(tenant=t), metadata=auth("alice"))
            for t in ("bob", "nobody")]
    assert [e.code() for e in errs] == [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert errs[0].details().replace("bob", "nobody") == errs[1].details()


def test_no_key_is_unauthenticated(server):
    err = rpc_error(server.usage.GetFairShare, upb.GetFairShareRequest(), timeout=10)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_prints_the_shares(server):
    generate(server, "alice", "t1 t2", 1)  # alice has been served, whichever tests ran before
    args = ("fair-share", "--target", server.target, "--api-key", TENANT_KEYS["ops"], "--tenant", "*")
    table = cli(*args)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("policy: vtc") and "TENANT" in table.stdout and "alice" in table.stdout
    as_json = cli(*args, "--json")
    rows = {r["tenant"]: r for r in json.loads(as_json.stdout)}
    assert rows["alice"]["weight"] == 2.0
    refused = cli("fair-share", "--target", server.target, "--api-key", TENANT_KEYS["bob"], "--tenant", "*")
    assert refused.returncode != 0 and "admin" in refused.stderr
