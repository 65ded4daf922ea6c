"""What happens when a request ends, however it ends: usage into the ledger (exactly once), the tenant's
lease released and charged for its output, the span ended, metrics observed, the adapter version let go.

`on_finished` runs on the engine loop thread, so it only hands the usage record to a writer thread, which
commits what has queued up in one transaction (group commit); the ledger's `INSERT OR IGNORE` on the request
id keeps it exactly once even if a record were handed twice. The API sends a request's last message only
once its record is committed (`RequestContext.recorded`): a response a client received is billed, whatever
happens to the process after.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import structlog

from service.engine.outputs import FinalOutput
from service.engine.types import FinishReason
from service.limits import Lease
from service.metrics import ServerMetrics
from service.request_handle import RequestHandle
from service.tracing import RequestSpan
from service.usage import UsageLedger, UsageRecord

log = structlog.get_logger(__name__)

_STATUS = {FinishReason.ERROR: "failed", FinishReason.CANCELLED: "cancelled"}
WRITE_ATTEMPTS = 5
WRITE_RETRY_S = 0.1  # doubled after each failed attempt


@dataclass
class RequestContext:
    """What the server holds for a submitted request besides its spec, handed back at the end."""

    lease: Lease | None = None
    span: RequestSpan | None = None
    # Done once the request's usage row is committed (set on the loop thread before its final output is
    # handed over): the API waits for it before sending the last message.
    recorded: Future[bool] | None = None
    front: str = "grpc"  # which front served the call: grpc or http (kept on its usage row)


class AdapterHolds(Protocol):
    def release(self, version_id: str) -> None:
        """One request fewer on this adapter version (it held it from submit to finish)."""
        ...


class UsageWriter:
    """A thread that writes usage records to the ledger off the engine loop: whatever has queued up while
    the last commit ran goes into the next one (one fsync for many requests under load)."""

    def __init__(self, ledger: UsageLedger, max_batch: int = 256,
                 on_written: Callable[[], None] | None = None) -> None:
        """`on_written()` runs after each commit (a replica's exporter copies the rows on to PostgreSQL)."""
        self.ledger = ledger
        self.max_batch = max_batch
        self.on_written = on_written
        self._queue: queue.SimpleQueue[tuple[UsageRecord, Future[bool]] | None] = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def submit(self, record: UsageRecord) -> Future[bool]:
        """Queue `record`; the future is True once it is committed, False if it was lost (logged)."""
        done: Future[bool] = Future()
        with self._cond:
            self._pending += 1
        self._queue.put((record, done))
        return done

    def flush(self, timeout: float = 10.0) -> bool:
        """Until every submitted record is written (True) or the timeout passes."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _write(self, records: list[UsageRecord]) -> bool:
        """Commit, retrying a failing write (a locked or full disk) a few times before giving up loudly.
        Retrying is safe: the ledger keeps one row per request id."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                self.ledger.record_many(records)
                return True
            except Exception:
                if attempt == WRITE_ATTEMPTS - 1:
                    log.exception("usage_records_lost", request_ids=[r.request_id for r in records],
                                  attempts=WRITE_ATTEMPTS)
                    return False
                log.warning("usage_record_retry", requests=len(records), attempt=attempt + 1)
                time.sleep(WRITE_RETRY_S * 2 ** attempt)
        return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                ok = self._write([record for record, _ in batch])
                for record, done in batch:
                    # A batch that cannot be written is written record by record: one bad record
                    # (or one that trips the disk) loses only itself.
                    result = ok or (len(batch) > 1 and self._write([record]))
                    # A waiter may have cancelled its future (it gave up waiting): setting it then would raise
                    # and end this thread, and with it every later request's record.
                    if done.set_running_or_notify_cancel():
                        done.set_result(result)
                if self.on_written is not None:
                    try:
                        self.on_written()
                    except Exception:
                        log.exception("usage_written_hook_failed")
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()
            if item is None:
                return


class Accounting:
    def __init__(self, writer: UsageWriter, metrics: ServerMetrics | None, adapters: AdapterHolds | None) -> None:
        self.writer = writer
        self.metrics = metrics
        self.adapters = adapters

    def on_finished(self, handle: RequestHandle, final: FinalOutput) -> None:
        ctx: RequestContext | None = handle.context
        if ctx is None:  # the warm-up: nothing held, nobody to bill
            if self.metrics is not None:
                self.metrics.on_finished(final)
            return
        # What the request holds goes back first, whatever fails after: a leaked hold would make its adapter
        # version undeletable. (The lease itself is released when the call ends, its last message written.)
        try:
            if final.adapter_version is not None and self.adapters is not None:
                self.adapters.release(final.adapter_version)
        finally:
            if ctx.lease is not None:
                ctx.lease.charge(final.usage.output_tokens)
        for step in (self._observe, self._end_span, self._record):
            try:
                step(ctx, final)
            except Exception:
                log.exception("request_accounting_failed", step=step.__name__, request_id=handle.request_id)

    def _observe(self, ctx: RequestContext, final: FinalOutput) -> None:
        if self.metrics is not None:
            self.metrics.on_finished(final)

    def _end_span(self, ctx: RequestContext, final: FinalOutput) -> None:
        if ctx.span is not None:
            ctx.span.finish(final)

    def _record(self, ctx: RequestContext, final: FinalOutput) -> None:
        spec, usage = final.spec, final.usage
        ctx.recorded = self.writer.submit(UsageRecord(
            request_id=spec.request_id, tenant=spec.tenant, adapter=spec.adapter_name,
            adapter_version=spec.adapter_version or "", start_time=spec.created_at, end_time=time.time(),
            input_tokens=usage.input_tokens, cached_input_tokens=usage.cached_input_tokens,
            output_tokens=usage.output_tokens, engine_seconds=final.timings.engine_s,
            status=_STATUS.get(final.finish_reason, "ok"), labels=spec.labels, front=ctx.front,
        ))
