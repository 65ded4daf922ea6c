"""Replicas sharing one bucket: the adapter names live in the bucket's name documents (adapters.s3_names); each
replica's SQLite registry is a copy of them that answers every read (resolve, get, list) without a network call.

Writes (register, promote, share, unshare, delete) made through this replica, one at a time: read the adapter's
document fresh into SQLite, run the registry's checks there (visibility, owner, current version, in use: the
same errors a single server gives), change the document with a conditional write, then replace the adapter's
SQLite rows with the document written. The replica that made a change serves it at once.

Reads of other replicas' changes: a thread calls `NameBoard.changes()` every `refresh_s` seconds, replaces the
rows of each changed adapter from its document (version numbers as the document has them) and drops adapters
whose documents vanished. A change made through another replica is served here within `refresh_s` plus the
time of two passes (a pass that just missed it, and the next; each one LIST and one GET per changed adapter,
tens of milliseconds on a healthy bucket). A document is written only after the files of the versions it
names are committed to the store, and it replaces an adapter's rows in one transaction: a replica never
names a version whose files are incomplete.

Files: a delete removes the files of the versions it released once no document names them any more (checked
with a fresh pass over the documents). Known gaps: files a crash left between a put and its document are not
collected (not at open either: another replica may be between its put and its document); requests running
on one replica do not stop another replica from deleting their version (one whose weights are loaded
finishes; one whose version was not loaded yet fails to load it).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from adapters.registry import (
    AdapterInfo,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    AdapterVersion,
    Registered,
    VersionMeta,
)
from adapters.s3_names import NameBoard
from adapters.s3_store import S3Store

__all__ = ["ReplicatedRegistry"]

log = logging.getLogger(__name__)

Doc = dict[str, Any]


class ReplicatedRegistry(AdapterRegistry):
    """An AdapterRegistry whose names are the bucket's documents: same methods, same errors, shared by replicas.

    Opening it brings SQLite to exactly the bucket's names (adapters of an earlier run that are not in the
    bucket are dropped). `start()` runs the refresh thread; `close()` stops it.
    """

    def __init__(self, path: str | Path, *, store: S3Store, board: NameBoard | None = None, refresh_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not refresh_s > 0:
            raise ValueError(f"refresh_s={refresh_s} is invalid: must be > 0 seconds")
        super().__init__(path, store=store, clock=clock)
        self._board = board or NameBoard.for_store(store, clock=clock)
        self.refresh_s = refresh_s
        # One writer of documents and of their SQLite copy at a time (this replica's writes and the refresh
        # passes), so an older document read by a pass never replaces a newer one written meanwhile.
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first_pass = True
        try:
            self.sync()
        except BaseException:
            super().close()
            raise

    # --- the refresh thread -------------------------------------------------------------------------------

    def start(self) -> ReplicatedRegistry:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="replica-sync", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # a pass stuck on the bucket is a daemon thread: not waited for
        super().close()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.refresh_s):
            try:
                self.sync()
            except Exception as e:  # the thread must outlive a flaky bucket: the next pass retries
                if not failing and not self._stop.is_set():
                    log.error("adapter names: refreshing from the bucket failed (retrying every %gs): %s",
                              self.refresh_s, e)
                failing = True
            else:
                if failing:
                    log.warning("adapter names: refreshing from the bucket works again")
                failing = False

    def sync(self) -> int:
        """One pass: apply every document changed since the last pass and drop vanished adapters; returns how
        many adapters changed."""
        with self._sync_lock:
            return self._sync_locked()

    def _sync_locked(self) -> int:
        feed = self._board.changes()
        for key, problem in feed.invalid.items():
            log.error("adapter names: skipping %s: %s", key, problem)
        gone = set(feed.removed)
        if self._first_pass:  # SQLite may hold adapters of an earlier run that the bucket no longer has
            gone |= self.adapter_keys() - feed.updated.keys()
        applied = sum(self._apply(doc, strict=False) for doc in feed.updated.values())
        removed = self.remove_adapters(gone)
        self._first_pass = False
        if applied or removed:
            log.info("adapter names: %d adapters refreshed from the bucket, %d removed", applied, removed)
        return applied + removed

    # --- writes -------------------------------------------------------------------------------------------

    def register_version(self, owner: str, name: str, version_id: str, meta: VersionMeta,
                         promote: bool = True) -> Registered:
        self._check_version_args(owner, name, version_id)
        with self._sync_lock:
            self._check_stored(version_id)
            self._pull(owner, name)
            with self._txn(write=False) as db:
                self._check_immutable(db, version_id, meta)
                created = db.execute("SELECT 1 FROM versions v JOIN adapters a ON a.id = v.adapter_id WHERE "
                                     "a.owner = ? AND a.name = ? AND v.version_id = ?",
                                     (owner, name, version_id)).fetchone() is None
            doc = self._board.add_version(owner, name, {
                "version_id": version_id, "created_at": self._clock(), "description": meta.description,
                "size_bytes": meta.size_bytes, "rank": meta.rank, "target_modules": list(meta.target_modules),
                "base_model_id": meta.base_model_id}, promote=promote, by=owner)
            self._apply(doc)
            version = self.resolve(owner, f"{owner}/{name}@{version_id}")
        return Registered(version=version, created=created, current=doc["current"] == version_id)

    def promote(self, tenant: str, name: str, version: str, *, admin: bool = False) -> AdapterVersion:
        ref = self._target(name, version)
        with self._sync_lock:
            row, v = self._checked(tenant, admin, ref)
            self._apply(self._missing_as_not_found(
                lambda: self._board.promote(row["owner"], row["name"], v.version_id, by=tenant)))
        return v

    def _set_sharing(self, owner: str, name: str, tenants: Iterable[str] | str, admin: bool,
                     grant: bool) -> AdapterInfo:
        grantees = self._grantees(tenants)
        ref = self._target(name)
        with self._sync_lock:
            row, _ = self._checked(owner, admin, ref)
            self._apply(self._missing_as_not_found(
                lambda: self._board.share(row["owner"], row["name"], grantees, grant=grant)))
            with self._txn(write=False) as db:
                row = self._find(db, owner, admin, AdapterRef(row["owner"], row["name"]))
                return self._info(db, row["id"], owner, admin, with_versions=False)

    def delete_version(self, tenant: str, name: str, version: str, *,
                       in_use: Callable[[str], bool] | None = None, admin: bool = False) -> tuple[str, ...]:
        ref = self._target(name, version)
        with self._sync_lock:
            row, v = self._checked(tenant, admin, ref)
            self._check_not_current(row, v, ref)
            self._check_not_in_use(in_use, [v.version_id], ref)
            self._apply(self._missing_as_not_found(
                lambda: self._board.remove_version(row["owner"], row["name"], v.version_id)))
            return self._release([v.version_id])

    def delete_adapter(self, tenant: str, name: str, *, in_use: Callable[[str], bool] | None = None,
                       admin: bool = False) -> tuple[str, ...]:
        ref = self._target(name)
        with self._sync_lock:
            row, _ = self._checked(tenant, admin, ref)
            # The ids as the document has them right before the delete (another replica may have added one).
            doc = self._board.remove(row["owner"], row["name"], lambda d: self._check_not_in_use(
                in_use, [x["version_id"] for x in d["versions"]], ref))
            self.remove_adapters([(row["owner"], row["name"])])
            if doc is None:
                raise AdapterNotFound(f"adapter {ref.base!r} not found")
            return self._release([x["version_id"] for x in doc["versions"]])

    def gc_store(self) -> tuple[str, ...]:
        """Nothing: another replica may be between storing a version's files and writing its document."""
        return ()

    # --- helpers (called with the sync lock held) ---------------------------------------------------------

    def _checked(self, tenant: str, admin: bool, ref: AdapterRef) -> tuple[sqlite3.Row, AdapterVersion | None]:
        """The adapter (and version) `ref` names for a change by `tenant`. The documents of the owners it may
        mean (`ref.owners`: for a bare name the tenant's own, then the service's) are read fresh, in order,
        up to the first that exists, so the choice is the one a single server would make."""
        for owner in ref.owners(tenant):
            if self._pull(owner, ref.name):
                break
        with self._txn(write=False) as db:
            row = self._find(db, tenant, admin, ref)
            self._check_owner(row, tenant, admin, ref)
            v = self._find_version(db, row, ref) if ref.version is not None else None
        return row, v

    def _pull(self, owner: str, name: str) -> bool:
        """Bring one adapter's rows to its document; whether the bucket has it."""
        doc = self._board.read(owner, name)
        if doc is None:
            self.remove_adapters([(owner, name)])
        else:
            self._apply(doc, strict=False)
        return doc is not None

    def _apply(self, doc: Doc, strict: bool = True) -> bool:
        """Replace the adapter's rows with the document; a malformed one is skipped (strict: raises)."""
        try:
            self.replace_adapter(
                doc["owner"], doc["name"], created_at=float(doc["created_at"]), public=bool(doc["public"]),
                shares=doc["shares"], current=doc["current"], next_seq=doc["next_seq"], versions=[
                    AdapterVersion(owner=doc["owner"], name=doc["name"], version_id=v["version_id"], number=v["seq"],
                                   created_at=float(v["created_at"]), description=str(v["description"]),
                                   size_bytes=int(v["size_bytes"]), rank=int(v["rank"]),
                                   target_modules=tuple(v["target_modules"]), base_model_id=str(v["base_model_id"]))
                    for v in doc["versions"]])
        except (KeyError, TypeError, ValueError, sqlite3.IntegrityError) as e:  # incl. InvalidRegistryArgument
            if strict:
                raise
            log.error("adapter names: skipping the malformed document of %s/%s: %s", doc.get("owner"),
                      doc.get("name"), e)
            return False
        return True

    @staticmethod
    def _missing_as_not_found(write: Callable[[], Doc]) -> Doc:
        try:
            return write()
        except LookupError as e:  # removed through another replica between our read and our write
            raise AdapterNotFound(str(e)) from None

    def _release(self, ids: Iterable[str]) -> tuple[str, ...]:
        """Delete the files of `ids` that no document names: SQLite first catches up with every document."""
        try:
            self._sync_locked()
        except Exception as e:  # the names changed already; leave the files rather than risk another's
            log.error("adapter names: not deleting the files of %s: the bucket's names could not be read: %s",
                      sorted(ids), e)
            return ()
        return self.release_files(ids)
