"""One SQLite file in WAL mode with a versioned, migrated schema, shared by threads under one lock: the base of
the adapter registry and the usage ledger."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", bound="SqliteFile")


class SqliteFile:
    def __init__(self, path: str | Path, *, schema: str, schema_version: int, what: str,
                 error: type[Exception], reentrant: bool = False, foreign_keys: bool = False,
                 named_rows: bool = False, migrations: Mapping[int, str] | None = None) -> None:
        """Create the schema in a new file, or bring an older file up to `schema_version` with `migrations`
        (version v -> the SQL that turns a version-v file into a version v + 1 one, applied in order, in one
        transaction); refuse a file of a newer version, or one no migration path reaches (`error`)."""
        self.path = Path(path)
        self._lock = threading.RLock() if reentrant else threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        if named_rows:
            self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed write survives power loss
        if foreign_keys:
            self._db.execute("PRAGMA foreign_keys=ON")
        with self._txn() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in schema.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {schema_version}")
            elif version != schema_version:
                steps = migrations or {}
                if version > schema_version or any(v not in steps for v in range(version, schema_version)):
                    raise error(f"{self.path} has {what} schema {version}; this server reads schema "
                                f"{schema_version}" + (" (written by a newer server)" if version > schema_version
                                                        else ""))
                for v in range(version, schema_version):
                    for statement in steps[v].split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute(f"PRAGMA user_version = {schema_version}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _txn(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        # Reads too run in a transaction: one consistent snapshot across their queries. Writes take the
        # write lock up front (IMMEDIATE), so a transaction never fails half-way on a read-to-write upgrade.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")  # inside the try: a failed COMMIT (deferred FK) must roll back too
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
