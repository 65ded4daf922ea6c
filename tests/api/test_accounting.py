"""The usage writer: records reach the ledger off the engine loop, a failing write is retried."""

from __future__ import annotations

from service import accounting
from service.accounting import UsageWriter
from service.usage import UsageLedger, UsageRecord


def record(rid: str) -> UsageRecord:
    return UsageRecord(request_id=rid, tenant="alice", adapter="", adapter_version="", start_time=1.0, end_time=2.0,
                       input_tokens=5, cached_input_tokens=0, output_tokens=3, engine_seconds=0.1, status="ok")


def test_a_failing_write_is_retried_until_it_lands(tmp_path, monkeypatch):
    monkeypatch.setattr(accounting, "WRITE_RETRY_S", 0.001)
    ledger = UsageLedger(tmp_path / "usage.db")
    real, failures = ledger.record, [2]

    def flaky(rec: UsageRecord) -> bool:  # the disk is busy twice, then writes again
        if failures[0]:
            failures[0] -= 1
            raise OSError("database is locked")
        return real(rec)

    ledger.record = flaky
    writer = UsageWriter(ledger)
    writer.submit(record("r1"))
    assert writer.flush(10)
    writer.close()
    assert failures == [0] and ledger.get("r1") == record("r1")


def test_a_write_that_keeps_failing_is_given_up_and_the_writer_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(accounting, "WRITE_RETRY_S", 0.001)
    ledger = UsageLedger(tmp_path / "usage.db")
    real = ledger.record

    def broken_for_r1(rec: UsageRecord) -> bool:
        if rec.request_id == "r1":
            raise OSError("disk full")
        return real(rec)

    ledger.record = broken_for_r1
    writer = UsageWriter(ledger)
    writer.submit(record("r1"))
    writer.submit(record("r2"))
    assert writer.flush(10)
    writer.close()
    assert ledger.get("r1") is None and ledger.get("r2") == record("r2")
