"""The usage ledger: exactly-once records, grouped and bucketed totals, paging, costs, durability."""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
import threading

import pytest

from service import usage
from service.usage import InvalidUsageArgument, LedgerError, Pricing, UsageLedger, UsageRecord, UsageRow

V1 = "v-" + "a" * 24
V2 = "v-" + "b" * 24


def rec(request_id: str, tenant: str = "alice", adapter: str = "", version: str = "", end: float = 1000.0,
        inp: int = 0, cached: int = 0, out: int = 0, secs: float = 0.0, status: str = "ok") -> UsageRecord:
    return UsageRecord(request_id=request_id, tenant=tenant, adapter=adapter, adapter_version=version,
                       start_time=end - 1.0, end_time=end, input_tokens=inp, cached_input_tokens=cached,
                       output_tokens=out, engine_seconds=secs, status=status)


# Requests count where they end. Buckets of 3600 s: [0, 3600) holds r1, r2; [3600, 7200) holds r3, r4;
# r5 ends exactly at 7200, outside a window that ends there.
RECORDS = [
    rec("r1", "alice", "", "", end=1000.0, inp=100, cached=40, out=10, secs=0.5),
    rec("r2", "alice", "alice/sb", V1, end=1500.0, inp=200, out=20, secs=1.0),
    rec("r3", "alice", "alice/sb", V2, end=3700.0, inp=50, cached=50, out=5, secs=0.25, status="failed"),
    rec("r4", "bob", "alice/sb", V1, end=3600.0, inp=10, out=1, secs=0.125, status="cancelled"),
    rec("r5", "bob", "", "", end=7200.0, inp=7, out=3, secs=2.0),
]


class FakeClock:
    def __init__(self, t: float = 10_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path, clock):
    """The ledger with RECORDS, in SQLite (one process's) or PostgreSQL (the replicas' shared one): every query
    test runs on both."""
    if request.param == "sqlite":
        led = UsageLedger(tmp_path / "usage.db", clock=clock)
        db = None
    else:
        from adapters.pg import PgDatabase
        from service.usage_pg import PgUsageLedger

        db = PgDatabase(request.getfixturevalue("pg_cluster").new_database(), pool_size=2)
        led = PgUsageLedger(db, clock=clock)
    try:
        for r in RECORDS:
            assert led.record(r)
        yield led
    finally:
        led.close()
        if db is not None:
            db.close()


def row(tenant="", adapter="", version="", start=0.0, end=7200.0, **totals) -> UsageRow:
    fields = dict(requests=0, input_tokens=0, cached_input_tokens=0, output_tokens=0, engine_seconds=0.0,
                  failed_requests=0, cancelled_requests=0, estimated_cost=0.0)
    fields.update(totals)
    return UsageRow(tenant=tenant, adapter=adapter, adapter_version=version, start_time=start, end_time=end,
                    **fields)


def query_all(led: UsageLedger, **kw) -> list[UsageRow]:
    rows, token = led.query(page_size=1000, **kw)
    assert token == ""
    return rows


# --- recording ----------------------------------------------------------------------------------------------

def test_duplicate_request_id_is_recorded_once(ledger):
    again = dataclasses.replace(RECORDS[0], input_tokens=999, cached_input_tokens=0, status="failed")
    assert ledger.record(again) is False
    assert ledger.record(RECORDS[0]) is False
    assert ledger.get("r1") == RECORDS[0]  # the first write stands
    rows = query_all(ledger, tenant="alice", start_time=0, end_time=1001, group_by="tenant")
    assert rows == [row("alice", end=1001.0, requests=1, input_tokens=100, cached_input_tokens=40,
                        output_tokens=10, engine_seconds=0.5)]
    assert ledger.get("nope") is None


def test_concurrent_records_exactly_once(tmp_path, clock):
    with UsageLedger(tmp_path / "u.db", clock=clock) as led:
        created: list[bool] = []
        barrier = threading.Barrier(4)

        def worker() -> None:
            barrier.wait()
            for i in range(6):  # every thread reports the same six requests
                created.append(led.record(rec(f"req-{i}", inp=10, out=1)))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert created.count(True) == 6 and created.count(False) == 18
        (total,) = query_all(led, start_time=0, end_time=2000, group_by="tenant")
        assert total.requests == 6 and total.input_tokens == 60 and total.output_tokens == 6


