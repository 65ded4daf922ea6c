"""The PostgreSQL control plane against a real PostgreSQL (tests.pg_cluster): schema migrations, concurrent
promotes from two replicas' registries with no lost update, leases that stop a delete through another replica,
the usage outbox exported exactly once, and what each part does while the database is down and after."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from adapters.pg import PgDatabase, SchemaTooNew, redact_url, to_pg_sql
from adapters.pg_registry import LeaseKeeper, PgAdapterRegistry
from adapters.registry import AdapterInUse, AdapterNotFound, VersionMeta
from adapters.registry_types import DatabaseUnavailable
from service.control_plane import UsageExporter
from service.usage import UsageLedger, UsageRecord
from service.usage_pg import PgUsageLedger
from tests.pg_cluster import cluster_for_tests, require_postgres


def vid(n: int) -> str:
    return f"v-{n:024x}"


META = VersionMeta(size_bytes=10, rank=4, target_modules=("q_proj",), base_model_id="tiny@sha256:00")


@pytest.fixture
def url(pg_cluster) -> str:
    return pg_cluster.new_database()


@pytest.fixture
def open_db(url):
    opened: list[PgDatabase] = []

    def open_one(**kw) -> PgDatabase:
        db = PgDatabase(url, **{"pool_size": 4, "connect_timeout_s": 2.0, **kw})
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        db.close()


def test_placeholders_and_redaction():
    assert to_pg_sql("SELECT * FROM t WHERE a = ? AND b = :name AND c LIKE 'x%'") == \
        "SELECT * FROM t WHERE a = %s AND b = %(name)s AND c LIKE 'x%%'"
    assert to_pg_sql("SELECT x::text") == "SELECT x::text"
    assert redact_url("postgresql://app:s3cret@db:5432/loraserve") == "postgresql://app:***@db:5432/loraserve"
    assert redact_url("postgresql://db/loraserve") == "postgresql://db/loraserve"


# --- migrations ---------------------------------------------------------------------------------------------

def test_the_schema_is_created_once_and_a_newer_one_is_refused(open_db, url):
    db = open_db()
    PgAdapterRegistry(db)
    PgAdapterRegistry(db)  # already at its version: nothing to do
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM loraserve_schema WHERE component = 'registry'").fetchone() == (1,)
        conn.execute("UPDATE loraserve_schema SET version = 7 WHERE component = 'registry'")
    with pytest.raises(SchemaTooNew, match="registry schema 7, written by a newer loraserve; this server reads "
                                           "schema 1") as info:
        PgAdapterRegistry(db)
    assert isinstance(info.value, ValueError)  # the CLI's exit 2 with the message, not a retry


def test_replicas_starting_together_migrate_once(open_db, url):
    dbs = [open_db() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda db: (PgAdapterRegistry(db), PgUsageLedger(db)), dbs))
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT component, version FROM loraserve_schema ORDER BY 1").fetchall() == [
            ("registry", 1), ("usage", 1)]


def test_an_unreachable_database_is_named_without_its_password():
    from tests.pg_cluster import free_port

    with pytest.raises(DatabaseUnavailable, match=r"postgresql://app:\*\*\*@127.0.0.1:\d+/x cannot be reached") as e:
        PgDatabase(f"postgresql://app:hunter2@127.0.0.1:{free_port()}/x", connect_timeout_s=1)
    assert "hunter2" not in str(e.value)


# --- two replicas' registries on one database ---------------------------------------------------------------

def test_concurrent_promotes_from_two_replicas_lose_no_update(open_db):
    a = PgAdapterRegistry(open_db(pool_size=8), replica="a")
    b = PgAdapterRegistry(open_db(pool_size=8), replica="b")
    for n in range(1, 6):
        a.register_version("alice", "bot", vid(n), META, promote=False)
    targets = [(a if i % 2 else b, str(1 + i % 5)) for i in range(50)]
    with ThreadPoolExecutor(16) as pool:
        done = list(pool.map(lambda t: t[0].promote("alice", "bot", t[1]).version_id, targets))
    hist = a.history("alice", "bot")
    assert len(hist) == 1 + 50  # the first version, then every promote: none lost
    assert [h.seq for h in hist] == list(range(1, 52))
    for before, after in zip(hist, hist[1:]):
        assert after.previous == before.current  # each promote replaced what the one before it set
    assert sorted(h.current for h in hist[1:]) == sorted(done)
    assert b.resolve("alice", "bot").version_id == hist[-1].current == a.get("alice", "bot").current.version_id


def test_a_version_registered_on_one_replica_resolves_on_the_other_at_once(open_db):
    a, b = PgAdapterRegistry(open_db(), replica="a"), PgAdapterRegistry(open_db(), replica="b")
    a.register_version("alice", "bot", vid(1), META)
    assert b.resolve("alice", "bot").version_id == vid(1)
    a.register_version("alice", "bot", vid(2), META)
    assert b.resolve("alice", "bot").version_id == vid(2)
    b.delete_version("alice", "bot", "1")
    with pytest.raises(AdapterNotFound):
        a.resolve("alice", "bot@1")


class Holds:
    """AdapterVersions' request holds, alone."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def hold(self, v: str) -> None:
        self.n[v] = self.n.get(v, 0) + 1

    def release(self, v: str) -> None:
        self.n[v] -= 1

    def requests_held(self) -> dict[str, int]:
        return dict(self.n)


