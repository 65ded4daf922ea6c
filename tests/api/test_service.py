"""The product surface end to end over a real socket: tenants and keys, adapter upload / promote / rollback /
share / delete while requests run, usage that equals what was served, spans, metrics."""

from __future__ import annotations

import copy
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.client import LoraServeClient
from service.loop import wait_until
from service.tracing import make_tracer_provider
from tests.api.conftest import TENANT_KEYS, Server, rpc_error, write_tenants

GREEDY = dict(temperature=0, max_tokens=8)
KEYS = TENANT_KEYS


@pytest.fixture(scope="module")
def adapter_v2(tiny, tmp_path_factory):
    """A second peft adapter for the tiny model (other weights, other targets): a new version."""
    import peft
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny[0], torch_dtype=torch.float32)
    torch.manual_seed(11)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                                 target_modules=["q_proj", "k_proj", "down_proj"]))
    out = tmp_path_factory.mktemp("adapter-v2")
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def spans():
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, spans):
    root = tmp_path_factory.mktemp("svc")
    s = Server(tiny[0], root / "data", service={
        "tenants_file": write_tenants(root / "tenants.yaml"), "metrics_port": 0,
        "price_input_per_1k": 1.0, "price_output_per_1k": 2.0},
        tracer_provider=make_tracer_provider(exporters=[spans]))
    yield s
    s.close()


def client(server, who: str | None) -> LoraServeClient:
    return LoraServeClient(server.target, api_key=KEYS[who] if who else None, timeout=60)


def test_auth_failures_are_unauthenticated(server):
    """Bad input: no key, a wrong key, a malformed authorization header."""
    with client(server, None) as c:
        err = rpc_error(c.generate, "t5 t6", **GREEDY)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "no credentials" in err.details()
        assert c.health() == "SERVING"  # health needs no key: probes call it
    with LoraServeClient(server.target, api_key="not-a-key-of-anyone-here") as c:
        err = rpc_error(c.list_adapters)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in err.details()
    err = rpc_error(server.stub.Generate, pb.GenerateRequest(text="t5"), metadata=(("authorization", "Basic x"),))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()


def test_upload_generate_share_and_isolation(server, tiny):
    with client(server, "alice") as alice, client(server, "bob") as bob:
        up = alice.upload_adapter(tiny[1], "helper", description="peft save_pretrained output")
        assert up.created and up.current and up.version.number == 1 and up.version.owner == "alice"
        assert up.version.rank == 8 and set(up.version.target_modules) == {"q_proj", "v_proj", "o_proj"}
        again = alice.upload_adapter(tiny[1], "helper")  # identical content: the same version
        assert not again.created and again.version.version_id == up.version.version_id
        base = alice.generate("t5 t6 t7", **GREEDY)
        tuned = alice.generate("t5 t6 t7", adapter="helper", **GREEDY)
        assert tuned.adapter_version == up.version.version_id and tuned.token_ids != base.token_ids
        # Bob cannot see alice's private adapter: NOT_FOUND, exactly as for a name that does not exist.
        for ref in ("helper", "alice/helper"):
            err = rpc_error(bob.generate, "t5", adapter=ref, **GREEDY)
            assert err.code() == grpc.StatusCode.NOT_FOUND and "not found" in err.details()
        assert rpc_error(bob.get_adapter, "alice/helper").code() == grpc.StatusCode.NOT_FOUND
        assert all(a.owner != "alice" for a in bob.list_adapters())
        # Shared with bob: he uses it (by owner/name) but cannot change it.
        shared = alice.share_adapter("helper", grant=["bob"])
        assert shared.visibility == apb.VISIBILITY_SHARED and list(shared.shared_with) == ["bob"]
        assert bob.generate("t5 t6 t7", adapter="alice/helper", **GREEDY).token_ids == tuned.token_ids
        # A bare name is bob's own or the service's, never another tenant's: NOT_FOUND, naming alice/helper.
        err = rpc_error(bob.generate, "t5", adapter="helper", **GREEDY)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "alice/helper" in err.details()
        err = rpc_error(bob.promote_adapter, "alice/helper", 1)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        alice.share_adapter("helper", revoke=["bob"])
        assert rpc_error(bob.generate, "t5", adapter="alice/helper", **GREEDY).code() == grpc.StatusCode.NOT_FOUND
    server.wait_idle_and_intact()


