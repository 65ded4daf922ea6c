"""The usage writer: records reach the ledger off the engine loop, a failing write is retried."""

from __future__ import annotations

import threading

from service import accounting
from service.accounting import UsageWriter
from service.usage import UsageLedger, UsageRecord


def record(rid: str) -> UsageRecord:
    return UsageRecord(request_id=rid, tenant="alice", adapter="", adapter_version="", start_time=1.0, end_time=2.0,
                       input_tokens=5, cached_input_tokens=0, output_tokens=3, engine_seconds=0.1, status="ok")


def test_a_failing_write_is_retried_until_it_lands(tmp_path, monkeypatch):
    monkeypatch.setattr(accounting, "WRITE_RETRY_S", 0.001)
    ledger = UsageLedger(tmp_path / "usage.db")
    real, failures = ledger.record_many, [2]

    def flaky(records: list[UsageRecord]) -> int:  # the disk is busy twice, then writes again
        if failures[0]:
            failures[0] -= 1
            raise OSError("database is locked")
        return real(records)

    ledger.record_many = flaky
    writer = UsageWriter(ledger)
    done = writer.submit(record("r1"))
    assert writer.flush(10) and done.result(1) is True
    writer.close()
    assert failures == [0] and ledger.get("r1") == record("r1")


def test_a_write_that_keeps_failing_is_given_up_and_the_writer_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(accounting, "WRITE_RETRY_S", 0.001)
    ledger = UsageLedger(tmp_path / "usage.db")
    real = ledger.record_many

    def broken_for_r1(records: list[UsageRecord]) -> int:
        if any(rec.request_id == "r1" for rec in records):
            raise OSError("disk full")
        return real(records)

    ledger.record_many = broken_for_r1
    writer = UsageWriter(ledger)
    lost, kept = writer.submit(record("r1")), writer.submit(record("r2"))  # may share one batch
    assert writer.flush(10)
    writer.close()
    assert lost.result(1) is False and kept.result(1) is True
    assert ledger.get("r1") is None and ledger.get("r2") == record("r2")


def test_records_queued_together_are_committed_in_one_transaction(tmp_path):
    ledger = UsageLedger(tmp_path / "usage.db")
    calls: list[int] = []
    real = ledger.record_many
    entered, gate = threading.Event(), threading.Event()

    def gated(records: list[UsageRecord]) -> int:
        if not calls:  # hold the first commit while more records queue up behind it
            entered.set()
            gate.wait(10)
        calls.append(len(records))
        return real(records)

    ledger.record_many = gated
    writer = UsageWriter(ledger)
    first = writer.submit(record("r0"))
    assert entered.wait(10)
    queued = [writer.submit(record(f"r{i}")) for i in range(1, 11)]
    gate.set()
    assert writer.flush(10) and first.result(1) and all(f.result(1) for f in queued)
    writer.close()
    assert calls == [1, 10]  # the ten that queued during the first commit share the next one
    assert all(ledger.get(f"r{i}") == record(f"r{i}") for i in range(11))


def test_a_waiter_that_cancels_its_future_does_not_end_the_writer(tmp_path):
    """A caller that gives up waiting (a client gone, an HTTP choice's stream stopped) may cancel the future it was
    handed; setting it then raised InvalidStateError, which ended the writer thread: every later request then
    waited out RECORD_WAIT_S for a record that never came."""
    ledger = UsageLedger(tmp_path / "usage.db")
    real = ledger.record_many
    entered, gate = threading.Event(), threading.Event()

    def gated(records: list[UsageRecord]) -> int:
        entered.set()
        gate.wait(10)
        return real(records)

    ledger.record_many = gated
    writer = UsageWriter(ledger)
    abandoned = writer.submit(record("r1"))
    assert entered.wait(10)
    assert abandoned.cancel()  # still pending: the commit is held
    gate.set()
    later = writer.submit(record("r2"))
    assert later.result(10) is True and writer.flush(10)
    writer.close()
    assert ledger.get("r1") == record("r1") and ledger.get("r2") == record("r2")  # the row itself was written
