"""One PostgreSQL database shared by replicas: a psycopg 3 connection pool, versioned schemas migrated at start,
and transactions that take the SQL the SQLite code writes (`?` and `:name` placeholders).

- Schemas: each component (the registry, the usage ledger) keeps its version in `loraserve_schema` and brings
  the database up to it at start, under an advisory lock, so replicas starting together migrate once. A database
  whose schema is newer than this server reads is refused (SchemaTooNew): an older replica must not write
  tables it does not understand.
- Availability: a connection that cannot be had, or breaks mid-transaction, is DatabaseUnavailable (gRPC
  UNAVAILABLE: retry). `available` says whether the last transaction reached the database; the registry uses it
  to answer inference from what it knows without waiting on a database that is down.
- Rows answer by index and by column name, as sqlite3.Row does, so one body of SQL code serves both databases.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool

from adapters.registry_types import DatabaseUnavailable

__all__ = ["BYTE_ORDER_TEXT", "PgDatabase", "PgRow", "SchemaTooNew", "redact_url", "to_pg_sql"]

SCHEMA_TABLE = "loraserve_schema"
# Text columns compared in byte order, as SQLite compares: listings, keyset paging and page tokens sort the same on
# both databases.
BYTE_ORDER_TEXT = 'TEXT COLLATE "C"'
_MIGRATE_LOCK = 0x6C6F7261  # pg_advisory_xact_lock key of schema changes ("lora")


class SchemaTooNew(ValueError):
    """The database was migrated by a newer server; this one must not use it."""


def redact_url(url: str) -> str:
    """`url` without its password, for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an unparsable database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=1024)
def to_pg_sql(sql: str) -> str:
    """SQLite placeholders -> psycopg's: `?` -> `%s`, `:name` -> `%(name)s` (a literal `%` doubled)."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%").replace("?", "%s"))


class PgRow(Sequence):
    """A row by index or by column name (sqlite3.Row's interface)."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: Sequence[Any], names: Mapping[str, int]) -> None:
        self._values, self._names = tuple(values), names

    def __getitem__(self, key: int | str | slice) -> Any:  # type: ignore[override]
        return self._values[self._names[key]] if isinstance(key, str) else self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __eq__(self, other: object) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, PgRow)) else NotImplemented

    def __repr__(self) -> str:
        return f"PgRow({self._values!r})"


def _row_factory(cursor: psycopg.Cursor) -> Any:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, names)


class PgTxn:
    """A transaction's connection with sqlite3's execute / executemany."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> psycopg.Cursor:
        cur = self.conn.cursor(row_factory=_row_factory)
        cur.execute(to_pg_sql(sql), params)  # type: ignore[arg-type]
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> psycopg.Cursor:
        cur = self.conn.cursor(row_factory=_row_factory)
        rows = list(rows)
        if rows:
            cur.executemany(to_pg_sql(sql), rows)
        return cur


def _unreachable(e: BaseException) -> bool:
    """The database could not be used at all (connection refused, lost, shut down, pool exhausted), as against
    an error of the statement itself."""
    if isinstance(e, (psycopg_pool.PoolTimeout, psycopg.InterfaceError)):
        return True
    if isinstance(e, psycopg.OperationalError):
        state = getattr(e, "sqlstate", None)
        return state is None or state.startswith(("08", "57P"))
    return False


class PgDatabase:
    """A pool of connections to one PostgreSQL database (`postgresql://user:password@host:port/db`)."""

    def __init__(self, url: str, *, pool_size: int = 8, connect_timeout_s: float = 5.0, name: str = "loraserve"):
        """Connects once at once (a clear error if it cannot: DatabaseUnavailable), then opens the pool."""
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._kwargs = {"connect_timeout": max(1, round(connect_timeout_s)), "application_name": name}
        self._available = threading.Event()
        with self.connect():  # the error of a first connection names the problem; the pool's would not
            pass
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=self._kwargs, timeout=connect_timeout_s, open=False,
            check=psycopg_pool.ConnectionPool.check_connection, name=name, reconnect_timeout=365 * 86400.0)
        self.pool.open(wait=False)
        self._available.set()

    def __repr__(self) -> str:
        return f"PgDatabase({redact_url(self.url)})"

    @property
    def available(self) -> bool:
        """Whether the last attempt to use the database reached it."""
        return self._available.is_set()

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        """A connection of its own, outside the pool (LISTEN, schema changes)."""
        try:
            conn = psycopg.connect(self.url, autocommit=True, **self._kwargs)
        except Exception as e:
            if isinstance(e, psycopg.Error):
                self._available.clear()
                raise DatabaseUnavailable(f"the database {redact_url(self.url)} cannot be reached: "
                                          f"{_first_line(e)}") from None
            raise
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def txn(self, write: bool = True) -> Iterator[PgTxn]:
        """One transaction (READ COMMITTED; writers lock the rows they change with FOR UPDATE)."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield PgTxn(conn)
        except Exception as e:
            if _unreachable(e):
                self._available.clear()
                raise DatabaseUnavailable(f"the control-plane database is unreachable ({_first_line(e)}); "
                                          "retry when it is back") from None
            raise
        self._available.set()

    def migrate(self, component: str, version: int, steps: Mapping[int, str]) -> None:
        """Bring `component`'s tables to `version`: steps[v] turns version v into v + 1 (steps[0] creates them),
        all in one transaction under a lock; SchemaTooNew if the database has a newer version."""
        with self.connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (component TEXT PRIMARY KEY, "
                         "version INTEGER NOT NULL, migrated_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            row = conn.execute(f"SELECT version FROM {SCHEMA_TABLE} WHERE component = %s", (component,)).fetchone()
            have = 0 if row is None else row[0]
            if have > version:
                raise SchemaTooNew(f"the database {redact_url(self.url)} has {component} schema {have}, written by a "
                                   f"newer loraserve; this server reads schema {version}: upgrade this server (it "
                                   f"will not write tables it does not understand)")
            if have == version:
                return
            missing = [v for v in range(have, version) if v not in steps]
            if missing:
                raise SchemaTooNew(f"the database has {component} schema {have} and this server has no migration "
                                   f"from schema {missing[0]}")
            for v in range(have, version):
                conn.execute(steps[v])  # type: ignore[arg-type]
            conn.execute(f"INSERT INTO {SCHEMA_TABLE} (component, version) VALUES (%s, %s) ON CONFLICT (component) "
                         "DO UPDATE SET version = EXCLUDED.version, migrated_at = now()", (component, version))

    def close(self) -> None:
        self.pool.close(timeout=5.0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