def test_another_tenants_public_adapter_does_not_change_what_a_name_means(server, tiny, adapter_v2):
    local = server.server.adapters.register_dir("caps", adapter_v2).version  # as `serve --adapter caps=DIR`
    with client(server, "alice") as alice, client(server, "bob") as bob, client(server, "ops") as ops:
        assert alice.generate("t5 t6", adapter="caps", **GREEDY).adapter_version == local.version_id
        bobs = bob.upload_adapter(tiny[1], "caps", visibility="public").version  # bob publishes his own `caps`
        assert bobs.version_id != local.version_id
        for c in (alice, ops):  # an admin's bare name means the same: its own, else the service's
            assert c.generate("t5 t6", adapter="caps", **GREEDY).adapter_version == local.version_id
            assert c.get_adapter("caps").owner == "local"
            assert c.generate("t5 t6", adapter="bob/caps", **GREEDY).adapter_version == bobs.version_id
        assert bob.generate("t5 t6", adapter="caps", **GREEDY).adapter_version == bobs.version_id
        own = alice.upload_adapter(tiny[1], "caps").version  # her own comes before the service's
        assert alice.generate("t5 t6", adapter="caps", **GREEDY).adapter_version == own.version_id
        alice.delete_adapter("caps")
        assert alice.get_adapter("caps").owner == "local"
        bob.delete_adapter("caps")
    server.wait_idle_and_intact()


def test_promote_and_rollback_while_requests_run(server, tiny, adapter_v2):
    with client(server, "alice") as alice:
        v1 = alice.upload_adapter(tiny[1], "swap").version
        expect_v1 = alice.generate("t9 t10", adapter="swap", **GREEDY).token_ids
        results: dict[str, pb.GenerateResponse] = {}

        def long_request() -> None:  # started on v1, still running when v2 is promoted
            results["old"] = alice.generate("t9 t10", adapter="swap", temperature=0, max_tokens=40,
                                            ignore_eos=True)

        server.hold()  # the long request is submitted (on v1) and stays in flight while v2 is promoted
        t = threading.Thread(target=long_request)
        t.start()
        assert wait_until(lambda: server.engine_call(lambda e: e.has_unfinished()), 10)
        v2 = alice.upload_adapter(adapter_v2, "swap").version  # promoted: new requests get v2
        server.resume()
        assert v2.number == 2 and v2.version_id != v1.version_id
        new = alice.generate("t9 t10", adapter="swap", **GREEDY)
        t.join(60)
        assert results["old"].adapter_version == v1.version_id  # finished on the version it started with
        assert results["old"].token_ids[:8] == expect_v1 and len(results["old"].token_ids) == 40
        assert new.adapter_version == v2.version_id and new.token_ids != expect_v1
        # Rollback = promote the older version; a pinned reference keeps meaning its version.
        assert alice.promote_adapter("swap", 1).version_id == v1.version_id
        assert alice.generate("t9 t10", adapter="swap", **GREEDY).token_ids == expect_v1
        assert alice.generate("t9 t10", adapter="swap@2", **GREEDY).adapter_version == v2.version_id
        info = alice.get_adapter("swap")
        assert info.current_version.version_id == v1.version_id and [v.number for v in info.versions] == [1, 2]