BAD_RECORDS = {
    "empty_request_id": (dict(request_id=""), "request_id"),
    "bad_tenant": (dict(tenant="a/b"), "tenant: 'a/b' is not a valid tenant id"),
    "adapter_not_canonical": (dict(adapter="sb", adapter_version=V1),
                              "adapter='sb' is invalid: .*owner/name"),
    "adapter_without_version": (dict(adapter="alice/sb"), "adapter_version='' is invalid"),
    "version_without_adapter": (dict(adapter_version=V1), "adapter_version=.* is invalid"),
    "end_before_start": (dict(start_time=10.0, end_time=9.0), "end_time=9.0 is before start_time=10.0"),
    "nan_time": (dict(end_time=float("nan")), "end_time=nan is invalid"),
    "negative_tokens": (dict(output_tokens=-1), "output_tokens=-1 is invalid"),
    "float_tokens": (dict(input_tokens=1.5), "input_tokens=1.5 is invalid"),
    "cached_over_input": (dict(input_tokens=5, cached_input_tokens=6), "cached_input_tokens=6 is more than"),
    "negative_engine_seconds": (dict(engine_seconds=-0.1), "engine_seconds=-0.1 is invalid"),
    "unknown_status": (dict(status="done"),
                       "status='done' is invalid: expected one of ok, failed, cancelled"),
}


