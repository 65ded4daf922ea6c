"""`loraserve serve` processes on one bucket (moto's S3 server on loopback, the tiny model): what one replica
writes, the other serves within `store.refresh_s` plus one pass; a store that cannot be used at start keeps
health NOT_SERVING, says why, and the server starts once the store works."""

from __future__ import annotations

import contextlib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from service.client import LoraServeClient
from service.tenants import hash_api_key
from tests.api.conftest import tiny  # noqa: F401 - the session's tiny model and adapter
from tests.api.serve_process import ServeProcess

TINY_ARGS = ("--dtype", "float32", "--kv-cache-gib", "0.004", "--threads", "1", "--max-num-seqs", "4")
ALICE = "alice-key-0123456789abcdef"
REFRESH_S = 1.0
BOUND_S = REFRESH_S + 4.0  # one refresh period, one pass, and the slack of two busy cores
STORE_RETRY_S = 3.0  # service.server.STORE_RETRY_S


@pytest.fixture
def tenants_file(tmp_path) -> str:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"id": "alice", "api_keys": [hash_api_key(ALICE)]}]}))
    return str(path)


def config_file(tmp_path, s3_server, bucket: str) -> str:
    path = tmp_path / "loraserve.yaml"
    path.write_text(yaml.safe_dump({"store": {"kind": "s3", "bucket": bucket, "endpoint_url": s3_server.url,
                                              "refresh_s": REFRESH_S}}))
    return str(path)


def serve_args(model_dir, tenants_file: str, config: str, data_dir) -> tuple[str, ...]:
    return ("--model", str(model_dir), "--tenants", tenants_file, "--config", config, "--data-dir", str(data_dir),
            *TINY_ARGS)


def variant(adapter_dir, out_dir):
    """The adapter with its B matrices doubled: other content, so another version."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir()
    (out_dir / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, out_dir / "adapter_model.safetensors")
    return out_dir


def until(fn, bound_s: float, what: str):
    """Call fn until it returns something true (a NOT_FOUND from the server counts as not yet); the time it took."""
    t0 = time.monotonic()
    while True:
        try:
            result = fn()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            result = None
        if result:
            return result, time.monotonic() - t0
        assert time.monotonic() - t0 < bound_s, f"{what}: not within {bound_s}s"
        time.sleep(0.05)


def test_two_replicas_share_adapter_names(tiny, tenants_file, s3_server, bucket, tmp_path):  # noqa: F811
    config = config_file(tmp_path, s3_server, bucket)
    doubled = variant(tiny[1], tmp_path / "variant")
    with ThreadPoolExecutor(2) as pool:  # both start at once: the start-up is most of this test's time
        futures = [pool.submit(ServeProcess, *serve_args(tiny[0], tenants_file, config, tmp_path / f"data-{i}"))
                   for i in range(2)]
    procs = [f.result() for f in futures if f.exception() is None]
    try:
        assert len(procs) == 2, [str(f.exception()) for f in futures]
        with LoraServeClient(procs[0].address, api_key=ALICE, timeout=30) as a, \
                LoraServeClient(procs[1].address, api_key=ALICE, timeout=30) as b:

            def served_by(client: LoraServeClient, version_id: str):
                def check() -> bool:
                    out = client.generate("t5 t6", adapter="bot", temperature=0, max_tokens=2)
                    return out.adapter_version == version_id
                return check

            first = a.upload_adapter(tiny[1], "bot").version
            _, took = until(served_by(b, first.version_id), BOUND_S, "an upload through a, used through b")
            second = a.upload_adapter(doubled, "bot", promote=False).version
            assert second.number == 2
            assert b.generate("t5", adapter="bot", temperature=0, max_tokens=1).adapter_version == first.version_id

            assert a.promote_adapter("bot", 2).version_id == second.version_id
            _, took_promote = until(served_by(b, second.version_id), BOUND_S, "a promote through a, seen by b")

            assert sorted(b.delete_adapter("bot")) == sorted([first.version_id, second.version_id])

            def gone_from_a() -> bool:
                try:
                    a.generate("t5", adapter="bot", temperature=0, max_tokens=1)
                except grpc.RpcError as e:
                    return e.code() == grpc.StatusCode.NOT_FOUND
                return False

            _, took_delete = until(gone_from_a, BOUND_S, "a delete through b, seen by a")
            assert a.list_adapters() == [] and b.list_adapters() == []
        print(f"visible on the other replica after {took:.2f}s (upload), {took_promote:.2f}s (promote), "
              f"{took_delete:.2f}s (delete); bound {BOUND_S}s")
    finally:
        for p in procs:
            p.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_bucket_keeps_health_not_serving_until_it_exists(tiny, tenants_file, s3_server,  # noqa: F811
                                                                    tmp_path):
    missing = f"adapters-missing-{int(time.time() * 1000) % 10**9}"
    config = config_file(tmp_path, s3_server, missing)
    port = free_port()  # the waiting server and the real one listen on the same port
    pool = ThreadPoolExecutor(1)
    started = pool.submit(ServeProcess, *serve_args(tiny[0], tenants_file, config, tmp_path / "data"),
                          "--port", str(port))
    try:
        with LoraServeClient(f"127.0.0.1:{port}", api_key=ALICE, timeout=5) as c:
            status, _ = until(lambda: _health(c), 60, "the waiting server answers health")
            assert status == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                c.generate("t5", max_tokens=1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"bucket {missing!r}" in refused.value.details()
            time.sleep(STORE_RETRY_S + 0.5)  # a retry or two: still not serving
            assert c.health() == "NOT_SERVING"
            s3_server.client().create_bucket(Bucket=missing)
            t0 = time.monotonic()
            proc = started.result(timeout=120)
            assert proc.address == f"127.0.0.1:{port}" and c.health() == "SERVING"
            took = time.monotonic() - t0
            assert took < STORE_RETRY_S + 30, took  # one retry, then the model load and warm-up
        events = proc.events()
        names = [e.get("event") for e in events]
        unavailable = [e for e in events if e.get("event") == "store_unavailable"]
        assert unavailable and names.index("store_unavailable") < names.index("server_ready")
        assert f"bucket {missing!r}" in unavailable[0]["error"] and "does not exist" in unavailable[0]["error"]
        assert unavailable[0]["level"] == "error"
        assert len(unavailable) == 1  # an unchanged problem is not logged again at every retry
        assert proc.stop() == 0
    finally:
        if not started.done():  # a failure above: let the server come up, so that it can be stopped
            with contextlib.suppress(Exception):
                s3_server.client().create_bucket(Bucket=missing)
        pool.shutdown()
        if started.exception() is None:
            started.result().kill()


def _health(c: LoraServeClient) -> str | None:
    try:
        return c.health(timeout=1)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None  # not listening yet
        raise
