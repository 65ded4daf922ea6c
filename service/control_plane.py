"""The control plane of a server: the adapter registry (names, versions, owners, sharing, promote history) and
the usage ledger, behind one interface with two implementations, chosen by `database.url`:

- `sqlite:///DIR` (the default, DIR = the data directory): `DIR/registry.db` and `DIR/usage.db`, this process's
  own. Usage is recorded in the ledger that GetUsage reads.
- `postgresql://...`: one database shared by every replica. The registry is in PostgreSQL
  (adapters.pg_registry: transactions, row locks, leases on versions in use); usage is recorded first in this
  replica's SQLite ledger, its durable outbox, and copied to PostgreSQL by a thread (UsageExporter), keyed by
  request id, so a database outage delays usage but loses none; GetUsage reads PostgreSQL, every replica's rows.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import structlog

from adapters.pg import PgDatabase, redact_url
from adapters.registry import AdapterRegistry
from adapters.store import Store
from service.config import ServiceConfig
from service.usage import Pricing, UsageLedger, UsageQueries

log = structlog.get_logger(__name__)

EXPORT_BATCH = 500
EXPORT_RETRY_S = 1.0


class RequestHolds(Protocol):
    def hold(self, version_id: str) -> None: ...

    def release(self, version_id: str) -> None: ...


def replica_id() -> str:
    """This process among the replicas: its host (the pod's name on Kubernetes) and its process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def connect(svc: ServiceConfig) -> PgDatabase | None:
    """The shared database of `database.url` with every schema migrated (None for SQLite). DatabaseUnavailable
    while it cannot be reached; SchemaTooNew (a ValueError) if a newer server migrated it."""
    if svc.database_kind != "postgresql":
        return None
    from adapters.pg_registry import MIGRATIONS, SCHEMA_VERSION
    from service.usage_pg import MIGRATIONS as USAGE_MIGRATIONS
    from service.usage_pg import SCHEMA_VERSION as USAGE_SCHEMA_VERSION

    db = PgDatabase(svc.database_url or "", pool_size=svc.database_pool_size,
                    connect_timeout_s=svc.database_connect_timeout_s)
    try:
        db.migrate("registry", SCHEMA_VERSION, MIGRATIONS)
        db.migrate("usage", USAGE_SCHEMA_VERSION, USAGE_MIGRATIONS)
    except BaseException:
        db.close()
        raise
    return db


class ControlPlane:
    """registry: what AdapterService and inference resolve against; ledger: what GetUsage reads; outbox: where
    the usage writer commits each finished request. `holds(versions)` wraps the process's adapter holds with the
    leases other replicas must see."""

    kind = "sqlite"

    def __init__(self, registry: AdapterRegistry, ledger: UsageQueries, outbox: UsageLedger) -> None:
        self.registry, self.ledger, self.outbox = registry, ledger, outbox

    def holds(self, versions: Any) -> RequestHolds:
        return versions

    def usage_written(self) -> None:
        """The usage writer committed rows to the outbox."""

    def start(self) -> ControlPlane:
        return self

    def close(self) -> None:
        self.outbox.close()
        self.registry.close()

    def describe(self) -> str:
        return f"sqlite:{self.outbox.path.parent}"


class SharedControlPlane(ControlPlane):
    kind = "postgresql"

    def __init__(self, db: PgDatabase, store: Store, outbox: UsageLedger, pricing: Pricing, *,
                 replica: str, lease_ttl_s: float) -> None:
        from adapters.pg_registry import PgAdapterRegistry
        from service.usage_pg import PgUsageLedger

        self.db, self.replica, self.lease_ttl_s = db, replica, lease_ttl_s
        registry = PgAdapterRegistry(db, store=store, replica=replica)
        super().__init__(registry, PgUsageLedger(db, pricing=pricing, replica=replica), outbox)
        self.exporter = UsageExporter(outbox, self.ledger)  # type: ignore[arg-type]
        self._leases: Any = None

    def holds(self, versions: Any) -> RequestHolds:
        from adapters.pg_registry import LeaseKeeper

        if self._leases is None:
            self._leases = LeaseKeeper(versions, self.registry, self.lease_ttl_s)  # type: ignore[arg-type]
        return self._leases

    def usage_written(self) -> None:
        self.exporter.kick()

    def start(self) -> SharedControlPlane:
        self.exporter.start()
        if self._leases is not None:
            self._leases.start()
        return self

    def close(self) -> None:
        try:
            self.exporter.close()
            if self._leases is not None:
                self._leases.close()
        finally:
            super().close()
            self.db.close()

    def describe(self) -> str:
        return redact_url(self.db.url)


def open_control_plane(svc: ServiceConfig, store: Store, pricing: Pricing, *, db: PgDatabase | None = None,
                       replica: str | None = None) -> ControlPlane:
    """The control plane `svc.database_url` names (SQLite files are created; PostgreSQL is `db` if given, else
    connected now). Not started."""
    if svc.database_kind == "postgresql":
        db = db or connect(svc)
        assert db is not None
        local = Path(svc.data_dir)
        local.mkdir(parents=True, exist_ok=True)
        try:
            outbox = UsageLedger(local / "usage.db", pricing=pricing)
            return SharedControlPlane(db, store, outbox, pricing, replica=replica or replica_id(),
                                      lease_ttl_s=svc.database_lease_ttl_s)
        except BaseException:
            db.close()
            raise
    where = Path(svc.sqlite_dir)
    where.mkdir(parents=True, exist_ok=True)
    registry = AdapterRegistry(where / "registry.db", store=store)
    released = registry.gc_store()  # files a crash left between store and register
    if released:
        log.info("adapter_store_gc", released=list(released))
    ledger = UsageLedger(where / "usage.db", pricing=pricing)
    return ControlPlane(registry, ledger, ledger)


class UsageExporter:
    """Copies the outbox's rows to the shared ledger: at once after each commit of the usage writer, and every
    `retry_s` while the database is down. Each batch is inserted (a request id already there is skipped), then
    marked exported in the outbox; a crash in between sends it again, harmlessly."""

    def __init__(self, outbox: UsageLedger, shared: Any, *, batch: int = EXPORT_BATCH,
                 retry_s: float = EXPORT_RETRY_S) -> None:
        self.outbox, self.shared, self.batch, self.retry_s = outbox, shared, batch, retry_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._exported_total = 0
        self._failing: str | None = None
        self._thread = threading.Thread(target=self._run, name="usage-exporter", daemon=True)

    def start(self) -> UsageExporter:
        self._thread.start()
        return self

    def kick(self) -> None:
        self._wake.set()

    def export_pending(self) -> int:
        """Copy everything pending now; returns how many rows were copied (raises if the database fails)."""
        done = 0
        while True:
            pending = self.outbox.unexported(self.batch)
            if not pending:
                return done
            self.shared.record_many([r for r, _ in pending], recorded_at=[t for _, t in pending])
            self.outbox.mark_exported([r.request_id for r, _ in pending])
            done += len(pending)
            if len(pending) < self.batch:
                return done

    def flush(self, timeout: float = 10.0) -> bool:
        """Until the outbox is empty (True) or the timeout passes."""
        deadline = time.monotonic() + timeout
        while self.outbox.count_unexported():
            if time.monotonic() > deadline:
                return False
            self.kick()
            time.sleep(0.02)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.retry_s)
            self._wake.clear()
            try:
                n = self.export_pending()
            except Exception as e:  # noqa: BLE001 - the thread outlives an outage; the outbox keeps the rows
                if self._failing is None:
                    log.error("usage_export_failed", error=str(e).splitlines()[0][:300],
                              pending=self._pending(), retry_s=self.retry_s)
                self._failing = str(e)
                continue
            if self._failing is not None:
                log.info("usage_export_resumed", exported=n)
                self._failing = None

    def _pending(self) -> int | None:
        try:
            return self.outbox.count_unexported()
        except Exception:  # noqa: BLE001
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop after one last attempt to copy what is pending (what is left stays in the outbox for the next
        start)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout + 5.0)
        try:
            self.export_pending()
        except Exception as e:  # noqa: BLE001
            log.warning("usage_export_deferred", pending=self._pending(), error=str(e).splitlines()[0][:300])
