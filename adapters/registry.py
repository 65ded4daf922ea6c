"""Adapter metadata in SQLite: names, owners, immutable versions, the current version, visibility.

Model (the vocabulary and error-to-status mapping live in adapters.registry_types, re-exported here):
- An adapter is `(owner, name)`: names are unique per owner tenant, so two tenants never collide and
  registering a name never reveals another tenant's adapter. A reference is `[owner/]name[@version]`;
  version is a version id (`v-` + 24 hex) or `N`, the N-th version registered (1-based, never reused, so
  `name@N` always means the same content). An unqualified `name[@version]` means the caller's own
  `<caller>/name`, else the service's `local/name` (LOCAL_OWNER, `serve --adapter`), and nothing else, for
  admins too: another tenant's adapter, shared, public or (for an admin) any, is `owner/name`, so what other
  tenants publish never changes what a name means. An unqualified name matching neither is AdapterNotFound;
  its message lists (at most MAX_HINTS) `owner/name` forms of adapters of that name the caller can see.
- A version id is content-derived (adapters.identity) and immutable. The same content may sit under
  several adapters (its files are stored once); its files are deleted when no adapter refers to it.
- Every adapter has a current version: the first one registered is current, `promote` re-points it
  atomically (rollback = promoting an older one). The current version cannot be deleted: promote another
  one first or delete the whole adapter (an implicit re-point on delete would change what the name
  serves behind the owner's back).
- Visibility: the owner, tenants it was shared with, everyone if public (`share(..., "*")`), all for an
  admin. Anything else is AdapterNotFound with the message a missing adapter gets: existence never leaks.
  Only the owner (or an admin) changes an adapter; others that can see it get AdapterPermissionDenied.

Durability: WAL with synchronous=FULL, so a committed change survives power loss. One connection behind
one lock serves the threads of the process. Files go to the store before the row that names them.

The same code runs on PostgreSQL for replicas (adapters.pg_registry): its SQL is the common dialect of both
(`INSERT ... RETURNING`, `ON CONFLICT DO NOTHING`), and the few places where many processes need more than one
process's lock are hooks that class overrides (`_FOR_UPDATE`, `_version_lock`, `_check_not_in_use`,
`_drop_unreferenced`). Every re-pointing of a name is kept in its promote history (`history`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from adapters.errors import quote
from adapters.registry_types import (
    LOCAL_OWNER,
    MAX_DESCRIPTION_CHARS,
    NAME_RE,
    PUBLIC,
    TENANT_RE,
    AdapterExists,
    AdapterInfo,
    AdapterInUse,
    AdapterNotFound,
    AdapterPage,
    AdapterPermissionDenied,
    AdapterRef,
    AdapterVersion,
    InvalidAdapterName,
    InvalidPageToken,
    InvalidRegistryArgument,
    Promotion,
    Registered,
    RegistryError,
    VersionFilesMissing,
    VersionIsCurrent,
    VersionMeta,
    Visibility,
    check_name,
    check_tenant,
    decode_page_token,
    encode_page_token,
)
from adapters.sqlite_file import SqliteFile
from adapters.store import VERSION_ID_RE, Store, StoreError

__all__ = [  # the vocabulary of adapters.registry_types is re-exported: callers import from here
    "LOCAL_OWNER", "MAX_DESCRIPTION_CHARS", "NAME_RE", "PUBLIC", "TENANT_RE", "AdapterExists", "AdapterInUse",
    "AdapterInfo", "AdapterNotFound", "AdapterPage", "AdapterPermissionDenied", "AdapterRef", "AdapterRegistry",
    "AdapterVersion", "InvalidAdapterName", "InvalidPageToken", "InvalidRegistryArgument", "Promotion", "Registered",
    "RegistryError", "VersionFilesMissing", "VersionIsCurrent", "VersionMeta", "Visibility", "check_name",
    "check_tenant",
]

log = logging.getLogger(__name__)


DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # AIP-158: 0 means the default, more is coerced down
MAX_HINTS = 5  # `owner/name` forms a not-found unqualified name suggests
_SCHEMA_VERSION = 2
# Every change of an adapter's current version, numbered per adapter: `previous` is what the name served before.
_PROMOTIONS = """
CREATE TABLE promotions (
    adapter_id INTEGER NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    previous TEXT,
    current TEXT NOT NULL,
    by_tenant TEXT NOT NULL,
    PRIMARY KEY (adapter_id, seq)
)
"""
_MIGRATIONS = {1: _PROMOTIONS}
# adapters.(id, current_version) -> versions is DEFERRED: an adapter and its first version are inserted in
# one transaction, and no transaction can commit with an adapter's current version deleted. No ';' inside
# statements: the schema is split on it, to run inside the transaction that checks user_version.
_SCHEMA = """
CREATE TABLE adapters (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    current_version TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    UNIQUE (owner, name),
    FOREIGN KEY (id, current_version) REFERENCES versions (adapter_id, version_id) DEFERRABLE INITIALLY DEFERRED
);
CREATE TABLE versions (
    adapter_id INTEGER NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    version_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created_at REAL NOT NULL,
    description TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,
    base_model_id TEXT NOT NULL,
    PRIMARY KEY (adapter_id, version_id),
    UNIQUE (adapter_id, seq)
);
CREATE INDEX versions_by_id ON versions (version_id);
CREATE TABLE shares (
    adapter_id INTEGER NOT NULL REFERENCES adapters (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    PRIMARY KEY (adapter_id, tenant)
);
CREATE INDEX shares_by_tenant ON shares (tenant);
""" + _PROMOTIONS
_VISIBLE = ("(a.owner = :tenant OR a.public = 1 OR :admin OR EXISTS "
            "(SELECT 1 FROM shares s WHERE s.adapter_id = a.id AND s.tenant = :tenant))")
_VERSION_SELECT = "SELECT a.owner, a.name, v.* FROM versions v JOIN adapters a ON a.id = v.adapter_id"


class AdapterRegistry(SqliteFile):
    """Adapter names, owners, versions and visibility in one SQLite file.

    With a `store`, registering checks the version's files are stored, and deleting the last reference to
    a version deletes its files (after the commit: a crash in between leaves files that `gc_store` removes).
    """

    def __init__(self, path: str | Path, *, store: Store | None = None, clock: Callable[[], float] = time.time):
        self._store, self._clock = store, clock
        # Re-entrant: deletes commit and then drop the released files under the same hold.
        super().__init__(path, schema=_SCHEMA, schema_version=_SCHEMA_VERSION, what="registry", error=RegistryError,
                         reentrant=True, foreign_keys=True, named_rows=True, migrations=_MIGRATIONS)

    # --- what a database shared by processes does differently (adapters.pg_registry) -----------------------

    _FOR_UPDATE = ""  # appended to the SELECT of the adapter a write changes: its row lock across processes

    def _version_lock(self, db: Any, version_id: str) -> None:
        """Serialize, across processes, registering a version with deleting its files (the process lock suffices
        here)."""

    def _check_not_in_use(self, db: Any, in_use: Callable[[str], bool] | None, ids: Iterable[str],
                          ref: AdapterRef) -> None:
        busy = [vid for vid in ids if in_use is not None and in_use(vid)]
        if busy:
            raise AdapterInUse(f"adapter {ref.base!r} version {', '.join(busy)} is in use by running requests; "
                               f"retry when they have finished")

    # --- writes -------------------------------------------------------------------------------------------

    def register_version(self, owner: str, name: str, version_id: str, meta: VersionMeta,
                         promote: bool = True) -> Registered:
        """Record a version whose files are already in the store; create the adapter on its first version.

        Identical content re-uploaded to the same adapter returns the existing version (created=False);
        with promote it becomes current again. The first version of an adapter is always current.
        """
        self._check_version_args(owner, name, version_id)
        targets = json.dumps(meta.target_modules)
        with self._txn() as db:
            self._version_lock(db, version_id)
            self._check_stored(version_id)
            self._check_immutable(db, version_id, meta)
            now = self._clock()
            # Created here unless it exists (or another process creates it first: then its row is locked below).
            new = db.execute("INSERT INTO adapters (owner, name, created_at, current_version, next_seq) VALUES "
                             "(?, ?, ?, ?, 1) ON CONFLICT (owner, name) DO NOTHING RETURNING id",
                             (owner, name, now, version_id)).fetchone()
            row = db.execute(f"SELECT * FROM adapters WHERE owner = ? AND name = ?{self._FOR_UPDATE}",
                             (owner, name)).fetchone()
            adapter_id, next_seq, previous = row["id"], row["next_seq"], row["current_version"]
            if new is not None:
                previous, promote = None, True
            created = db.execute("SELECT 1 FROM versions WHERE adapter_id = ? AND version_id = ?",
                                 (adapter_id, version_id)).fetchone() is None
            if created:
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (adapter_id, version_id, next_seq, now, meta.description, meta.size_bytes, meta.rank,
                            targets, meta.base_model_id))
                db.execute("UPDATE adapters SET next_seq = ? WHERE id = ?", (next_seq + 1, adapter_id))
            if promote:
                db.execute("UPDATE adapters SET current_version = ? WHERE id = ?", (version_id, adapter_id))
                if previous != version_id:
                    self._record_promotion(db, adapter_id, previous, version_id, owner, now)
            version = self._version(db, adapter_id, "version_id", version_id)
            current = db.execute("SELECT current_version FROM adapters WHERE id = ?", (adapter_id,)).fetchone()[0]
        return Registered(version=version, created=created, current=current == version_id)

    def promote(self, tenant: str, name: str, version: str, *, admin: bool = False) -> AdapterVersion:
        """Point `name` ([owner/]name) at one of its versions (id or number); atomic."""
        ref = self._target(name, version)
        with self._txn() as db:
            row = self._find(db, tenant, admin, ref, lock=True)
            self._check_owner(row, tenant, admin, ref)
            v = self._find_version(db, row, ref)
            db.execute("UPDATE adapters SET current_version = ? WHERE id = ?", (v.version_id, row["id"]))
            self._record_promotion(db, row["id"], row["current_version"], v.version_id, tenant, self._clock())
        return v

    def history(self, tenant: str, name: str, *, admin: bool = False) -> list[Promotion]:
        """Every re-pointing of the adapter's name, oldest first (the first version registered is the first)."""
        ref = self._target(name)
        with self._txn(write=False) as db:
            row = self._find(db, tenant, admin, ref)
            return [Promotion(seq=r["seq"], at=r["at"], previous=r["previous"], current=r["current"],
                              by=r["by_tenant"])
                    for r in db.execute("SELECT * FROM promotions WHERE adapter_id = ? ORDER BY seq", (row["id"],))]

    @staticmethod
    def _record_promotion(db: Any, adapter_id: int, previous: str | None, current: str, by: str, at: float) -> None:
        db.execute("INSERT INTO promotions (adapter_id, seq, at, previous, current, by_tenant) SELECT ?, "
                   "COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ? FROM promotions WHERE adapter_id = ?",
                   (adapter_id, at, previous, current, by, adapter_id))

    def share(self, owner: str, name: str, tenants: Iterable[str] | str, *, admin: bool = False) -> AdapterInfo:
        """Let `tenants` see and use the adapter, or everyone with "*"."""
        return self._set_sharing(owner, name, tenants, admin, grant=True)

    def unshare(self, owner: str, name: str, tenants: Iterable[str] | str, *, admin: bool = False) -> AdapterInfo:
        """Undo `share`: "*" makes the adapter non-public (explicit shares stay)."""
        return self._set_sharing(owner, name, tenants, admin, grant=False)

    @staticmethod
    def _grantees(tenants: Iterable[str] | str) -> list[str] | None:
        """Checked tenant ids to share with, or None for everyone ("*")."""
        if isinstance(tenants, str) and tenants != PUBLIC:
            raise InvalidRegistryArgument(f"share with a list of tenant ids or {PUBLIC!r}, not {quote(tenants)}")
        return None if tenants == PUBLIC else sorted({check_tenant(t) for t in tenants})

    def _set_sharing(self, owner: str, name: str, tenants: Iterable[str] | str, admin: bool,
                     grant: bool) -> AdapterInfo:
        grantees = self._grantees(tenants)
        ref = self._target(name)
        with self._txn() as db:
            row = self._find(db, owner, admin, ref, lock=True)
            self._check_owner(row, owner, admin, ref)
            if grantees is None:
                db.execute("UPDATE adapters SET public = ? WHERE id = ?", (int(grant), row["id"]))
            elif grant:
                db.executemany("INSERT INTO shares VALUES (?, ?) ON CONFLICT DO NOTHING",
                               [(row["id"], t) for t in grantees if t != row["owner"]])
            else:
                db.executemany("DELETE FROM shares WHERE adapter_id = ? AND tenant = ?",
                               [(row["id"], t) for t in grantees])
            return self._info(db, row["id"], owner, admin, with_versions=False)

    def delete_version(self, tenant: str, name: str, version: str, *,
                       in_use: Callable[[str], bool] | None = None, admin: bool = False) -> tuple[str, ...]:
        """Delete one version that is not current; returns the version ids no adapter refers to any more.

        `in_use(version_id)` (e.g. the engine's holders) refuses the delete with AdapterInUse; it is called
        under the registry lock, so it must not call the registry.
        """
        ref = self._target(name, version)
        with self._lock:
            with self._txn() as db:
                row = self._find(db, tenant, admin, ref, lock=True)
                self._check_owner(row, tenant, admin, ref)
                v = self._find_version(db, row, ref)
                self._check_not_current(row, v, ref)
                self._check_not_in_use(db, in_use, [v.version_id], ref)
                db.execute("DELETE FROM versions WHERE adapter_id = ? AND version_id = ?",
                           (row["id"], v.version_id))
            return self._drop_unreferenced([v.version_id])

    def delete_adapter(self, tenant: str, name: str, *, in_use: Callable[[str], bool] | None = None,
                       admin: bool = False) -> tuple[str, ...]:
        """Delete an adapter with all its versions and shares; returns the version ids released."""
        ref = self._target(name)
        with self._lock:
            with self._txn() as db:
                row = self._find(db, tenant, admin, ref, lock=True)
                self._check_owner(row, tenant, admin, ref)
                ids = [r[0] for r in db.execute("SELECT version_id FROM versions WHERE adapter_id = ? "
                                                "ORDER BY seq", (row["id"],))]
                self._check_not_in_use(db, in_use, ids, ref)
                db.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
            return self._drop_unreferenced(ids)

    def gc_store(self) -> tuple[str, ...]:
        """Delete stored files no version refers to (left by a crash between put and register, or between
        a delete's commit and its file removal). Run it before serving: an upload between its put and its
        register would lose its files (and fail cleanly with VersionFilesMissing)."""
        if self._store is None:
            return ()
        with self._lock:
            return self._drop_unreferenced(self._store.list_ids())

    def release_files(self, ids: Iterable[str]) -> tuple[str, ...]:
        """Delete the stored files of those of `ids` no adapter refers to; returns them."""
        return self._drop_unreferenced(ids)

    def _drop_unreferenced(self, ids: Iterable[str]) -> tuple[str, ...]:
        # Under the lock, so no register can add a reference between the check and the file removal.
        with self._lock:
            referenced = self.referenced_version_ids()
            released = tuple(dict.fromkeys(vid for vid in ids if vid not in referenced))
            for vid in released if self._store is not None else ():
                try:
                    self._store.delete(vid)  # type: ignore[union-attr]
                except (OSError, StoreError) as e:  # the metadata is gone already; gc_store retries later
                    log.warning("could not delete the files of released version %s: %s", vid, e)
            return released

    # --- reads --------------------------------------------------------------------------------------------

    def resolve(self, tenant: str, ref: str, *, admin: bool = False) -> AdapterVersion:
        """The version `ref` (`[owner/]name[@version]`) means for `tenant`: the current one without @."""
        parsed = AdapterRef.parse(ref)
        with self._txn(write=False) as db:
            return self._find_version(db, self._find(db, tenant, admin, parsed), parsed)

    def get(self, tenant: str, name: str, *, admin: bool = False) -> AdapterInfo:
        """An adapter `tenant` can see, with all its versions."""
        ref = self._target(name)
        with self._txn(write=False) as db:
            row = self._find(db, tenant, admin, ref)
            return self._info(db, row["id"], tenant, admin, with_versions=True)

    def referenced_version_ids(self) -> frozenset[str]:
        with self._txn(write=False) as db:
            return frozenset(r[0] for r in db.execute("SELECT DISTINCT version_id FROM versions"))

    def list(self, tenant: str, page_size: int = 0, page_token: str = "", *, admin: bool = False) -> AdapterPage:
        """Adapters `tenant` can see, ordered by (name, owner). Keyset paging: a page token names the last
        adapter returned, so pages stay stable while adapters are added or removed."""
        check_tenant(tenant)
        if page_size < 0:
            raise InvalidRegistryArgument(f"page_size must not be negative (got {page_size})")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else ("", "")
        with self._txn(write=False) as db:
            rows = db.execute(
                f"SELECT a.id, a.name, a.owner FROM adapters a WHERE {_VISIBLE} AND (a.name, a.owner) > "
                f"(:name, :owner) ORDER BY a.name, a.owner LIMIT :limit",
                {"tenant": tenant, "admin": admin, "name": after[0], "owner": after[1], "limit": size + 1},
            ).fetchall()
            infos = tuple(self._info(db, r["id"], tenant, admin, with_versions=False) for r in rows[:size])
        token = encode_page_token(rows[size - 1]["name"], rows[size - 1]["owner"]) if len(rows) > size else ""
        return AdapterPage(adapters=infos, next_page_token=token)

    # --- helpers (called inside a transaction) ------------------------------------------------------------

    @staticmethod
    def _target(name: str, version: str | int | None = None) -> AdapterRef:
        ref = AdapterRef.parse(name)
        if ref.version is not None:
            raise InvalidAdapterName(f"{quote(name)}: name the adapter without '@version' here")
        if version is None:
            return ref
        return AdapterRef.parse(f"{ref.base}@{version}")

    def _find(self, db: sqlite3.Connection, tenant: str, admin: bool, ref: AdapterRef,
              lock: bool = False) -> sqlite3.Row:
        """The adapter `ref` names for `tenant` (the first visible one of `ref.owners`); AdapterNotFound for
        invisible ones as for missing ones. `lock`: a write follows (its row is locked where that means
        anything)."""
        check_tenant(tenant)
        args = {"tenant": tenant, "admin": admin, "name": ref.name}
        suffix = self._FOR_UPDATE if lock else ""
        for owner in ref.owners(tenant):
            row = db.execute(f"SELECT * FROM adapters a WHERE a.owner = :owner AND a.name = :name AND {_VISIBLE}"
                             f"{suffix}", {**args, "owner": owner}).fetchone()
            if row is not None:
                return row
        raise AdapterNotFound(f"adapter {ref.base!r} not found{self._qualified_hint(db, args, ref)}")

    @staticmethod
    def _qualified_hint(db: sqlite3.Connection, args: dict, ref: AdapterRef) -> str:
        """For an unqualified name: the `owner/name` forms of the adapters of that name the caller can see."""
        if ref.owner is not None:
            return ""
        owners = [r[0] for r in db.execute(f"SELECT a.owner FROM adapters a WHERE a.name = :name AND {_VISIBLE} "
                                           "ORDER BY a.owner LIMIT :limit", {**args, "limit": MAX_HINTS + 1})]
        if not owners:
            return ""
        at = f"@{ref.version}" if ref.version is not None else ""
        refs = ", ".join(f"{o}/{ref.name}{at}" for o in owners[:MAX_HINTS])
        more = ", ..." if len(owners) > MAX_HINTS else ""
        return (f" (a name without an owner is your own adapter or the service's; other tenants' adapters of "
                f"that name you can use: {refs}{more})")

    def _find_version(self, db: sqlite3.Connection, row: sqlite3.Row, ref: AdapterRef) -> AdapterVersion:
        if ref.version is None:
            return self._version(db, row["id"], "version_id", row["current_version"])
        column = "version_id" if ref.version.startswith("v-") else "seq"
        value = ref.version if column == "version_id" else int(ref.version)
        try:
            return self._version(db, row["id"], column, value)
        except LookupError:
            raise AdapterNotFound(f"adapter {ref.base!r} has no version {ref.version!r}") from None

    @staticmethod
    def _version(db: sqlite3.Connection, adapter_id: int, column: str, value: str | int) -> AdapterVersion:
        r = db.execute(f"{_VERSION_SELECT} WHERE v.adapter_id = ? AND v.{column} = ?",
                       (adapter_id, value)).fetchone()
        if r is None:
            raise LookupError(value)
        return _to_version(r)

    @staticmethod
    def _check_owner(row: sqlite3.Row, tenant: str, admin: bool, ref: AdapterRef) -> None:
        if not admin and row["owner"] != tenant:
            raise AdapterPermissionDenied(f"adapter {ref.base!r} belongs to tenant {row['owner']!r}; only its "
                                          f"owner can change it")

    @staticmethod
    def _check_version_args(owner: str, name: str, version_id: object) -> None:
        check_tenant(owner)
        check_name(name)
        if not isinstance(version_id, str) or VERSION_ID_RE.fullmatch(version_id) is None:
            raise InvalidRegistryArgument(f"{quote(version_id)} is not an adapter version id")

    def _check_stored(self, version_id: str) -> None:
        if self._store is not None and not self._store.exists(version_id):
            raise VersionFilesMissing(f"the files of version {version_id} are not in the adapter store "
                                      f"(removed by a concurrent delete?); upload the adapter again")

    @staticmethod
    def _check_immutable(db: sqlite3.Connection, version_id: str, meta: VersionMeta) -> None:
        known = db.execute("SELECT rank, target_modules, base_model_id FROM versions WHERE version_id = ? "
                           "LIMIT 1", (version_id,)).fetchone()
        if known is not None and tuple(known) != (meta.rank, json.dumps(meta.target_modules), meta.base_model_id):
            raise AdapterExists(f"version {version_id} is already registered with other metadata (rank "
                                f"{known['rank']}, base model {known['base_model_id']!r}); versions are "
                                f"immutable")

    @staticmethod
    def _check_not_current(row: sqlite3.Row, v: AdapterVersion, ref: AdapterRef) -> None:
        if v.version_id == row["current_version"]:
            raise VersionIsCurrent(f"version {v.version_id} (#{v.number}) is the current version of adapter "
                                   f"{ref.base!r}: promote another version first, or delete the whole adapter")

    def _info(self, db: sqlite3.Connection, adapter_id: int, tenant: str, admin: bool,
              with_versions: bool) -> AdapterInfo:
        a = db.execute("SELECT * FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
        shares = tuple(r[0] for r in db.execute("SELECT tenant FROM shares WHERE adapter_id = ? ORDER BY tenant",
                                                (adapter_id,)))
        versions = tuple(_to_version(r) for r in db.execute(f"{_VERSION_SELECT} WHERE v.adapter_id = ? ORDER BY "
                                                            "v.seq", (adapter_id,))) if with_versions else ()
        count = len(versions) if with_versions else db.execute(
            "SELECT COUNT(*) FROM versions WHERE adapter_id = ?", (adapter_id,)).fetchone()[0]
        visibility: Visibility = "public" if a["public"] else "shared" if shares else "private"
        return AdapterInfo(
            owner=a["owner"], name=a["name"], created_at=a["created_at"], visibility=visibility,
            shared_with=shares if admin or a["owner"] == tenant else (),
            current=self._version(db, adapter_id, "version_id", a["current_version"]),
            num_versions=count, versions=versions,
        )


def _to_version(r: sqlite3.Row) -> AdapterVersion:
    return AdapterVersion(
        owner=r["owner"], name=r["name"], version_id=r["version_id"], number=r["seq"], created_at=r["created_at"],
        description=r["description"], size_bytes=r["size_bytes"], rank=r["rank"],
        target_modules=tuple(json.loads(r["target_modules"])), base_model_id=r["base_model_id"],
    )
