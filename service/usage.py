"""The usage ledger: one row per finished request in SQLite, and the aggregate queries billing needs.

- Exactly once: a row is keyed by the request id and inserted with INSERT OR IGNORE, so a retried write
  (or a second code path reporting the same request) never double-counts.
- A request counts in the window and the time bucket that holds its end_time: requests are recorded when
  they finish, so once a window is over its totals no longer change.
- Windows are half-open, [start_time, end_time). Buckets are `bucket_s` seconds aligned to the unix epoch,
  clipped to the window; only buckets with requests are returned.
- Cost is an estimate from the server's configured prices (`Pricing`), computed at query time from the
  token totals: the ledger stores usage, not money, so a price change applies to every past window.

Durability as adapters.registry: WAL with synchronous=FULL, every record its own committed transaction;
one connection behind one lock for all threads of the process.

With replicas (database.url = postgresql://...), this SQLite ledger is each replica's durable outbox: rows are
recorded here first, then copied to the shared ledger in PostgreSQL (service.usage_pg) and marked exported
(`exported_at`). The query code (UsageQueries) is the same on both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapters.registry_types import InvalidRegistryArgument, check_name, check_tenant
from adapters.sqlite_file import SqliteFile

__all__ = [
    "DEFAULT_PAGE_SIZE", "FRONTS", "GROUP_BY", "MAX_BUCKETS", "MAX_PAGE_SIZE", "STATUSES", "InvalidUsageArgument",
    "LedgerError", "Pricing", "UsageLedger", "UsageRecord", "UsageRow",
]

STATUSES = ("ok", "failed", "cancelled")
GROUP_BY = ("tenant", "adapter", "adapter_version")
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # as the registry: 0 means the default, more is coerced down
MAX_BUCKETS = 10_000
_MAX_ID_CHARS = 256
_SCHEMA_VERSION = 4
# version -> the SQL that brings a file of that version to the next one
_MIGRATIONS = {1: "ALTER TABLE usage ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
               2: "ALTER TABLE usage ADD COLUMN front TEXT NOT NULL DEFAULT 'grpc'",
               3: "ALTER TABLE usage ADD COLUMN exported_at REAL; "
                  "CREATE INDEX usage_unexported ON usage (recorded_at) WHERE exported_at IS NULL"}
FRONTS = ("grpc", "http")  # which front served a request
_SCHEMA = """
CREATE TABLE usage (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    adapter TEXT NOT NULL,
    adapter_version TEXT NOT NULL,
    start_time REAL NOT NULL,
    end_time REAL NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    engine_seconds REAL NOT NULL,
    status TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    front TEXT NOT NULL DEFAULT 'grpc',
    exported_at REAL
);
CREATE INDEX usage_by_time ON usage (end_time);
CREATE INDEX usage_by_tenant ON usage (tenant, end_time);
CREATE INDEX usage_by_adapter ON usage (adapter, end_time);
CREATE INDEX usage_unexported ON usage (recorded_at) WHERE exported_at IS NULL;
"""


class LedgerError(Exception):
    """The ledger file cannot be used (e.g. written by another schema version)."""


class InvalidUsageArgument(LedgerError, ValueError):
    """A bad record or query argument; the message names the field and what is allowed."""


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidUsageArgument(f"{name}={value!r} is invalid: expected an integer >= 0")


def _check_seconds(name: str, value: object) -> float:
    if not _is_number(value) or value < 0:
        raise InvalidUsageArgument(f"{name}={value!r} is invalid: expected a finite number of seconds >= 0")
    return float(value)


def _check_price(name: str, value: object) -> None:
    if not _is_number(value) or value < 0:
        raise InvalidUsageArgument(f"{name}={value!r} is invalid: a price is a finite number >= 0")


def _check_adapter(name: str, value: object) -> None:
    """`owner/name`, or "" for the base model."""
    if value == "":
        return
    owner, slash, adapter = value.partition("/") if isinstance(value, str) else ("", "", "")
    try:
        if not slash:
            raise InvalidRegistryArgument("no '/'")
        check_tenant(owner)
        check_name(adapter)
    except InvalidRegistryArgument:
        raise InvalidUsageArgument(f"{name}={repr(value)[:80]} is invalid: expected the canonical adapter "
                                   f"name owner/name, or \"\" for the base model") from None


@dataclass(frozen=True)
class Pricing:
    """Prices per 1000 tokens. Cached input tokens cost `cached_input_per_1k`, the other input tokens
    `input_per_1k`."""

    input_per_1k: float = 0.0
    cached_input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    unit: str = "USD"

    def __post_init__(self) -> None:
        for name in ("input_per_1k", "cached_input_per_1k", "output_per_1k"):
            _check_price(name, getattr(self, name))
        if not isinstance(self.unit, str) or not self.unit.strip():
            raise InvalidUsageArgument(f"unit={self.unit!r} is invalid: name the currency, e.g. USD")

    def cost(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> float:
        for name, v in (("input_tokens", input_tokens), ("cached_input_tokens", cached_input_tokens),
                        ("output_tokens", output_tokens)):
            _check_count(name, v)
        if cached_input_tokens > input_tokens:
            raise InvalidUsageArgument(f"cached_input_tokens={cached_input_tokens} is more than "
                                       f"input_tokens={input_tokens}; cached tokens are part of the input")
        uncached = input_tokens - cached_input_tokens
        return (uncached * self.input_per_1k + cached_input_tokens * self.cached_input_per_1k
                + output_tokens * self.output_per_1k) / 1000.0


@dataclass(frozen=True)
class UsageRecord:
    """What one finished request used. `input_tokens` includes `cached_input_tokens` (prefix-cache hits)."""

    request_id: str
    tenant: str
    adapter: str  # canonical `owner/name`; "" for the base model
    adapter_version: str  # the version id; "" for the base model
    start_time: float  # unix seconds
    end_time: float
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    engine_seconds: float
    status: str  # one of STATUSES
    labels: Mapping[str, str] = field(default_factory=dict)  # the caller's own labels of the request
    front: str = "grpc"  # the front that served it: one of FRONTS

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not 0 < len(self.request_id) <= _MAX_ID_CHARS:
            raise InvalidUsageArgument(f"request_id={repr(self.request_id)[:80]} is invalid: expected 1 to "
                                       f"{_MAX_ID_CHARS} characters")
        try:
            check_tenant(self.tenant)
        except InvalidRegistryArgument as e:
            raise InvalidUsageArgument(f"tenant: {e}") from None
        _check_adapter("adapter", self.adapter)
        if not isinstance(self.adapter_version, str) or len(self.adapter_version) > _MAX_ID_CHARS \
                or (self.adapter_version == "") != (self.adapter == ""):
            raise InvalidUsageArgument(f"adapter_version={repr(self.adapter_version)[:80]} is invalid: "
                                       f"expected the version id of adapter {self.adapter!r}, or \"\" "
                                       f"exactly when adapter is \"\" (the base model)")
        start = _check_seconds("start_time", self.start_time)
        if _check_seconds("end_time", self.end_time) < start:
            raise InvalidUsageArgument(f"end_time={self.end_time} is before start_time={self.start_time}")
        for name in ("input_tokens", "cached_input_tokens", "output_tokens"):
            _check_count(name, getattr(self, name))
        if self.cached_input_tokens > self.input_tokens:
            raise InvalidUsageArgument(f"cached_input_tokens={self.cached_input_tokens} is more than "
                                       f"input_tokens={self.input_tokens}; cached tokens are part of the "
                                       f"input")
        _check_seconds("engine_seconds", self.engine_seconds)
        if self.status not in STATUSES:
            raise InvalidUsageArgument(f"status={self.status!r} is invalid: expected one of "
                                       f"{', '.join(STATUSES)}")
        if self.front not in FRONTS:
            raise InvalidUsageArgument(f"front={self.front!r} is invalid: expected one of {', '.join(FRONTS)}")


@dataclass(frozen=True)
class UsageRow:
    """Totals of one group (and bucket). tenant, adapter, adapter_version are "" unless grouped or filtered
    by (a tenant or adapter filter fills its field: every row belongs to it)."""

    tenant: str
    adapter: str
    adapter_version: str
    start_time: float  # the bucket, or the query window, clipped to the window: [start_time, end_time)
    end_time: float
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    engine_seconds: float
    failed_requests: int
    cancelled_requests: int
    estimated_cost: float  # in the ledger's Pricing.unit


_COLUMNS = ("request_id", "tenant", "adapter", "adapter_version", "start_time", "end_time", "input_tokens",
            "cached_input_tokens", "output_tokens", "engine_seconds", "status", "front")
COLUMNS = _COLUMNS


def record_row(rec: UsageRecord) -> list[object]:
    """The values of _COLUMNS, then the labels as JSON."""
    if not isinstance(rec, UsageRecord):
        raise TypeError(f"expected a UsageRecord, got {type(rec).__name__}")
    return [getattr(rec, c) for c in _COLUMNS] + [json.dumps(dict(sorted(rec.labels.items())))]


def record_from_row(row: Sequence[object]) -> UsageRecord:
    """The record of a row selected as _COLUMNS, then the labels as JSON (record_row's inverse)."""
    return UsageRecord(**dict(zip(_COLUMNS, row[:-1])), labels=json.loads(row[-1]))


class UsageQueries:
    """The aggregate query over a `usage` table, in the SQL SQLite and PostgreSQL share; a subclass runs it."""

    pricing: Pricing
    _clock: Callable[[], float]
    # The time bucket of a row: floor(end_time / bucket) (end_time >= 0, so SQLite's truncating CAST floors).
    _BUCKET = "CAST(end_time / :bucket AS INTEGER)"

    def _select(self, sql: str, params: dict[str, object]) -> list:
        raise NotImplementedError

    def query(self, *, tenant: str | None = None, adapter: str | None = None,
              adapter_version: str | None = None, start_time: float | None = None,
              end_time: float | None = None, group_by: str = "tenant", bucket_s: float | None = None,
              page_size: int = 0, page_token: str = "") -> tuple[list[UsageRow], str]:
        """Totals per group (and per bucket) of the requests that ended in [start_time, end_time).

        tenant/adapter None: all; adapter "" is the base model. adapter_version (a version id) needs a
        non-empty adapter and keeps that version's requests only. start_time None: from the epoch (not allowed
        with bucket_s); end_time None: up to now, pinned by the first page so later pages see the same window.
        Rows are ordered by bucket, then tenant, adapter, adapter_version. Returns (rows, next_page_token),
        the token "" on the last page; pass it back with the same other arguments for the next page.
        """
        if group_by not in GROUP_BY:
            raise InvalidUsageArgument(f"group_by={group_by!r} is invalid: expected one of "
                                       f"{', '.join(GROUP_BY)}")
        if tenant is not None:
            try:
                check_tenant(tenant)
            except InvalidRegistryArgument as e:
                raise InvalidUsageArgument(f"tenant: {e}") from None
        if adapter is not None:
            _check_adapter("adapter", adapter)
        if adapter_version is not None and (not adapter or not isinstance(adapter_version, str)
                                            or not 0 < len(adapter_version) <= _MAX_ID_CHARS):
            raise InvalidUsageArgument(f"adapter_version={repr(adapter_version)[:80]} is invalid: a version "
                                       f"filter is a version id and needs an adapter (owner/name) filter too")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise InvalidUsageArgument(f"page_size={page_size!r} is invalid: expected 0 (the default, "
                                       f"{DEFAULT_PAGE_SIZE}) or a positive integer (at most {MAX_PAGE_SIZE} "
                                       f"are returned)")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        lo = 0.0 if start_time is None else _check_seconds("start_time", start_time)
        if end_time is not None:
            _check_seconds("end_time", end_time)
            if end_time <= lo:
                raise InvalidUsageArgument(f"start_time={start_time} is not before end_time={end_time}: the "
                                           f"window [start_time, end_time) would be empty")
        if bucket_s is not None:
            if not _is_number(bucket_s) or bucket_s <= 0:
                raise InvalidUsageArgument(f"bucket_s={bucket_s!r} is invalid: expected a number of "
                                           f"seconds > 0")
            if start_time is None:
                raise InvalidUsageArgument("bucket_s needs a start_time: buckets from the epoch would be "
                                           "too many")

        fingerprint = _fingerprint(tenant, adapter, adapter_version, start_time, end_time, group_by, bucket_s)
        after: list[object] | None = None
        hi = end_time
        if page_token:
            hi, after = _decode_token(page_token, fingerprint)
        if hi is None:
            hi = float(self._clock())
        if hi <= lo:  # an open window that has not begun yet
            return [], ""
        if bucket_s is not None:
            n = math.ceil(hi / bucket_s) - math.floor(lo / bucket_s)
            if n > MAX_BUCKETS:
                raise InvalidUsageArgument(f"bucket_s={bucket_s:g} cuts the window of {hi - lo:g} s into "
                                           f"{n} buckets; at most {MAX_BUCKETS} are allowed: use larger "
                                           f"buckets or a shorter window")

        # One SELECT for every grouping: columns not grouped by are the constant '' (unless filtered on).
        k = self._BUCKET if bucket_s is not None else "0"
        t = "tenant" if group_by == "tenant" or tenant is not None else "''"
        a = "adapter" if group_by != "tenant" or adapter is not None else "''"
        v = "adapter_version" if group_by == "adapter_version" or adapter_version is not None else "''"
        where = ["end_time >= :lo", "end_time < :hi"]
        if tenant is not None:
            where.append("tenant = :tenant")
        if adapter is not None:
            where.append("adapter = :adapter")
        if adapter_version is not None:
            where.append("adapter_version = :version")
        # Grouped by position (an alias could mean a column); the page's start filters the groups outside.
        after_groups = "WHERE (k, t, a, v) > (:ak, :at, :aa, :av)" if after is not None else ""
        sql = (f"SELECT * FROM (SELECT {k} AS k, {t} AS t, {a} AS a, {v} AS v, COUNT(*) AS n, SUM(input_tokens) "
               f"AS i, SUM(cached_input_tokens) AS c, SUM(output_tokens) AS o, SUM(engine_seconds) AS e, "
               f"SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS f, "
               f"SUM(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END) AS x FROM usage WHERE {' AND '.join(where)} "
               f"GROUP BY 1, 2, 3, 4) g {after_groups} ORDER BY k, t, a, v LIMIT :limit")
        params: dict[str, object] = {"lo": lo, "hi": hi, "tenant": tenant, "adapter": adapter,
                                     "version": adapter_version, "bucket": bucket_s, "limit": size + 1}
        if after is not None:
            params.update(zip(("ak", "at", "aa", "av"), after))
        found = self._select(sql, params)

        rows = []
        for bucket, t_val, a_val, v_val, n_req, inp, cached, out, secs, failed, cancelled in found[:size]:
            if bucket_s is None:
                b_lo, b_hi = lo, hi
            else:  # the bucket [k * bucket_s, (k + 1) * bucket_s), clipped to the window
                b_lo, b_hi = max(lo, bucket * bucket_s), min(hi, (bucket + 1) * bucket_s)
            rows.append(UsageRow(
                tenant=t_val, adapter=a_val, adapter_version=v_val, start_time=b_lo, end_time=b_hi,
                requests=int(n_req), input_tokens=int(inp), cached_input_tokens=int(cached), output_tokens=int(out),
                engine_seconds=float(secs), failed_requests=int(failed), cancelled_requests=int(cancelled),
                estimated_cost=self.pricing.cost(int(inp), int(cached), int(out))))
        token = ""
        if len(found) > size:
            last = found[size - 1]
            token = _encode_token(fingerprint, hi, [int(last[0]), *last[1:4]])
        return rows, token


class UsageLedger(SqliteFile, UsageQueries):
    def __init__(self, path: str | Path, *, pricing: Pricing | None = None,
                 clock: Callable[[], float] = time.time):
        self.pricing = pricing if pricing is not None else Pricing()
        self._clock = clock
        super().__init__(path, schema=_SCHEMA, schema_version=_SCHEMA_VERSION, what="usage ledger",
                         error=LedgerError, migrations=_MIGRATIONS)

    def _select(self, sql: str, params: dict[str, object]) -> list:
        with self._txn(write=False) as db:
            return db.execute(sql, params).fetchall()

    def record(self, rec: UsageRecord) -> bool:
        """Store `rec` durably; False if its request_id was already recorded (that row is kept as it was)."""
        return self.record_many([rec]) == 1

    def record_many(self, records: list[UsageRecord]) -> int:
        """Store `records` durably in one transaction; returns how many were new (a request id already
        recorded keeps its row as it was)."""
        rows = [record_row(rec) for rec in records]
        now = self._clock()
        with self._txn() as db:
            before = db.total_changes
            db.executemany(f"INSERT OR IGNORE INTO usage ({', '.join(_COLUMNS)}, labels, recorded_at) "
                           f"VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})", [[*r, now] for r in rows])
            return db.total_changes - before

    def get(self, request_id: str) -> UsageRecord | None:
        with self._txn(write=False) as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)}, labels FROM usage WHERE request_id = ?",
                             (request_id,)).fetchone()
        return None if row is None else record_from_row(row)

    # --- the outbox of a replica (service.control_plane drains it to PostgreSQL) ---------------------------

    def unexported(self, limit: int = 500) -> list[tuple[UsageRecord, float]]:
        """Up to `limit` records not exported yet, oldest first, each with when it was recorded."""
        with self._txn(write=False) as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)}, labels, recorded_at FROM usage WHERE exported_at IS "
                              "NULL ORDER BY recorded_at, request_id LIMIT ?", (limit,)).fetchall()
        return [(record_from_row(r[:-1]), r[-1]) for r in rows]

    def mark_exported(self, request_ids: list[str]) -> None:
        now = self._clock()
        with self._txn() as db:
            db.executemany("UPDATE usage SET exported_at = ? WHERE request_id = ?", [(now, i) for i in request_ids])

    def count_unexported(self) -> int:
        with self._txn(write=False) as db:
            return db.execute("SELECT COUNT(*) FROM usage WHERE exported_at IS NULL").fetchone()[0]



def _fingerprint(*query: object) -> str:
    # Binds a page token to the query it came from; page_size may change between pages. Numbers as floats:
    # 10 and 10.0 are the same query.
    norm = [float(q) if isinstance(q, int) and not isinstance(q, bool) else q for q in query]
    return hashlib.sha256(json.dumps(norm).encode()).hexdigest()[:16]


def _encode_token(fingerprint: str, hi: float, after: list[object]) -> str:
    raw = json.dumps([fingerprint, hi, *after]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, fingerprint: str) -> tuple[float, list[object]]:
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        value = None
    ok = (isinstance(value, list) and len(value) == 6 and isinstance(value[0], str)
          and _is_number(value[1]) and isinstance(value[2], int) and not isinstance(value[2], bool)
          and all(isinstance(x, str) for x in value[3:]))
    if not ok:
        raise InvalidUsageArgument(f"page_token {token[:40]!r} is not one this server returned")
    if value[0] != fingerprint:
        raise InvalidUsageArgument("page_token belongs to a different query: repeat the first page's tenant, "
                                   "adapter, adapter_version, start_time, end_time, group_by and bucket_s "
                                   "unchanged")
    return float(value[1]), value[2:]
