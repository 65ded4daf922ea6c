"""The adapter registry in PostgreSQL, shared by every replica: the same names, versions, owners, sharing and
promote history as the SQLite registry (adapters.registry, whose code and SQL this runs), plus what several
processes need.

- Consistency: every change is one transaction; a write locks its adapter's row (SELECT ... FOR UPDATE), so
  concurrent promotes from any replicas apply one after the other and each is in the history with the version
  it replaced (no lost update). Reads go to the database, so a change committed through one replica is what
  every replica resolves from then on: no refresh interval.
- In use across replicas: a replica that runs requests on a version holds a lease on it in `leases` (replica,
  version, expiry), taken before the request is submitted and renewed while requests hold it (LeaseKeeper). A
  delete locks the version's rows, then refuses with AdapterInUse while any replica's lease has not expired. A
  lease is taken under a share lock of the same rows, so a lease and a delete never pass each other: either the
  delete sees the lease, or the lease sees the version gone (AdapterNotFound: the request is refused).
- Files: registering a version and deleting unreferenced files take the same advisory lock per version id, so a
  re-upload of content being deleted elsewhere fails cleanly (VersionFilesMissing) instead of naming lost files.
- The database down: resolve answers from what this replica resolved last (inference keeps running on the
  names it knows); anything else is DatabaseUnavailable (UNAVAILABLE).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from adapters.pg import BYTE_ORDER_TEXT, PgDatabase
from adapters.registry import AdapterInUse, AdapterNotFound, AdapterRef, AdapterRegistry, AdapterVersion
from adapters.registry_types import DatabaseUnavailable
from adapters.store import Store, StoreError

__all__ = ["LeaseKeeper", "PgAdapterRegistry"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_TEXT = BYTE_ORDER_TEXT
MIGRATIONS = {0: f"""
CREATE TABLE adapters (
    id BIGSERIAL PRIMARY KEY,
    owner {_TEXT} NOT NULL,
    name {_TEXT} NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    current_version TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE versions (
    adapter_id BIGINT NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    version_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    description TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,
    base_model_id TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version_id),
    UNIQUE (adapter_id, seq)
);
ALTER TABLE adapters ADD CONSTRAINT adapters_current_version FOREIGN KEY (id, current_version)
    REFERENCES versions (adapter_id, version_id) DEFERRABLE INITIALLY DEFERRED;
