"""`loraserve serve` processes as replicas: one bucket (moto's S3 server on loopback) for the adapter files, one
PostgreSQL (tests.pg_cluster) for the control plane, the tiny model. What one replica commits, the other serves
at once; concurrent promotes lose no update; a delete waits for the other replica's requests; usage sums exactly
on either; kill -9 and a database outage lose nothing committed; a store or database that cannot be used at
start keeps health NOT_SERVING, says why, and the server starts once it works."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
import yaml

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from service.client import LoraServeClient
from service.tenants import hash_api_key
from tests.api.conftest import tiny  # noqa: F401 - the session's tiny model and adapter
from tests.api.serve_process import ServeProcess, cli
from tests.api.test_service_process import _upload_in_background, _variant
from tests.pg_cluster import cluster_for_tests, free_port

TINY_ARGS = ("--dtype", "float32", "--kv-cache-gib", "0.004", "--threads", "1", "--max-num-seqs", "4")
ALICE = "alice-key-0123456789abcdef"
LEASE_TTL_S = 2.0  # renewed every 0.5 s: a finished request stops blocking a delete within that
STORE_RETRY_S = 3.0  # service.server.STORE_RETRY_S


@pytest.fixture
def tenants_file(tmp_path) -> str:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"id": "alice", "api_keys": [hash_api_key(ALICE)]}]}))
    return str(path)


def config_file(tmp_path, s3_server, bucket: str, database_url: str | None = None) -> str:
    path = tmp_path / "loraserve.yaml"
    doc: dict = {"store": {"kind": "s3", "bucket": bucket, "endpoint_url": s3_server.url}}
    if database_url is not None:
        doc["database"] = {"url": database_url, "lease_ttl_s": LEASE_TTL_S, "connect_timeout_s": 2}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def serve_args(model_dir, tenants_file: str, config: str, data_dir) -> tuple[str, ...]:
    return ("--model", str(model_dir), "--tenants", tenants_file, "--config", config, "--data-dir", str(data_dir),
            *TINY_ARGS)


def start_replicas(n: int, args_of) -> list[ServeProcess]:
    with ThreadPoolExecutor(n) as pool:  # at once: the start-up is most of these tests' time
        futures = [pool.submit(ServeProcess, *args_of(i)) for i in range(n)]
    procs = [f.result() for f in futures if f.exception() is None]
    if len(procs) != n:
        for p in procs:
            p.kill()
        raise AssertionError([str(f.exception()) for f in futures])
    return procs


def until(fn, bound_s: float, what: str):
    """Call fn until it returns something true; the value and the time it took."""
    t0 = time.monotonic()
    while True:
        result = fn()
        if result:
            return result, time.monotonic() - t0
        assert time.monotonic() - t0 < bound_s, f"{what}: not within {bound_s}s"
        time.sleep(0.05)


def usage_totals(c: LoraServeClient) -> tuple[int, int, int]:
    rows = c.get_usage(group_by="tenant")
    return (sum(r.requests for r in rows), sum(r.input_tokens for r in rows), sum(r.output_tokens for r in rows))


def history(url: str, owner: str, name: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT p.seq, p.previous, p.current FROM promotions p JOIN adapters a ON a.id = "
                            "p.adapter_id WHERE a.owner = %s AND a.name = %s ORDER BY p.seq", (owner, name)).fetchall()


def test_two_replicas_share_one_control_plane(tiny, tenants_file, s3_server, bucket, pg_cluster,  # noqa: F811
                                              tmp_path):
    url = pg_cluster.new_database()
    config = config_file(tmp_path, s3_server, bucket, url)
    doubled = _variant(tiny[1], tmp_path / "variant", 2.0)
    procs = start_replicas(2, lambda i: serve_args(tiny[0], tenants_file, config, tmp_path / f"data-{i}"))
    try:
        answered = []  # the usage each answer reported to its client

        def gen(c: LoraServeClient, prompt: str, **kw):
            r = c.generate(prompt, temperature=0, **kw)
            answered.append(r.usage)
            return r

        with LoraServeClient(procs[0].address, api_key=ALICE, timeout=30) as a, \
                LoraServeClient(procs[1].address, api_key=ALICE, timeout=30) as b:
            # An upload through a is what b serves, on the very next call: no refresh interval.
            first = a.upload_adapter(tiny[1], "bot").version
            assert gen(b, "t5 t6", adapter="bot", max_tokens=2).adapter_version == first.version_id
            second = b.upload_adapter(doubled, "bot", promote=False).version
            assert second.number == 2 and a.get_adapter("bot").num_versions == 2

            # 50 promotes at once, half through each replica: every one is in the history, each replacing what
            # the one before it set, and both replicas serve what the last one set.
            jobs = [(a if i % 2 else b, 1 + (i // 2) % 2) for i in range(50)]
            with ThreadPoolExecutor(10) as pool:
                list(pool.map(lambda j: j[0].promote_adapter("bot", j[1]), jobs))
            hist = history(url, "alice", "bot")
            assert len(hist) == 1 + 50 and [h[0] for h in hist] == list(range(1, 52))
            assert all(later[1] == earlier[2] for earlier, later in zip(hist, hist[1:]))
            last = hist[-1][2]
            assert {gen(c, "t5", adapter="bot", max_tokens=1).adapter_version for c in (a, b)} == {last}

            # A delete through a is refused while b streams with that version; allowed once b is done.
            a.promote_adapter("bot", 2)
            stream = b.generate_stream_messages("t5 t6", adapter="bot@1", temperature=0, max_tokens=400,
                                                ignore_eos=True)
            assert next(stream).token_ids  # generating on b
            with pytest.raises(grpc.RpcError) as refused:
                a.delete_adapter("bot@1")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "in use by running requests on replica" in refused.value.details()
            streamed = list(stream)
            assert streamed[-1].usage.output_tokens == 400  # it ran to its end, on its version
            answered.append(streamed[-1].usage)
            released, took = until(lambda: _delete_or_none(a, "bot@1"), LEASE_TTL_S * 3, "the delete after the stream")
            assert released == [first.version_id]

            # Usage: requests through both replicas sum exactly, read through either.
            for i, c in enumerate([a, b] * 6):
                gen(c, f"t{5 + i % 7} t6", max_tokens=3 + i % 4, ignore_eos=True)
            expected = (len(answered), sum(u.input_tokens for u in answered), sum(u.output_tokens for u in answered))
            assert expected[0] == 1 + 2 + 1 + 12 and expected[2] == 2 + 1 + 1 + 400 + sum(3 + i % 4 for i in range(12))
            for c in (a, b):  # every replica's usage, read through either
                until(lambda c=c: usage_totals(c) == expected, 10, f"usage {expected} through {c}")
    finally:
        for p in procs:
            p.stop()


def _delete_or_none(c: LoraServeClient, ref: str):
    try:
        return c.delete_adapter(ref)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        return None


@pytest.fixture(scope="module")
def own_cluster():
    """A PostgreSQL of this module's fault tests only: they stop and start it."""
    yield from cluster_for_tests("loraserve-pg-replicas-")