def test_a_lease_on_one_replica_refuses_a_delete_on_the_other(open_db):
    a, b = PgAdapterRegistry(open_db(), replica="pod-a"), PgAdapterRegistry(open_db(), replica="pod-b")
    a.register_version("alice", "bot", vid(1), META)
    a.register_version("alice", "bot", vid(2), META)  # current: vid(1) may be deleted
    keeper = LeaseKeeper(Holds(), a, ttl_s=30)
    keeper.hold(vid(1))
    assert [(r, v) for r, v, _ in b.leases()] == [("pod-a", vid(1))]
    with pytest.raises(AdapterInUse, match=f"version {vid(1)} is in use by running requests on replica pod-a"):
        b.delete_version("alice", "bot", "1")
    with pytest.raises(AdapterInUse):
        b.delete_adapter("alice", "bot")
    keeper.release(vid(1))
    keeper.renew()  # the next renewal drops the lease of a version no request holds
    assert b.leases() == []
    assert b.delete_version("alice", "bot", "1") == (vid(1),)
    with pytest.raises(AdapterNotFound, match="deleted meanwhile"):
        keeper.hold(vid(1))  # resolved before the delete, held after it: refused, nothing held
    assert keeper.in_use(vid(1)) is False


def test_a_killed_replicas_lease_expires(open_db):
    a, b = PgAdapterRegistry(open_db(), replica="killed"), PgAdapterRegistry(open_db(), replica="b")
    a.register_version("alice", "bot", vid(1), META)
    a.register_version("alice", "bot", vid(2), META)
    a.lease(vid(1), ttl_s=1.0)  # and then the replica dies: nothing renews it
    with pytest.raises(AdapterInUse, match="replica killed"):
        b.delete_version("alice", "bot", "1")
    time.sleep(1.2)
    assert b.delete_version("alice", "bot", "1") == (vid(1),)


def test_leases_and_deletes_never_pass_each_other(open_db):
    """Many holds on one replica racing deletes on the other: every delete that succeeded came before every
    hold that succeeded on that version (a hold after it is refused), never in the middle of one."""
    a, b = PgAdapterRegistry(open_db(pool_size=8), replica="a"), PgAdapterRegistry(open_db(pool_size=8), replica="b")
    a.register_version("alice", "bot", vid(999), META)
    for n in range(20):
        a.register_version("alice", "bot", vid(n), META, promote=False)
    keeper = LeaseKeeper(Holds(), a, ttl_s=60)
    held, deleted = set(), set()

    def hold(n: int) -> None:
        try:
            keeper.hold(vid(n))
            held.add(n)
        except AdapterNotFound:
            pass

    def delete(n: int) -> None:
        try:
            b.delete_version("alice", "bot", vid(n))
            deleted.add(n)
        except (AdapterInUse, AdapterNotFound):
            pass

    with ThreadPoolExecutor(8) as pool:
        for n in range(20):
            pool.submit(hold, n)
            pool.submit(delete, n)
    assert not held & deleted and held | deleted == set(range(20))


# --- the usage outbox ---------------------------------------------------------------------------------------

def record(i: int, tenant: str = "alice") -> UsageRecord:
    return UsageRecord(request_id=f"r{i}", tenant=tenant, adapter="", adapter_version="", start_time=1000.0 + i,
                       end_time=1001.0 + i, input_tokens=10 + i, cached_input_tokens=0, output_tokens=i,
                       engine_seconds=0.01, status="ok")