CREATE INDEX versions_by_id ON versions (version_id);
CREATE TABLE shares (
    adapter_id BIGINT NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    tenant {_TEXT} NOT NULL,
    PRIMARY KEY (adapter_id, tenant)
);
CREATE INDEX shares_by_tenant ON shares (tenant);
CREATE TABLE promotions (
    adapter_id BIGINT NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    previous TEXT,
    current TEXT NOT NULL,
    by_tenant TEXT NOT NULL,
    PRIMARY KEY (adapter_id, seq)
);
CREATE TABLE leases (
    replica TEXT NOT NULL,
    version_id TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (replica, version_id)
);
CREATE INDEX leases_by_version ON leases (version_id);
"""}
KNOWN_MAX = 10_000  # resolutions remembered for a database outage
_VERSION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))"


class PgAdapterRegistry(AdapterRegistry):
    """AdapterRegistry on a PostgreSQL database shared by replicas; `replica` names this process's leases."""

    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, db: PgDatabase, *, store: Store | None = None, replica: str = "",
                 clock: Callable[[], float] = time.time) -> None:  # no SqliteFile: the database is shared
        self._store, self._clock, self._pg = store, clock, db
        self.replica = replica or "replica"
        self.path = None
        self._lock = threading.RLock()
        self._known: OrderedDict[tuple[str, bool, str], AdapterVersion] = OrderedDict()
        self._known_lock = threading.Lock()
        db.migrate("registry", SCHEMA_VERSION, MIGRATIONS)

    def __repr__(self) -> str:
        return f"PgAdapterRegistry({self._pg!r})"

    @property
    def available(self) -> bool:
        """Whether the database answered the last time it was used."""
        return self._pg.available

    def _txn(self, write: bool = True) -> Any:
        return self._pg.txn(write)

    def close(self) -> None:
        """The database belongs to whoever opened it (it is shared with the usage ledger)."""

    # --- reads: the database, else what this replica resolved last -----------------------------------------

    def resolve(self, tenant: str, ref: str, *, admin: bool = False) -> AdapterVersion:
        key = (tenant, admin, ref)
        if self._pg.available:
            try:
                v = super().resolve(tenant, ref, admin=admin)
            except AdapterNotFound:
                with self._known_lock:
                    self._known.pop(key, None)
                raise
            except DatabaseUnavailable:
                pass
            else:
                with self._known_lock:
                    self._known[key] = v
                    self._known.move_to_end(key)
                    if len(self._known) > KNOWN_MAX:
                        self._known.popitem(last=False)
                return v
        with self._known_lock:
            known = self._known.get(key)
        if known is None:
            raise DatabaseUnavailable(f"the control-plane database is unreachable and adapter {ref[:80]!r} was not "
                                      "resolved on this replica before it went down; retry when it is back")
        return known

    # --- hooks of the shared database ----------------------------------------------------------------------

    def _version_lock(self, db: Any, version_id: str) -> None:
        db.execute(_VERSION_LOCK, (version_id,))

    def _check_not_in_use(self, db: Any, in_use: Callable[[str], bool] | None, ids: Iterable[str],
                          ref: AdapterRef) -> None:
        ids = list(ids)
        super()._check_not_in_use(db, in_use, ids, ref)  # this replica's own requests
        db.execute("SELECT 1 FROM versions WHERE version_id = ANY(?) FOR UPDATE", (ids,)).fetchall()
        busy = db.execute("SELECT version_id, replica FROM leases WHERE version_id = ANY(?) AND expires_at > "
                          "clock_timestamp() ORDER BY version_id, replica", (ids,)).fetchall()
        if busy:
            versions = ", ".join(dict.fromkeys(r[0] for r in busy))
            replicas = ", ".join(sorted({r[1] for r in busy}))
            raise AdapterInUse(f"adapter {ref.base!r} version {versions} is in use by running requests on replica "
                               f"{replicas}; retry when they have finished")

    def _drop_unreferenced(self, ids: Iterable[str]) -> tuple[str, ...]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return ()
        with self._txn() as db:  # held while the files go: no register of these ids can pass in between
            for vid in sorted(ids):
                self._version_lock(db, vid)
            referenced = {r[0] for r in db.execute("SELECT DISTINCT version_id FROM versions WHERE version_id = "
                                                   "ANY(?)", (ids,))}
            released = tuple(vid for vid in ids if vid not in referenced)
            for vid in released if self._store is not None else ():
                try:
                    self._store.delete(vid)  # type: ignore[union-attr]
                except (OSError, StoreError) as e:
                    log.warning("could not delete the files of released version %s: %s", vid, e)
        return released

    def gc_store(self) -> tuple[str, ...]:
        """Nothing: another replica may be between storing a version's files and registering it."""
        return ()

    # --- leases ------------------------------------------------------------------------------------------

    def lease(self, version_id: str, ttl_s: float) -> None:
        """This replica runs requests on `version_id` for the next `ttl_s` seconds at least (renew before then).
        AdapterNotFound if no adapter has the version any more (deleted since it was resolved)."""
        with self._txn() as db:
            if not db.execute("SELECT 1 FROM versions WHERE version_id = ? FOR SHARE", (version_id,)).fetchall():
                raise AdapterNotFound(f"adapter version {version_id} was deleted meanwhile")
            db.execute("INSERT INTO leases (replica, version_id, expires_at) VALUES (?, ?, clock_timestamp() + ? * "
                       "interval '1 second') ON CONFLICT (replica, version_id) DO UPDATE SET expires_at = "
                       "EXCLUDED.expires_at", (self.replica, version_id, float(ttl_s)))

    def renew_leases(self, version_ids: Iterable[str], ttl_s: float) -> None:
        """This replica's leases become exactly `version_ids`, each for `ttl_s` more seconds; long-expired leases
        of any replica (one killed) are removed."""
        ids = sorted(set(version_ids))
        with self._txn() as db:
            db.executemany("INSERT INTO leases (replica, version_id, expires_at) VALUES (?, ?, clock_timestamp() + "
                           "? * interval '1 second') ON CONFLICT (replica, version_id) DO UPDATE SET expires_at = "
                           "EXCLUDED.expires_at", [(self.replica, vid, float(ttl_s)) for vid in ids])
            db.execute("DELETE FROM leases WHERE replica = ? AND NOT (version_id = ANY(?))", (self.replica, ids))
            db.execute("DELETE FROM leases WHERE expires_at < clock_timestamp() - interval '1 hour'")

    def leases(self) -> list[tuple[str, str, float]]:
        """(replica, version id, seconds left) of every unexpired lease."""
        with self._txn(write=False) as db:
            return [(r[0], r[1], float(r[2])) for r in db.execute(
                "SELECT replica, version_id, EXTRACT(EPOCH FROM expires_at - clock_timestamp()) FROM leases WHERE "
                "expires_at > clock_timestamp() ORDER BY replica, version_id")]


