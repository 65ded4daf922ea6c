"""InferenceService: proto in, engine loop, proto out. Status codes come from exceptions (api.errors)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

import grpc
import structlog
from opentelemetry import trace

from service.accounting import RequestContext
from service.api import convert
from service.api.auth import current_tenant
from service.api.convert import RequestConverter
from service.api.errors import (
    AdapterUnavailable,
    DeadlineExceeded,
    RequestCancelled,
    RequestFailed,
    current_request_id,
)
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from service.api.stalls import CallSlots, StallWatchdog, Wait
from service.engine.outputs import ErrorKind, FinalOutput, RequestOutput
from service.engine.types import FinishReason
from service.limits import Lease, TenantLimiter
from service.loop import EngineLoop, LoopClosed, RequestHandle
from service.tracing import RequestSpan

log = structlog.get_logger(__name__)

# How often a waiting RPC thread wakes to look at its deadline and liveness. Cancellation itself is
# immediate (the RPC's termination callback aborts the sequence); this only bounds a missed wake-up.
POLL_S = 0.25
RECORD_WAIT_S = 10.0  # past this, the response goes out anyway (the record may still land; it is logged)


class AdapterHolder(Protocol):
    """Counts requests on each adapter version (a held version is never deleted under them)."""

    def hold(self, version_id: str) -> None: ...

    def release(self, version_id: str) -> None: ...


class _Call:
    """What one generation call holds, let go of once: its tenant's lease and its call slot when its last
    message is written (or the call ends otherwise), its stall watch and (if unfinished) its sequence when
    the call ends."""

    def __init__(self, handle: RequestHandle, lease: Lease | None, release_slot: Callable[[], None] | None,
                 wait: Wait | None) -> None:
        self.handle, self._lease, self._release_slot, self._wait = handle, lease, release_slot, wait

    def waiting(self) -> None:
        if self._wait is not None:
            self._wait.waiting()

    def done_waiting(self) -> None:
        if self._wait is not None:
            self._wait.done()

    def release_limits(self) -> None:
        if self._lease is not None:
            self._lease.release()
        if self._release_slot is not None:
            self._release_slot()

    def end(self) -> None:
        if not self.handle.done:
            self.handle.cancel()
        if self._wait is not None:
            self._wait.close()
        self.release_limits()


def _await_recorded(handle: RequestHandle) -> None:
    """Until the request's usage row is committed: the client gets its last message only once it is billed
    (group commit keeps this to about one fsync)."""
    ctx = handle.context
    recorded = getattr(ctx, "recorded", None)
    if recorded is None:
        return
    try:
        if not recorded.result(timeout=RECORD_WAIT_S):
            log.error("usage_not_recorded_before_response")
    except FutureTimeout:
        log.error("usage_record_slow", waited_s=RECORD_WAIT_S)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, loop: EngineLoop, converter: RequestConverter, *, base_model: str,
                 limiter: TenantLimiter | None = None, tracer: trace.Tracer | None = None,
                 adapters: AdapterHolder | None = None, watchdog: StallWatchdog | None = None,
                 call_slots: CallSlots | None = None) -> None:
        self.loop = loop
        self.converter = converter
        self.base_model = base_model
        self.limiter = limiter
        self.tracer = tracer or trace.NoOpTracer()
        self.adapters = adapters
        self.watchdog = watchdog  # cancels a call whose client stops taking its messages
        self.call_slots = call_slots  # bounds the generations running at once below the RPC thread pool

    # ---- RPCs ---------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        call = self._start(request, context, "text_completion")
        handle = call.handle
        token_ids: list[int] = []
        logprobs: list[pb.TokenLogprob] = []
        final: FinalOutput | None = None
        for out in self._follow(handle, context):
            token_ids.extend(out.new_token_ids)
            if out.new_logprobs:
                logprobs.extend(self.converter.logprobs(out.new_logprobs))
            final = out.final
        assert final is not None  # _follow ends only after a final output (or raises)
        response = pb.GenerateResponse(
            text=final.text, token_ids=token_ids, finish_reason=convert.FINISH_REASONS[final.finish_reason],
            usage=convert.usage(final.usage), adapter_version=final.adapter_version or "", seed=final.seed,
            timings=convert.timings(final.timings), logprobs=logprobs, request_id=handle.request_id,
        )
        call.release_limits()  # the response goes out with the status, after this returns
        call.waiting()  # a client that never reads it is cut off by the watchdog
        return response

    def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.GenerateStreamResponse]:
        call = self._start(request, context, "text_completion")
        handle = call.handle
        for out in self._follow(handle, context):
            msg = pb.GenerateStreamResponse(text=out.new_text, token_ids=out.new_token_ids,
                                            request_id=handle.request_id)
            if out.new_logprobs:
                msg.logprobs.extend(self.converter.logprobs(out.new_logprobs))
            final = out.final
            if final is not None:
                msg.finish_reason = convert.FINISH_REASONS[final.finish_reason]
                msg.usage.CopyFrom(convert.usage(final.usage))
                msg.adapter_version = final.adapter_version or ""
                msg.seed = final.seed
                msg.timings.CopyFrom(convert.timings(final.timings))
            call.waiting()
            yield msg  # grpc asks for the next message only once this one is written
            call.done_waiting()
        call.release_limits()  # the last message is written: only the status is left to send

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        """Metered like a generation's prompt: the size is checked first, then the call holds one of the
        tenant's concurrent requests while the tokenizer runs, and its tokens are charged to the tenant's
        tokens-per-minute bucket."""
        self.converter.check_bounds(request)
        lease = self.limiter.acquire(current_tenant(), 0) if self.limiter is not None else None
        try:
            ids = self.converter.prompt_ids(request)
            if lease is not None:
                lease.charge(len(ids))
            tok = self.converter.tokenizer
            tokens = [tok.decode([i], skip_special_tokens=False) for i in ids]  # < max_model_len of them
        finally:
            if lease is not None:
                lease.release()
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens, max_model_len=self.converter.max_model_len)

    # ---- helpers ------------------------------------------------------------------------
    def _start(self, request: convert.GenerateLike, context: grpc.ServicerContext, operation: str) -> _Call:
        """Authorize, validate, admit under the server's and the tenant's limits, trace, submit. What the call
        holds (its call slot, the tenant's lease) is released when the call ends, its last message written;
        anything refused on the way ends the span with the error and releases what was taken."""
        tenant = current_tenant()
        release_slot = self.call_slots.acquire("generation") if self.call_slots is not None else None
        rid = current_request_id()
        span = RequestSpan(self.tracer, operation=operation, base_model=self.base_model, tenant=tenant.id,
                           request_id=rid, attributes={
                               "gen_ai.request.max_tokens": request.sampling.max_tokens
                               if request.sampling.HasField("max_tokens") else None,
                               "gen_ai.request.temperature": request.sampling.temperature
                               if request.sampling.HasField("temperature") else None,
                               "gen_ai.request.seed": request.sampling.seed
                               if request.sampling.HasField("seed") else None})
        structlog.contextvars.bind_contextvars(trace_id=span.trace_id)
        lease = None
        held = None
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            # Sizes first (cheap), then the tenant's lease, then the tokenizer: a tenant at its limits
            # costs the server no tokenizer work; the prompt is charged once its token count is known.
            self.converter.check_bounds(request)
            if self.limiter is not None:
                lease = self.limiter.acquire(tenant, 0)
            spec = self.converter.spec(request, tenant, rid, deadline)
            if spec.adapter_version is not None and self.adapters is not None:
                self.adapters.hold(spec.adapter_version)  # at once: a delete from now on sees it in use
                held = spec.adapter_version
            span.set_adapter(spec.adapter_ref)
            structlog.contextvars.bind_contextvars(client_request_id=spec.client_request_id or None,
                                                  adapter=spec.adapter_ref)
            if lease is not None:
                lease.charge(len(spec.prompt_token_ids))
            handle = self.loop.submit(spec, RequestContext(lease=lease, span=span))
        except BaseException as e:
            # Not submitted: the loop's on_finished will never run for it, so undo here.
            if held is not None:
                self.adapters.release(held)
            if lease is not None:
                lease.release()
            if release_slot is not None:
                release_slot()
            span.fail(e)
            raise
        call = _Call(handle, lease, release_slot,
                     self.watchdog.watch(context, "write") if self.watchdog is not None else None)
        if not context.add_callback(call.end):  # when the call ends for any reason
            call.end()  # the RPC ended while we were submitting
        return call

    def _follow(self, handle: RequestHandle, context: grpc.ServicerContext) -> Iterator[RequestOutput]:
        """The request's outputs up to and including the final one, or the exception its end maps to.
        Leaving early (client gone, deadline, error) aborts the sequence, which frees its KV blocks."""
        try:
            while True:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the deadline passed before the request finished; it was stopped")
                try:
                    out = handle.get(timeout=POLL_S if remaining is None else min(remaining, POLL_S))
                except queue.Empty:
                    if not context.is_active():
                        raise RequestCancelled("the call was cancelled") from None
                    continue
                if out.final is not None:
                    self._log_finished(out.final)
                    _await_recorded(handle)
                    self._check_final(handle, out.final, context)
                yield out
                if out.final is not None:
                    return
        finally:
            if not handle.done:  # the client went away (or we raised): stop the sequence, free its blocks
                handle.cancel()
                log.info("request_abandoned", client_active=context.is_active())

    @staticmethod
    def _check_final(handle: RequestHandle, final: FinalOutput, context: grpc.ServicerContext) -> None:
        kind = final.error.kind if final.error is not None else None
        if final.finish_reason is FinishReason.ERROR:
            if kind is ErrorKind.ADAPTER_UNAVAILABLE:
                # The loader's own words may name storage details: those stay in the log.
                raise AdapterUnavailable(f"adapter version {final.adapter_version} could not be loaded, so the "
                                         f"request did not run; retry later or upload the adapter again "
                                         f"(request id {handle.request_id})")
            if kind is ErrorKind.FORMAT_DEAD_END:
                raise ValueError(f"{final.error.message} (request id {handle.request_id})")
            raise RequestFailed(final.error.message if final.error else "the engine failed the request")
        if final.finish_reason is FinishReason.CANCELLED:
            if handle.stopped_by_drain:
                raise LoopClosed("the server shut down before the request finished; retry on another replica")
            remaining = context.time_remaining()
            if kind is ErrorKind.DEADLINE_EXCEEDED or (remaining is not None and remaining <= 0):
                raise DeadlineExceeded("the deadline passed before the request finished; it was stopped")
            raise RequestCancelled("the call was cancelled")

    @staticmethod
    def _log_finished(final: FinalOutput) -> None:
        log.info("request_finished", finish_reason=final.finish_reason.value, input_tokens=final.usage.input_tokens,
                 cached_input_tokens=final.usage.cached_input_tokens, output_tokens=final.usage.output_tokens,
                 total_ms=round(final.timings.total_s * 1000, 1),
                 error=final.error.message if final.error else None)