def test_the_outbox_is_exported_exactly_once(open_db, tmp_path):
    shared = PgUsageLedger(open_db(), replica="a")
    with UsageLedger(tmp_path / "usage.db") as outbox:
        outbox.record_many([record(i) for i in range(30)])
        exporter = UsageExporter(outbox, shared, batch=7)
        assert exporter.export_pending() == 30 and outbox.count_unexported() == 0
        with outbox._txn() as db:  # as if the process died between the copy and its mark
            db.execute("UPDATE usage SET exported_at = NULL WHERE request_id IN ('r1', 'r2')")
        assert exporter.export_pending() == 2  # sent again ...
        rows, _ = shared.query(start_time=0, end_time=10_000)
    assert len(rows) == 1 and rows[0].requests == 30  # ... and counted once
    assert rows[0].output_tokens == sum(range(30)) and rows[0].input_tokens == sum(10 + i for i in range(30))
    assert shared.get("r3") == record(3)


# --- the database down and back -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_cluster():
    """A cluster of this module's own: its tests stop and start it."""
    yield from cluster_for_tests("loraserve-pg-faults-")


def test_while_the_database_is_down(own_cluster, tmp_path):
    url = own_cluster.new_database()
    db = PgDatabase(url, pool_size=4, connect_timeout_s=1.0)
    reg = PgAdapterRegistry(db, replica="a")
    shared = PgUsageLedger(db, replica="a")
    reg.register_version("alice", "bot", vid(1), META)
    reg.register_version("alice", "bot", vid(2), META, promote=False)
    assert reg.resolve("alice", "bot").version_id == vid(1)
    outbox = UsageLedger(tmp_path / "usage.db")
    exporter = UsageExporter(outbox, shared, retry_s=0.2).start()
    keeper = LeaseKeeper(Holds(), reg, ttl_s=2.0).start()
    try:
        own_cluster.stop()
        # Control-plane calls: UNAVAILABLE (DatabaseUnavailable), each within the connect timeout.
        for call in (lambda: reg.promote("alice", "bot", "2"), lambda: reg.list("alice"),
                     lambda: shared.query(start_time=0)):
            t0 = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="unreachable"):
                call()
            assert time.monotonic() - t0 < 5
        # Inference: what was resolved before answers at once; a name never resolved here cannot be.
        t0 = time.monotonic()
        assert reg.resolve("alice", "bot").version_id == vid(1)
        keeper.hold(vid(1))  # a request runs; its lease waits for the database
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(DatabaseUnavailable, match="was not resolved on this replica"):
            reg.resolve("alice", "bot@2")
        # Usage: recorded in the outbox, kept there.
        outbox.record_many([record(i) for i in range(5)])
        exporter.kick()
        time.sleep(0.5)
        assert outbox.count_unexported() == 5
        own_cluster.start()
        assert exporter.flush(timeout=15)
        deadline = time.monotonic() + 15
        while not reg.leases() and time.monotonic() < deadline:  # renewed once the database is back
            time.sleep(0.1)
        assert [(r, v) for r, v, _ in reg.leases()] == [("a", vid(1))]
        assert reg.promote("alice", "bot", "2").version_id == vid(2)
        assert reg.resolve("alice", "bot").version_id == vid(2)
        rows, _ = shared.query(start_time=0, end_time=10_000)
        assert rows[0].requests == 5
    finally:
        if not own_cluster.running():
            own_cluster.start()
        exporter.close()
        keeper.close()
        outbox.close()
        db.close()


def test_a_database_that_is_back_is_used_again_by_every_connection(own_cluster):
    """Connections of the pool broken by a restart are replaced, not handed out."""
    db = PgDatabase(own_cluster.new_database(), pool_size=3, connect_timeout_s=5.0)
    try:
        reg = PgAdapterRegistry(db)
        reg.register_version("alice", "bot", vid(1), META)
        with ThreadPoolExecutor(3) as pool:  # all three connections in use once
            list(pool.map(lambda _: reg.get("alice", "bot"), range(9)))
        own_cluster.stop()
        own_cluster.start()
        gate = threading.Barrier(3)

        def get(_: int) -> str:
            gate.wait(5)
            return reg.get("alice", "bot").current.version_id

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(get, range(3))) == [vid(1)] * 3
    finally:
        db.close()


def test_without_postgresql_ci_fails_and_elsewhere_skips(monkeypatch):
    """No PostgreSQL binaries on the PATH: a skip that names them, but a failure where CI requires PostgreSQL."""
    import tests.pg_cluster as pg_cluster

    monkeypatch.setattr(pg_cluster.shutil, "which", lambda name: None)
    monkeypatch.setenv(pg_cluster.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="LORASERVE_REQUIRE_POSTGRES=1 requires it"):
        require_postgres()
    monkeypatch.delenv(pg_cluster.REQUIRE_ENV)
    with pytest.raises(pytest.skip.Exception, match=r"initdb, pg_ctl, postgres not on the PATH"):
        require_postgres()