def test_kill_9_and_a_database_outage_lose_nothing(tiny, tenants_file, s3_server, bucket, own_cluster,  # noqa: F811
                                                   tmp_path):
    url = own_cluster.new_database()
    config = config_file(tmp_path, s3_server, bucket, url)
    args = [serve_args(tiny[0], tenants_file, config, tmp_path / f"data-{i}") for i in range(2)]
    variants = [_variant(tiny[1], tmp_path / f"variant-{i}", 1.5 + i) for i in range(2)]
    procs = start_replicas(2, lambda i: args[i])
    received: list[tuple[str, int, int]] = []  # (request id, input tokens, output tokens) the clients got
    errors: list[str] = []
    stop = threading.Event()
    try:
        with LoraServeClient(procs[1].address, api_key=ALICE, timeout=30) as b:
            kept = b.upload_adapter(tiny[1], "kept").version
            # kill -9 of replica 0 in the middle of uploads: committed or absent everywhere, never partial.
            rng = random.Random(3)
            for trial in range(2):
                t = _upload_in_background(procs[0].address, variants[trial], f"partial-{trial}")
                time.sleep(rng.uniform(0.0, 0.4))
                procs[0].stop(signal.SIGKILL)
                t.join(10)
                names = {a.name for a in b.list_adapters()}
                assert "kept" in names
                if f"partial-{trial}" in names:  # committed before the kill: complete, usable on b
                    loaded = b.load_adapter(f"partial-{trial}", wait=True)
                    assert loaded.version.load_state == apb.LOAD_STATE_LOADED and not loaded.error
                procs[0] = ServeProcess(*args[0])

        # Traffic on both replicas while PostgreSQL stops and starts: inference keeps going on the names each
        # replica knows, control-plane calls are UNAVAILABLE, and every answered request's usage arrives.
        def client(i: int) -> None:
            with LoraServeClient(procs[i % 2].address, api_key=ALICE, timeout=30) as c:
                c.generate("t5", adapter="kept", temperature=0, max_tokens=1)  # known to this replica
                while not stop.is_set():
                    try:
                        r = c.generate(f"t{5 + i} t6", adapter="kept", temperature=0, max_tokens=4,
                                       ignore_eos=True)
                    except grpc.RpcError as e:
                        errors.append(f"{e.code()}: {e.details()}")
                        continue
                    received.append((r.request_id, r.usage.input_tokens, r.usage.output_tokens))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        until(lambda: len(received) >= 8, 60, "traffic before the outage")
        own_cluster.stop()
        during = len(received)
        with LoraServeClient(procs[0].address, api_key=ALICE, timeout=30) as a:
            for call in (lambda: a.promote_adapter("kept", 1), lambda: a.get_usage(), lambda: a.list_adapters()):
                with pytest.raises(grpc.RpcError) as down:
                    call()
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
                assert "database" in down.value.details()
            until(lambda: len(received) >= during + 8, 60, "inference while the database is down")
            assert a.health() == "SERVING"
        own_cluster.start()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors[:5]
        with LoraServeClient(procs[0].address, api_key=ALICE, timeout=30) as a:
            assert a.get_adapter("kept").current_version.version_id == kept.version_id
            assert a.promote_adapter("kept", 1).version_id == kept.version_id  # the control plane is back
        with psycopg.connect(url) as conn:
            def billed() -> bool:
                ids = [rid for rid, _, _ in received]
                rows = conn.execute("SELECT request_id, input_tokens, output_tokens, status FROM usage WHERE "
                                    "request_id = ANY(%s)", (ids,)).fetchall()
                return len(rows) == len(ids) and rows
            rows, _ = until(billed, 20, "the usage of every answered request in PostgreSQL")
            got = {r[0]: (r[1], r[2], r[3]) for r in rows}
            assert all(got[rid] == (i, o, "ok") for rid, i, o in received)
    finally:
        stop.set()
        if not own_cluster.running():
            own_cluster.start()
        for p in procs:
            p.kill()


