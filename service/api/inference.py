"""InferenceService: proto in, engine loop, proto out. Status codes come from exceptions (api.errors)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Protocol

import grpc
import structlog
from opentelemetry import trace

from service.accounting import RequestContext
from service.api import convert
from service.api.auth import current_tenant
from service.api.convert import Prepared, RequestConverter
from service.api.errors import (
    AdapterUnavailable,
    DeadlineExceeded,
    RequestCancelled,
    RequestFailed,
    current_request_id,
)
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from service.engine.outputs import RequestOutput
from service.engine.types import FinishReason
from service.loop import EngineLoop, LoopClosed, RequestHandle
from service.tenants import TenantLimiter
from service.tracing import RequestSpan

log = structlog.get_logger(__name__)

class AdapterHolder(Protocol):
    """Counts requests on each adapter version (a held version is never deleted under them)."""

    def hold(self, version_id: str) -> None: ...

    def release(self, version_id: str) -> None: ...


# How often a waiting RPC thread wakes to look at its deadline and liveness. Cancellation itself is
# immediate (the RPC's termination callback aborts the sequence); this only bounds a missed wake-up.
POLL_S = 0.25


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, loop: EngineLoop, converter: RequestConverter, *, base_model: str,
                 limiter: TenantLimiter | None = None, tracer: trace.Tracer | None = None,
                 adapters: AdapterHolder | None = None) -> None:
        self.loop = loop
        self.converter = converter
        self.base_model = base_model
        self.limiter = limiter
        self.tracer = tracer or trace.NoOpTracer()
        self.adapters = adapters

    # ---- RPCs ---------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        handle, prepared = self._start(request, context, "text_completion")
        token_ids: list[int] = []
        logprobs: list[pb.TokenLogprob] = []
        final: RequestOutput | None = None
        for out in self._follow(handle, context):
            token_ids.extend(out.new_token_ids)
            if out.new_logprobs:
                logprobs.extend(self.converter.logprobs(out.new_logprobs))
            final = out
        assert final is not None  # _follow ends only after a final output (or raises)
        return pb.GenerateResponse(
            text=final.text, token_ids=token_ids, finish_reason=convert.FINISH_REASONS[final.finish_reason],
            usage=convert.usage(final), adapter_version=prepared.adapter.version_id if prepared.adapter else "",
            seed=handle.request.seed, timings=convert.timings(handle.request), logprobs=logprobs,
            request_id=handle.request_id,
        )

    def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.GenerateStreamResponse]:
        handle, prepared = self._start(request, context, "text_completion")
        for out in self._follow(handle, context):
            msg = pb.GenerateStreamResponse(text=out.new_text, token_ids=out.new_token_ids,
                                            request_id=handle.request_id)
            if out.new_logprobs:
                msg.logprobs.extend(self.converter.logprobs(out.new_logprobs))
            if out.finished:
                msg.finish_reason = convert.FINISH_REASONS[out.finish_reason]
                msg.usage.CopyFrom(convert.usage(out))
                msg.adapter_version = prepared.adapter.version_id if prepared.adapter else ""
                msg.seed = handle.request.seed
                msg.timings.CopyFrom(convert.timings(handle.request))
            yield msg

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        ids = self.converter.prompt_ids(request)
        tok = self.converter.tokenizer
        return pb.TokenizeResponse(token_ids=ids, tokens=[tok.decode([i], skip_special_tokens=False) for i in ids],
                                   max_model_len=self.converter.max_model_len)

    # ---- helpers ------------------------------------------------------------------------
    def _start(self, request: convert.GenerateLike, context: grpc.ServicerContext,
               operation: str) -> tuple[RequestHandle, Prepared]:
        """Authorize, validate, admit under the tenant's limits, trace, submit. Anything refused on the way
        ends the span with the error and releases what was taken."""
        tenant = current_tenant()
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
            prepared = self.converter.prepare(request, tenant)
            adapter = prepared.adapter
            span.set_adapter(adapter.ref if adapter else None)
            structlog.contextvars.bind_contextvars(client_request_id=prepared.client_request_id or None,
                                                  adapter=adapter.ref if adapter else None)
            if adapter is not None and self.adapters is not None:
                self.adapters.hold(adapter.version_id)  # at once: a delete from now on sees it in use
                held = adapter.version_id
            if self.limiter is not None:
                lease = self.limiter.acquire(tenant, len(prepared.prompt_token_ids))
            ctx = RequestContext(tenant=tenant, adapter=adapter, base_model=self.base_model, lease=lease, span=span)
            handle = self.loop.submit(rid, prepared.prompt_token_ids, prepared.sampling,
                                      extra_key=adapter.version_id if adapter else None,
                                      priority=prepared.priority, context=ctx,
                                      cache_salt=tenant.id)  # KV is reused within a tenant, never across
        except BaseException as e:
            # Not submitted: the loop's on_finished will never run for it, so undo here.
            if held is not None:
                self.adapters.release(held)
            if lease is not None:
                lease.release()
            span.fail(e)
            raise

        def on_rpc_done() -> None:
            # Runs when the RPC ends for any reason; only a cancelled or expired one leaves work behind.
            if not handle.done:
                handle.cancel()

        if not context.add_callback(on_rpc_done):
            handle.cancel()  # the RPC ended while we were submitting
        return handle, prepared

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
                if out.finished:
                    self._check_final(handle, out, context)
                    self._log_finished(handle, out)
                yield out
                if out.finished:
                    return
        finally:
            if not handle.done:  # the client went away (or we raised): stop the sequence, free its blocks
                handle.cancel()
                log.info("request_abandoned", client_active=context.is_active())

    def _check_final(self, handle: RequestHandle, out: RequestOutput, context: grpc.ServicerContext) -> None:
        if out.finish_reason is FinishReason.ERROR:
            self._log_finished(handle, out)
            if out.error_kind == "adapter_unavailable":
                # The loader's own words may name storage details: those stay in the log above.
                version = handle.request.extra_key
                raise AdapterUnavailable(f"adapter version {version} could not be loaded, so the request did not "
                                         f"run; retry later or upload the adapter again (request id "
                                         f"{handle.request_id})")
            raise RequestFailed(out.error or "the engine failed the request")
        if out.finish_reason is FinishReason.CANCELLED:
            self._log_finished(handle, out)
            if handle.stopped_by_drain:
                raise LoopClosed("the server shut down before the request finished; retry on another replica")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the deadline passed before the request finished; it was stopped")
            raise RequestCancelled("the call was cancelled")

    def _log_finished(self, handle: RequestHandle, out: RequestOutput) -> None:
        req = handle.request
        log.info("request_finished", finish_reason=out.finish_reason.value if out.finish_reason else None,
                 input_tokens=out.num_prompt_tokens, cached_input_tokens=out.num_cached_tokens,
                 output_tokens=len(out.output_token_ids),
                 total_ms=round((req.finished_time - req.arrival_time) * 1000, 1) if req.finished_time else None,
                 error=out.error)