def test_delete_in_use_is_refused_then_succeeds(server, tiny):
    with client(server, "bob") as bob:
        v = bob.upload_adapter(tiny[1], "short-lived").version
        stream = bob.generate_stream_messages("t5 t6", adapter="short-lived", temperature=0, max_tokens=60,
                                              ignore_eos=True)
        next(stream)  # running now
        server.hold()  # and still running while the delete is tried
        err = rpc_error(bob.delete_adapter, "short-lived")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "in use" in err.details()
        server.resume()
        rest = list(stream)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH  # the running request lost nothing
        # The files stay while another adapter (alice's, same content) still refers to the version.
        assert v.version_id not in bob.delete_adapter("short-lived")
        assert rpc_error(bob.generate, "t5", adapter="short-lived").code() == grpc.StatusCode.NOT_FOUND
    server.wait_idle_and_intact()


def test_load_and_unload_pin_a_version(server, tiny):
    with client(server, "ops") as ops:
        ops.upload_adapter(tiny[1], "warm")
        r = ops.load_adapter("warm", wait=True)
        assert r.version.load_state == apb.LOAD_STATE_LOADED and not r.error
        versions = server.server.adapters.versions
        assert versions.pinned_by(r.version.version_id) == {"ops"}
        ops.load_adapter("warm")  # loading twice pins once
        assert versions.pinned_by(r.version.version_id) == {"ops"}
        ops.unload_adapter("warm")
        assert versions.pinned_by(r.version.version_id) == frozenset()


def test_usage_equals_the_tokens_served(server):
    t0 = time.time()
    with client(server, "bob") as bob:
        served = [bob.generate(f"t{20 + i} t30 t31", temperature=0, max_tokens=3 + i) for i in range(4)]
        msgs = list(bob.generate_stream_messages("t40 t41", temperature=0, max_tokens=5))
        server.server.usage_writer.flush()
        rows = bob.get_usage(start_time=t0, group_by="tenant")
    assert len(rows) == 1 and rows[0].tenant == "bob"
    final = msgs[-1].usage
    assert rows[0].requests == 5
    assert rows[0].input_tokens == sum(r.usage.input_tokens for r in served) + final.input_tokens
    assert rows[0].output_tokens == sum(len(r.token_ids) for r in served) + final.output_tokens
    assert rows[0].engine_seconds > 0
    expected_cost = rows[0].input_tokens / 1000 * 1.0 + rows[0].output_tokens / 1000 * 2.0
    assert rows[0].estimated_cost == pytest.approx(expected_cost) and rows[0].cost_unit == "USD"


def test_usage_of_another_tenant_is_for_admins_only(server):
    with client(server, "alice") as alice:
        alice.generate("t5", **GREEDY)
        err = rpc_error(alice.get_usage, tenant="bob")  # bad input: another tenant's usage
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "needs the admin role" in err.details()
    server.server.usage_writer.flush()
    with client(server, "ops") as ops:
        tenants = {r.tenant for r in ops.get_usage(tenant="*", group_by="tenant")}
        assert {"alice", "bob"} <= tenants


def test_cancelled_request_is_billed_for_what_it_used(server):
    with client(server, "alice") as alice:
        t0 = time.time()
        stream = alice.generate_stream_messages("t50 t51", temperature=0, max_tokens=200, ignore_eos=True)
        got = [next(stream) for _ in range(3)]
        server.hold()  # not finished when the client cancels
        stream.close()  # the client cancels
        server.resume()
        server.wait_idle_and_intact()
        server.server.usage_writer.flush()
        rows = alice.get_usage(start_time=t0, adapter="-", group_by="tenant")
    assert rows[0].cancelled_requests == 1
    assert rows[0].output_tokens >= sum(len(m.token_ids) for m in got)


def test_spans_carry_genai_attributes(server, spans, tiny):
    spans.clear()
    with client(server, "alice") as alice:
        v = alice.upload_adapter(tiny[1], "traced").version
        r = alice.generate("t5 t6 t7", adapter="traced", **GREEDY)
    assert wait_until(lambda: spans.get_finished_spans(), 5)
    (span,) = [s for s in spans.get_finished_spans() if s.attributes.get("loraserve.request.id") == r.request_id]
    a = span.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == server.server.base_model
    assert a["gen_ai.response.model"] == v.version_id
    assert a["gen_ai.usage.input_tokens"] == r.usage.input_tokens
    assert a["gen_ai.usage.output_tokens"] == r.usage.output_tokens
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert a["loraserve.tenant.id"] == "alice"
    assert a["loraserve.time_to_first_token_s"] >= a["loraserve.queue_time_s"] >= 0