class RequestHolds(Protocol):
    """What a replica's requests hold (adapters.lifecycle.AdapterVersions)."""

    def hold(self, version_id: str) -> None: ...

    def release(self, version_id: str) -> None: ...

    def requests_held(self) -> dict[str, int]: ...


class LeaseKeeper:
    """hold / release of this replica's requests, with a lease in the database per version they hold.

    `hold` takes the lease at once when this replica has no fresh one (a delete through any replica sees it from
    then on); a thread renews the leases of held versions every `ttl_s / 4` and drops the others. If the
    database is down, requests still run (on the names this replica knows) and the leases are renewed when it is
    back. A replica killed leaves leases that expire after `ttl_s`.
    """

    def __init__(self, holds: RequestHolds, registry: PgAdapterRegistry, ttl_s: float = 20.0) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease_ttl_s={ttl_s} is invalid: must be > 0 seconds")
        self.holds, self.registry, self.ttl_s = holds, registry, ttl_s
        self._fresh: dict[str, float] = {}  # version -> monotonic time its lease is good until, as we know it
        self._lock = threading.Lock()
        # A renewal (snapshot of held versions, then the database) and a lease taken by `hold` never interleave:
        # the renewal would drop a lease taken after its snapshot.
        self._db_lock = threading.Lock()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="adapter-leases", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def hold(self, version_id: str) -> None:
        self.holds.hold(version_id)
        with self._lock:
            fresh = self._fresh.get(version_id, 0.0) - time.monotonic() > self.ttl_s / 2
        if fresh or not self.registry.available:  # never wait on a database known to be down
            return
        try:
            with self._db_lock:
                self.registry.lease(version_id, self.ttl_s)
        except AdapterNotFound:
            self.holds.release(version_id)
            raise
        except DatabaseUnavailable as e:  # runs on what this replica knows; renewed when the database is back
            self._note_failure(e)
            return
        with self._lock:
            self._fresh[version_id] = time.monotonic() + self.ttl_s

    def release(self, version_id: str) -> None:
        self.holds.release(version_id)  # the lease goes at the next renewal (a delete waits that long at most)

    def in_use(self, version_id: str) -> bool:
        return self.holds.requests_held().get(version_id, 0) > 0

    def renew(self) -> None:
        with self._db_lock:
            held = [vid for vid, n in self.holds.requests_held().items() if n > 0]
            t0 = time.monotonic()
            self.registry.renew_leases(held, self.ttl_s)
        with self._lock:
            self._fresh = {vid: t0 + self.ttl_s for vid in held}

    def _note_failure(self, e: Exception) -> None:
        if not self._failing:
            log.error("adapter leases: the database cannot be reached; requests keep running, leases are renewed "
                      "when it is back: %s", e)
        self._failing = True

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - the thread outlives a database outage
                self._note_failure(e)
            else:
                if self._failing:
                    log.warning("adapter leases: the database is reachable again")
                self._failing = False

    def close(self) -> None:
        """Stop renewing and drop this replica's leases (best effort: they expire anyway)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        try:
            self.registry.renew_leases([], self.ttl_s)
        except Exception as e:  # noqa: BLE001
            log.warning("adapter leases: not dropped at shutdown (they expire in %gs): %s", self.ttl_s, e)