@pytest.mark.parametrize("change, message", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_refused(change, message):
    with pytest.raises(InvalidUsageArgument, match=message) as info:
        dataclasses.replace(rec("x", inp=10), **change)
    assert isinstance(info.value, ValueError)


# --- aggregation --------------------------------------------------------------------------------------------

def test_group_by_tenant(ledger):
    assert query_all(ledger, start_time=0, end_time=7200, group_by="tenant") == [
        row("alice", requests=3, input_tokens=350, cached_input_tokens=90, output_tokens=35,
            engine_seconds=1.75, failed_requests=1),
        row("bob", requests=1, input_tokens=10, output_tokens=1, engine_seconds=0.125, cancelled_requests=1),
    ]


def test_group_by_adapter_across_tenants(ledger):
    assert query_all(ledger, start_time=0, end_time=7200, group_by="adapter") == [
        row(adapter="", requests=1, input_tokens=100, cached_input_tokens=40, output_tokens=10,
            engine_seconds=0.5),
        row(adapter="alice/sb", requests=3, input_tokens=260, cached_input_tokens=50, output_tokens=26,
            engine_seconds=1.375, failed_requests=1, cancelled_requests=1),
    ]


def test_group_by_adapter_version(ledger):
    rows = query_all(ledger, start_time=0, end_time=7200, group_by="adapter_version")
    assert [(r.adapter, r.adapter_version, r.requests, r.input_tokens) for r in rows] == [
        ("", "", 1, 100), ("alice/sb", V1, 2, 210), ("alice/sb", V2, 1, 50)]


def test_filters_fill_their_field(ledger):
    rows = query_all(ledger, tenant="alice", start_time=0, end_time=7200, group_by="adapter")
    assert [(r.tenant, r.adapter, r.requests) for r in rows] == [("alice", "", 1), ("alice", "alice/sb", 2)]
    rows = query_all(ledger, adapter="alice/sb", start_time=0, end_time=7200, group_by="tenant")
    assert [(r.tenant, r.adapter, r.requests) for r in rows] == [("alice", "alice/sb", 2),
                                                                 ("bob", "alice/sb", 1)]
    # "" is the base model, None is every adapter.
    rows = query_all(ledger, adapter="", start_time=0, end_time=8000, group_by="tenant")
    assert [(r.tenant, r.requests, r.input_tokens) for r in rows] == [("alice", 1, 100), ("bob", 1, 7)]
    assert query_all(ledger, tenant="carol", start_time=0, end_time=8000, group_by="tenant") == []
    # One version of one adapter.
    rows = query_all(ledger, adapter="alice/sb", adapter_version=V1, start_time=0, end_time=7200,
                     group_by="tenant")
    assert [(r.tenant, r.adapter, r.adapter_version, r.requests, r.input_tokens) for r in rows] == [
        ("alice", "alice/sb", V1, 1, 200), ("bob", "alice/sb", V1, 1, 10)]


def test_window_is_half_open_on_end_time(ledger):
    # r1 ends at 1000: inside [1000, ...), outside [..., 1000).
    assert [r.requests for r in query_all(ledger, start_time=1000, end_time=1001, group_by="tenant")] == [1]
    assert query_all(ledger, start_time=0, end_time=1000, group_by="tenant") == []
    assert [r.tenant for r in query_all(ledger, start_time=7200, end_time=7201, group_by="tenant")] == ["bob"]


def test_open_window_ends_now(ledger, clock):
    ledger.record(rec("future", "carol", end=clock.t + 5))  # ends after the ledger's "now"
    rows = query_all(ledger, group_by="tenant")
    assert [(r.tenant, r.requests, r.start_time, r.end_time) for r in rows] == [
        ("alice", 3, 0.0, 10_000.0), ("bob", 2, 0.0, 10_000.0)]
    clock.t += 10
    assert [r.tenant for r in query_all(ledger, group_by="tenant")] == ["alice", "bob", "carol"]
    assert query_all(ledger, start_time=clock.t + 1, group_by="tenant") == []  # not begun yet: empty


def test_buckets(ledger):
    rows = query_all(ledger, start_time=0, end_time=7201, group_by="tenant", bucket_s=3600)
    assert [(r.start_time, r.end_time, r.tenant, r.requests, r.input_tokens) for r in rows] == [
        (0.0, 3600.0, "alice", 2, 300),
        (3600.0, 7200.0, "alice", 1, 50),
        (3600.0, 7200.0, "bob", 1, 10),  # r4 ends exactly at 3600: the second bucket
        (7200.0, 7201.0, "bob", 1, 7),  # the last bucket is clipped to the window
    ]


def test_buckets_are_aligned_to_the_epoch_and_clipped(ledger):
    rows = query_all(ledger, start_time=1200, end_time=4000, group_by="adapter", bucket_s=3600)
    assert [(r.start_time, r.end_time, r.adapter, r.requests) for r in rows] == [
        (1200.0, 3600.0, "alice/sb", 1),  # r2 only: r1 ended before the window
        (3600.0, 4000.0, "alice/sb", 2),
    ]
    # Buckets with no requests are not returned.
    rows = query_all(ledger, start_time=0, end_time=7200, group_by="tenant", bucket_s=600)
    assert [(r.start_time, r.tenant) for r in rows] == [(600.0, "alice"), (1200.0, "alice"),
                                                        (3600.0, "alice"), (3600.0, "bob")]


def test_costs():
    p = Pricing(input_per_1k=1.0, cached_input_per_1k=0.1, output_per_1k=2.0, unit="EUR")
    # 60 uncached input at 1.0, 40 cached at 0.1, 10 output at 2.0, per 1000.
    assert p.cost(100, 40, 10) == pytest.approx((60 * 1.0 + 40 * 0.1 + 10 * 2.0) / 1000)
    assert p.cost(0, 0, 0) == 0.0
    assert Pricing().cost(10**6, 0, 10**6) == 0.0
    with pytest.raises(InvalidUsageArgument, match="cached_input_tokens=5 is more than input_tokens=4"):
        p.cost(4, 5, 0)
    for bad in (dict(input_per_1k=-1.0), dict(output_per_1k=float("inf")), dict(cached_input_per_1k="1"),
                dict(unit="")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Pricing(**bad)


def test_rows_carry_estimated_cost(tmp_path, clock):
    p = Pricing(input_per_1k=1.0, cached_input_per_1k=0.1, output_per_1k=2.0)
    with UsageLedger(tmp_path / "u.db", pricing=p, clock=clock) as led:
        for r in RECORDS:
            led.record(r)
        alice, bob = query_all(led, start_time=0, end_time=7200, group_by="tenant")
        # alice: 350 input of which 90 cached, 35 output.
        assert alice.estimated_cost == pytest.approx((260 * 1.0 + 90 * 0.1 + 35 * 2.0) / 1000)
        assert bob.estimated_cost == pytest.approx((10 * 1.0 + 1 * 2.0) / 1000)
        assert led.pricing.unit == "USD"


# --- paging -------------------------------------------------------------------------------------------------

def test_paging_returns_every_row_once_in_order(ledger):
    query = dict(start_time=0, end_time=8000, group_by="adapter_version", bucket_s=3600)
    everything = query_all(ledger, **query)
    assert len(everything) == 5
    pages, token = [], ""
    while True:
        rows, token = ledger.query(page_size=2, page_token=token, **query)
        pages.append(rows)
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [r for p in pages for r in p] == everything
    # The page size may change between pages.
    first, token = ledger.query(page_size=1, **query)
    rest, token2 = ledger.query(page_size=10, page_token=token, **query)
    assert first + rest == everything and token2 == ""


def test_paging_an_open_window_keeps_its_end(ledger, clock):
    first, token = ledger.query(group_by="tenant", page_size=1)
    assert [r.tenant for r in first] == ["alice"]
    clock.t += 100
    ledger.record(rec("late", "zed", end=clock.t - 1))  # after the first page's "now"
    rest, token = ledger.query(group_by="tenant", page_size=10, page_token=token)
    assert [(r.tenant, r.end_time) for r in rest] == [("bob", 10_000.0)] and token == ""


def test_page_size_default_and_cap(ledger, monkeypatch):
    monkeypatch.setattr(usage, "DEFAULT_PAGE_SIZE", 2)
    monkeypatch.setattr(usage, "MAX_PAGE_SIZE", 3)
    q = dict(start_time=0, end_time=8000, group_by="adapter_version", bucket_s=3600)
    assert len(ledger.query(page_size=0, **q)[0]) == 2
    assert len(ledger.query(page_size=500, **q)[0]) == 3
    with pytest.raises(InvalidUsageArgument, match="page_size=-1 is invalid"):
        ledger.query(page_size=-1, **q)


def _token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("token", ["!!!", "abc", _token({"a": 1}), _token(["x", 1.0, 0, "", ""]),
                                   _token(["x", 1.0, "0", "", "", ""])],
                         ids=["not_base64", "not_json", "not_a_list", "too_short", "wrong_types"])
def test_bad_page_token(ledger, token):
    with pytest.raises(InvalidUsageArgument, match="page_token .* is not one this server returned"):
        ledger.query(start_time=0, end_time=8000, group_by="tenant", page_token=token)


def test_page_token_of_another_query(ledger):
    _, token = ledger.query(start_time=0, end_time=8000, group_by="tenant", page_size=1)
    assert token
    with pytest.raises(InvalidUsageArgument, match="page_token belongs to a different query"):
        ledger.query(start_time=0, end_time=8000, group_by="adapter", page_token=token)
    with pytest.raises(InvalidUsageArgument, match="different query"):
        ledger.query(start_time=0, end_time=9000, group_by="tenant", page_token=token)
    # The same query with the numbers written as floats is the same query.
    rows, _ = ledger.query(start_time=0.0, end_time=8000.0, group_by="tenant", page_token=token)
    assert [r.tenant for r in rows] == ["bob"]


BAD_QUERIES = {
    "unknown_group_by": (dict(group_by="model"),
                         "group_by='model' is invalid: expected one of tenant, adapter"),
    "start_not_before_end": (dict(start_time=10, end_time=10), "start_time=10 is not before end_time=10"),
    "nan_start": (dict(start_time=float("nan")), "start_time=nan is invalid"),
    "negative_end": (dict(end_time=-5), "end_time=-5 is invalid"),
    "zero_bucket": (dict(start_time=0, end_time=10, bucket_s=0), "bucket_s=0 is invalid"),
    "negative_bucket": (dict(start_time=0, end_time=10, bucket_s=-60), "bucket_s=-60 is invalid"),
    "nan_bucket": (dict(start_time=0, end_time=10, bucket_s=float("nan")), "bucket_s=nan is invalid"),
    "bucket_without_start": (dict(end_time=10, bucket_s=60), "bucket_s needs a start_time"),
    "too_many_buckets": (dict(start_time=0, end_time=20_000, bucket_s=1),
                         "cuts the window of 20000 s into 20000 buckets; at most 10000"),
    "bad_tenant": (dict(tenant="a b"), "tenant: 'a b' is not a valid tenant id"),
    "bad_adapter": (dict(adapter="sb"), "adapter='sb' is invalid"),
    "version_without_adapter": (dict(adapter_version=V1), "adapter_version=.* needs an adapter"),
    "version_of_base_model": (dict(adapter="", adapter_version=V1), "adapter_version=.* needs an adapter"),
}


@pytest.mark.parametrize("kw, message", BAD_QUERIES.values(), ids=BAD_QUERIES.keys())
def test_bad_query_arguments(ledger, kw, message):
    kw = {"group_by": "tenant", **kw}
    with pytest.raises(InvalidUsageArgument, match=message) as info:
        ledger.query(**kw)
    assert isinstance(info.value, ValueError)


def test_most_buckets_allowed(ledger):
    rows = query_all(ledger, start_time=0, end_time=10_000, bucket_s=1, group_by="tenant")
    assert len(rows) == 5 and rows[0].start_time == 1000.0 and rows[0].end_time == 1001.0


# --- durability ---------------------------------------------------------------------------------------------

def test_rows_survive_close_and_reopen(tmp_path, clock):
    path = tmp_path / "usage.db"
    led = UsageLedger(path, clock=clock)
    for r in RECORDS:
        led.record(r)
    before = query_all(led, start_time=0, end_time=8000, group_by="adapter_version")
    led.close()
    with UsageLedger(path, clock=clock) as reopened:
        assert [reopened.get(r.request_id) for r in RECORDS] == RECORDS
        assert query_all(reopened, start_time=0, end_time=8000, group_by="adapter_version") == before
        assert reopened.record(RECORDS[0]) is False  # still exactly once across restarts
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM usage").fetchone()[0] == len(RECORDS)
    db.close()


def test_other_schema_version_refused(tmp_path):
    path = tmp_path / "usage.db"
    UsageLedger(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(LedgerError, match="schema 99; this server reads schema 4"):
        UsageLedger(path)


def test_a_schema_1_ledger_is_migrated_and_keeps_its_rows(tmp_path):
    path = tmp_path / "usage.db"
    db = sqlite3.connect(path)  # the ledger as the first release wrote it (schema 1: no labels)
    db.executescript("""
        CREATE TABLE usage (request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT NOT NULL,
            adapter_version TEXT NOT NULL, start_time REAL NOT NULL, end_time REAL NOT NULL,
            input_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
            engine_seconds REAL NOT NULL, status TEXT NOT NULL, recorded_at REAL NOT NULL);
        INSERT INTO usage VALUES ('old', 'alice', '', '', 1.0, 2.0, 5, 0, 3, 0.5, 'ok', 2.0);
        PRAGMA user_version = 1;""")
    db.close()
    with UsageLedger(path) as ledger:
        assert ledger.get("old").labels == {} and ledger.get("old").output_tokens == 3
        assert ledger.get("old").front == "grpc"  # the only front there was
        rec = dataclasses.replace(RECORDS[0], request_id="new", labels={"feature": "search"}, front="http")
        assert ledger.record(rec) and ledger.get("new").labels == {"feature": "search"}
        assert ledger.get("new").front == "http"
        assert [r.request_id for r, _ in ledger.unexported()] == ["old", "new"]  # the outbox holds both


def test_a_record_names_a_known_front(ledger):
    with pytest.raises(InvalidUsageArgument, match="front='smtp' is invalid: expected one of grpc, http"):
        dataclasses.replace(RECORDS[0], request_id="x", front="smtp")
