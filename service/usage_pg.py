"""The usage ledger in PostgreSQL, shared by replicas: every replica's rows, so `GetUsage` on any replica sums
them all. Rows arrive from each replica's outbox (its SQLite ledger, service.usage) and are keyed by request id:
`INSERT ... ON CONFLICT DO NOTHING` keeps a row sent twice (a retry after an outage, a crash between the copy and
its mark) exactly once. The aggregate query is service.usage's, in the SQL both databases share."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from adapters.pg import BYTE_ORDER_TEXT, PgDatabase
from service.usage import COLUMNS, Pricing, UsageQueries, UsageRecord, record_from_row, record_row

__all__ = ["PgUsageLedger"]

SCHEMA_VERSION = 1
_TEXT = BYTE_ORDER_TEXT
MIGRATIONS = {0: f"""
CREATE TABLE usage (
    request_id TEXT PRIMARY KEY,
    tenant {_TEXT} NOT NULL,
    adapter {_TEXT} NOT NULL,
    adapter_version {_TEXT} NOT NULL,
    start_time DOUBLE PRECISION NOT NULL,
    end_time DOUBLE PRECISION NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    engine_seconds DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{{}}',
    front TEXT NOT NULL DEFAULT 'grpc',
    recorded_at DOUBLE PRECISION NOT NULL,
    replica TEXT NOT NULL DEFAULT '',
    exported_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX usage_by_time ON usage (end_time);
CREATE INDEX usage_by_tenant ON usage (tenant, end_time);
CREATE INDEX usage_by_adapter ON usage (adapter, end_time);
"""}


class PgUsageLedger(UsageQueries):
    _BUCKET = "CAST(FLOOR(end_time / :bucket) AS BIGINT)"

    def __init__(self, db: PgDatabase, *, pricing: Pricing | None = None, replica: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.pricing = pricing if pricing is not None else Pricing()
        self._clock, self._db, self.replica = clock, db, replica
        db.migrate("usage", SCHEMA_VERSION, MIGRATIONS)

    def _select(self, sql: str, params: dict[str, object]) -> list:
        with self._db.txn(write=False) as db:
            return db.execute(sql, params).fetchall()

    def record(self, rec: UsageRecord) -> bool:
        return self.record_many([rec]) == 1

    def record_many(self, records: Sequence[UsageRecord], recorded_at: Sequence[float] | None = None) -> int:
        """Insert the rows of `records` (recorded at `recorded_at`, default now) in one transaction; returns how
        many were new. A request id already there keeps its row."""
        rows = [record_row(rec) for rec in records]
        at = list(recorded_at) if recorded_at is not None else [self._clock()] * len(rows)
        if not rows:
            return 0
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" * (len(COLUMNS) + 3))
        with self._db.txn() as db:
            inserted = 0
            for r, t in zip(rows, at):  # one statement per row: each tells whether it was new
                cur = db.execute(f"INSERT INTO usage ({cols}, labels, recorded_at, replica) VALUES ({marks}) "
                                 "ON CONFLICT (request_id) DO NOTHING", (*r, t, self.replica))
                inserted += cur.rowcount
            return inserted

    def get(self, request_id: str) -> UsageRecord | None:
        with self._db.txn(write=False) as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)}, labels FROM usage WHERE request_id = ?",
                             (request_id,)).fetchone()
        return None if row is None else record_from_row(row)

    def close(self) -> None:
        """The database belongs to whoever opened it."""

    def __enter__(self) -> PgUsageLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