def test_a_database_down_at_start_keeps_health_not_serving_until_it_is_up(tiny, tenants_file, s3_server,  # noqa: F811
                                                                          bucket, own_cluster, tmp_path):
    url = own_cluster.new_database().replace("postgres@", "postgres:not-shown@")  # trust auth ignores it
    config = config_file(tmp_path, s3_server, bucket, url)
    port = free_port()
    own_cluster.stop()
    with serving_once_unblocked(serve_args(tiny[0], tenants_file, config, tmp_path / "data"), port,
                                unblock=lambda: own_cluster.running() or own_cluster.start()) as started:
        with LoraServeClient(f"127.0.0.1:{port}", api_key=ALICE, timeout=5) as c:
            details = refused_while_waiting(c)
            assert "the control-plane database cannot be used" in details
            assert "not-shown" not in details
            time.sleep(STORE_RETRY_S + 0.5)
            assert c.health() == "NOT_SERVING"
            own_cluster.start()
            proc = started.result(timeout=120)
            assert c.health() == "SERVING"
        events = proc.events()
        down = [e for e in events if e.get("event") == "database_unavailable"]
        assert down and down[0]["level"] == "error" and "cannot be reached" in down[0]["error"]
        assert "not-shown" not in "\n".join(proc.lines) and "***" in down[0]["error"]
        assert len(down) == 1  # an unchanged problem is not logged at every retry
        assert proc.stop() == 0


def test_a_database_of_a_newer_server_is_refused_at_start(tiny, tenants_file, s3_server, bucket,  # noqa: F811
                                                          pg_cluster, tmp_path):
    url = pg_cluster.new_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE loraserve_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                     "migrated_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO loraserve_schema VALUES ('registry', 99)")
    r = cli("serve", *serve_args(tiny[0], tenants_file, config_file(tmp_path, s3_server, bucket), tmp_path / "d"),
            "--port", "0", "--database-url", url, timeout=120)
    assert r.returncode == 2
    assert "registry schema 99, written by a newer loraserve; this server reads schema 1" in r.stderr


def test_a_missing_bucket_keeps_health_not_serving_until_it_exists(tiny, tenants_file, s3_server,  # noqa: F811
                                                                    tmp_path):
    missing = f"adapters-missing-{int(time.time() * 1000) % 10**9}"
    config = config_file(tmp_path, s3_server, missing)
    port = free_port()  # the waiting server and the real one listen on the same port
    with serving_once_unblocked(serve_args(tiny[0], tenants_file, config, tmp_path / "data"), port,
                                unblock=lambda: s3_server.client().create_bucket(Bucket=missing)) as started:
        with LoraServeClient(f"127.0.0.1:{port}", api_key=ALICE, timeout=5) as c:
            assert f"bucket {missing!r}" in refused_while_waiting(c)
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


@contextlib.contextmanager
def serving_once_unblocked(args: list[str], port: int, unblock):
    """`loraserve serve ARGS --port PORT` started on a thread: it waits, listening with health NOT_SERVING, for
    what it cannot use yet; the future gives the ServeProcess once it serves. On the way out the cause of the
    wait is removed (`unblock()`, which must do nothing when it already is: a failure may come first) so that
    the server comes up and the module's other tests find what they need, and the server is killed."""
    pool = ThreadPoolExecutor(1)
    started = pool.submit(ServeProcess, *args, "--port", str(port))
    try:
        yield started
    finally:
        with contextlib.suppress(Exception):
            unblock()
        pool.shutdown()
        if started.exception() is None:
            started.result().kill()


def refused_while_waiting(c: LoraServeClient) -> str:
    """Health is NOT_SERVING and a generation UNAVAILABLE while the server waits; returns the refusal's words."""
    status, _ = until(lambda: _health(c), 60, "the waiting server answers health")
    assert status == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as refused:
        c.generate("t5", max_tokens=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    return refused.value.details()


def _health(c: LoraServeClient) -> str | None:
    try:
        return c.health(timeout=1)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None  # not listening yet
        raise