def _scrape(server) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()


def _value(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_endpoint(server):
    before = _scrape(server)
    with client(server, "bob") as bob:
        r = bob.generate("t5 t6", **GREEDY)
    text = _scrape(server)
    # What one request moved: its tokens, one more first-token and finished observation.
    assert _value(text, "loraserve_generation_tokens_total") - _value(before, "loraserve_generation_tokens_total") \
        == len(r.token_ids)
    assert _value(text, "loraserve_prompt_tokens_total") - _value(before, "loraserve_prompt_tokens_total") \
        == r.usage.input_tokens
    assert _value(text, "loraserve_time_to_first_token_seconds_count") \
        - _value(before, "loraserve_time_to_first_token_seconds_count") == 1
    assert _value(text, "loraserve_num_requests_running") == 0
    for name in ("loraserve_num_requests_running", "loraserve_num_requests_waiting", "loraserve_kv_cache_usage_perc",
                 "loraserve_time_to_first_token_seconds_bucket", "loraserve_time_per_output_token_seconds_bucket",
                 "loraserve_generation_tokens_total", "loraserve_prompt_tokens_total",
                 "loraserve_num_preemptions_total", "loraserve_prefix_cache_hits_total", "loraserve_lora_requests_info",
                 "loraserve_adapter_load_seconds"):
        assert name in text, name
    assert "alice" not in text and "bob" not in text  # no tenant labels


def test_tenant_limits(make_server, tmp_path):
    """Bad input: over the concurrency limit, over the token rate, a prompt and max_tokens over the caps."""
    limits = "{max_concurrent_requests: 1, tokens_per_minute: 100, max_prompt_tokens: 20, max_output_tokens: 50}"
    server = make_server(service={"tenants_file": write_tenants(tmp_path / "t.yaml", limits)})
    with client(server, "alice") as alice:
        stream = alice.generate_stream_messages("t5 t6", temperature=0, max_tokens=30, ignore_eos=True)
        next(stream)
        server.hold()  # the stream stays in flight
        err = rpc_error(alice.generate, "t5", **GREEDY)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in err.details()
        server.resume()
        list(stream)
        err = rpc_error(alice.generate, " ".join(["t7"] * 21), **GREEDY)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 20 prompt tokens" in err.details()
        err = rpc_error(alice.generate, "t5", temperature=0, max_tokens=51)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 50 output tokens" in err.details()
        for _ in range(3):  # about 100 tokens spent: the bucket runs dry
            try:
                alice.generate("t5 t6 t7 t8 t9 t10 t11 t12 t13 t14", temperature=0, max_tokens=30, ignore_eos=True)
            except grpc.RpcError as e:
                err = e
                break
        else:
            err = rpc_error(alice.generate, "t5", **GREEDY)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute" in err.details()
    with client(server, "bob") as bob:  # other tenants are not limited by alice's limits
        assert bob.generate("t5", **GREEDY).usage.output_tokens == 8


def test_two_tenants_with_different_adapters_at_once(server, tiny, adapter_v2):
    """alice and bob, each with a private adapter of their own, in one continuous batch: each stream equals
    what the same request gives when it runs alone."""
    with client(server, "alice") as alice, client(server, "bob") as bob:
        alice.upload_adapter(tiny[1], "mine")
        bob.upload_adapter(adapter_v2, "mine")  # same name, other owner, other weights
        prompts = [f"t{60 + i} t61 t62" for i in range(6)]
        alone = {(who, p): c.generate(p, adapter="mine", temperature=0, max_tokens=10).token_ids
                 for who, c in (("alice", alice), ("bob", bob)) for p in prompts}

        def run(who_prompt):
            who, p = who_prompt
            c = alice if who == "alice" else bob
            return [t for m in c.generate_stream_messages(p, adapter="mine", temperature=0, max_tokens=10)
                    for t in m.token_ids]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(12) as pool:
            together = dict(zip(alone, pool.map(run, list(alone))))
    assert together == {k: list(v) for k, v in alone.items()}
    assert any(alone[("alice", p)] != alone[("bob", p)] for p in prompts)  # the adapters really differ
    server.wait_idle_and_intact()


def test_negative_priority_needs_the_admin_role(server):
    """Bad input: a tenant asks to run ahead of everyone else's requests."""
    with client(server, "bob") as bob:
        err = rpc_error(bob.generate, "t5", priority=-5, **GREEDY)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "admin role" in err.details()
        assert bob.generate("t5", priority=5, **GREEDY).usage.output_tokens == 8  # running later is fine
    with client(server, "ops") as ops:
        assert ops.generate("t5", priority=-5, **GREEDY).usage.output_tokens == 8


def test_prefix_cache_is_never_shared_across_tenants(server):
    """A tenant must not learn from cache hits what another tenant sent: the same long prompt hits the
    cache for the tenant that sent it, and never for another tenant."""
    prompt = " ".join(f"t{70 + i % 40}" for i in range(48))  # three full KV blocks
    with client(server, "alice") as alice, client(server, "bob") as bob:
        first = alice.generate(prompt, temperature=0, max_tokens=2)
        again = alice.generate(prompt, temperature=0, max_tokens=2)
        other = bob.generate(prompt, temperature=0, max_tokens=2)
    assert first.usage.cached_input_tokens == 0 and again.usage.cached_input_tokens >= 32
    assert other.usage.cached_input_tokens == 0
    assert other.token_ids == again.token_ids  # isolation changes nothing but the cache


def test_an_adapter_that_fails_to_load_is_failed_precondition(server, tiny, tmp_path):
    """Bad state, not bad input: the stored files of a registered version were damaged on disk. The request
    is refused with FAILED_PRECONDITION (never INTERNAL) and the storage detail stays in the server log."""
    from safetensors.torch import load_file, save_file

    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "adapter_config.json").write_bytes((tiny[1] / "adapter_config.json").read_bytes())
    tensors = load_file(tiny[1] / "adapter_model.safetensors")
    save_file({k: v * 3 if "lora_B" in k else v for k, v in tensors.items()}, variant / "adapter_model.safetensors")
    with client(server, "alice") as alice:
        v = alice.upload_adapter(variant, "fragile").version
        stored = server.server.store.root / v.version_id / "adapter_model.safetensors"
        stored.write_bytes(b"not safetensors any more")
        err = rpc_error(alice.generate, "t5 t6", adapter="fragile", **GREEDY)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "could not be loaded" in err.details() and str(stored) not in err.details()
    server.wait_idle_and_intact()


def test_loaded_adapter_pins_are_capped_per_tenant(make_server, tmp_path, tiny, adapter_v2):
    """Bad input: a tenant pins more adapter versions than its max_loaded_adapters."""
    server = make_server(service={"tenants_file": write_tenants(tmp_path / "t.yaml", "{max_loaded_adapters: 1}")})
    with client(server, "alice") as alice, client(server, "bob") as bob:
        alice.upload_adapter(tiny[1], "one")
        alice.upload_adapter(adapter_v2, "two")
        assert alice.load_adapter("one").version.load_state == apb.LOAD_STATE_LOADED
        assert alice.load_adapter("one").version.load_state == apb.LOAD_STATE_LOADED  # the same pin again
        err = rpc_error(alice.load_adapter, "two")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "unload one first" in err.details()
        alice.share_adapter("two", grant=["bob"])
        assert bob.load_adapter("alice/two").version.load_state == apb.LOAD_STATE_LOADED  # bob's own quota
        alice.unload_adapter("one")
        assert alice.load_adapter("two").version.load_state == apb.LOAD_STATE_LOADED
