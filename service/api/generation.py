"""The one request path of a generation, whichever front (gRPC or HTTP) it came through.

A front turns its call into a `GenerateRequest`-like message and a `CallContext` (deadline, liveness, end
callbacks, cancel), then `GenerationPath.start` authorizes, validates, admits under the server's and the
tenant's limits, traces and submits it, exactly once for both fronts; the outputs come back through
`follow` (a thread waiting, as gRPC's) or through `outputs_ready` + `take` (an event loop, as the HTTP
front's), and `final` turns a request's end into its answer or the exception its status maps to. The usage
row and the span of every request name the front that served it.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal, Protocol

import structlog
from opentelemetry import trace

from service.accounting import RequestContext
from service.api import convert
from service.api.convert import RequestConverter
from service.api.errors import AdapterUnavailable, DeadlineExceeded, RequestCancelled, RequestFailed
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.stalls import CallSlots, StallWatchdog, Wait
from service.api.tools import ToolSet
from service.engine.outputs import ErrorKind, FinalOutput, RequestOutput
from service.engine.request import RequestSpec
from service.engine.types import FinishReason
from service.limits import Lease, TenantLimiter
from service.loop import EngineLoop, LoopClosed
from service.request_handle import RequestHandle
from service.tracing import RequestSpan

log = structlog.get_logger("service.api.inference")

Front = Literal["grpc", "http"]
FRONTS: tuple[Front, ...] = ("grpc", "http")
# How often a waiting thread wakes to look at its deadline and liveness. Cancellation itself is immediate
# (the call's end callback aborts the sequence); this only bounds a missed wake-up.
POLL_S = 0.25
RECORD_WAIT_S = 10.0  # past this, the response goes out anyway (the record may still land; it is logged)


class CallContext(Protocol):
    """What the request path needs of a call, whatever its transport (grpc.ServicerContext has all of it)."""

    def time_remaining(self) -> float | None:
        """Seconds to the call's deadline; None without one."""
        ...

    def is_active(self) -> bool:
        """The client is still there."""
        ...

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends; False if it has ended already."""
        ...

    def cancel(self) -> None:
        """End the call from the server's side (a stalled client)."""
        ...


class AdapterHolder(Protocol):
    """Counts requests on each adapter version (a held version is never deleted under them)."""

    def hold(self, version_id: str) -> None: ...

    def release(self, version_id: str) -> None: ...


class Generation:
    """What one generation call holds, let go of once: its tenant's lease and its call slot when its last
    message is written (or the call ends otherwise), its stall watch and (if unfinished) its sequence when
    the call ends."""

    def __init__(self, handle: RequestHandle, lease: Lease | None, release_slot: Callable[[], None] | None,
                 wait: Wait | None, log_context: dict[str, Any]) -> None:
        self.handle, self._lease, self._release_slot, self._wait = handle, lease, release_slot, wait
        self.log_context = log_context  # trace id, adapter, client request id: for the front's log lines

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


class GenerationPath:
    def __init__(self, loop: EngineLoop, converter: RequestConverter, *, base_model: str,
                 limiter: TenantLimiter | None = None, tracer: trace.Tracer | None = None,
                 adapters: AdapterHolder | None = None, watchdog: StallWatchdog | None = None,
                 call_slots: CallSlots | None = None,
                 on_adapter_named: Callable[[str, str], None] | None = None, stream_interval: int = 1) -> None:
        """`call_slots` bound the generations that hold a server thread for their whole life (gRPC's);
        `on_adapter_named(version_id, reference)` learns the reference a request named its adapter by (the
        gateway-facing LoRA metric lists adapters by the names requests use); `stream_interval`: the tokens a
        streamed message gathers (the first token and the last message go at once), see `RequestHandle`."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval={stream_interval} is invalid: must be >= 1")
        self.loop = loop
        self.converter = converter
        self.base_model = base_model
        self.limiter = limiter
        self.tracer = tracer or trace.NoOpTracer()
        self.adapters = adapters
        self.watchdog = watchdog  # cancels a call whose client stops taking its messages
        self.call_slots = call_slots
        self.on_adapter_named = on_adapter_named
        self.stream_interval = stream_interval

    def start(self, request: convert.GenerateLike, call: CallContext, *, tenant: Any, request_id: str,
              front: Front, streamed: bool, operation: str = "text_completion",
              use_call_slot: bool = True) -> Generation:
        """Authorize, validate, admit under the server's and the tenant's limits, trace, submit. What the call
        holds (its call slot, the tenant's lease) is released when the call ends, its last message written;
        anything refused on the way ends the span with the error and releases what was taken. `streamed`: the
        caller sends the outputs as they come (else it gets the final output alone, not one per token)."""
        return self.start_group([request], call, tenant=tenant, request_ids=[request_id], front=front,
                                streamed=streamed, operation=operation, use_call_slot=use_call_slot)[0]

    def start_group(self, requests: list[convert.GenerateLike], call: CallContext, *, tenant: Any,
                    request_ids: list[str], front: Front, streamed: bool, operation: str = "text_completion",
                    use_call_slot: bool = True, n: int = 1) -> list[Generation]:
        """`start` for the requests of one call (an HTTP body's choices), all or none: every request is validated
        before any is submitted, and the tenant admits them together (`TenantLimiter.acquire_many`). `n`: the
        requests come in runs of n that differ only in their seed (n choices of one prompt); the first of each run
        is tokenized and checked, the others copy its spec."""
        if not requests or n < 1 or len(requests) % n or len(requests) != len(request_ids):
            raise ValueError(f"{len(requests)} requests, {len(request_ids)} request ids, runs of {n}")
        if use_call_slot and len(requests) > 1:
            raise ValueError("a call slot is held by one generation: a group of several starts without one")
        release_slot = (self.call_slots.acquire("generation")
                        if self.call_slots is not None and use_call_slot else None)
        try:
            spans = [self._span(request, tenant, rid, front, operation)
                     for request, rid in zip(requests, request_ids)]
        except BaseException:
            if release_slot is not None:
                release_slot()
            raise
        log_context: dict[str, Any] = {"trace_id": spans[0].trace_id, "front": front}
        structlog.contextvars.bind_contextvars(**log_context)
        leases: list[Lease] = []
        held: list[str] = []  # one per request, or none (a call's requests name one model)
        handles: list[RequestHandle] = []
        try:
            remaining = call.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            # Sizes first (cheap), then the tenant's leases, then the tokenizer: a tenant at its limits
            # costs the server no tokenizer work; the prompts are charged once their token counts are known.
            for request in requests:
                self.converter.check_bounds(request)
            if self.limiter is not None:
                leases = self.limiter.acquire_many(tenant, len(requests), 0)
            specs: list[RequestSpec] = []
            toolsets: list[ToolSet | None] = []
            for i, (request, rid) in enumerate(zip(requests, request_ids)):
                if i % n == 0:
                    try:
                        spec, toolset = self.converter.spec_and_tools(request, tenant, rid, deadline)
                        specs.append(spec)
                        toolsets.append(toolset)
                    except ValueError as e:
                        if type(e) is not ValueError or len(requests) == n:
                            raise
                        raise ValueError(f"prompt[{i // n}]: {e}") from None  # several prompts: say which
                else:  # another choice of the same prompt: its seed alone differs
                    first = specs[i - i % n]
                    seed = request.sampling.seed if request.sampling.HasField("seed") else None
                    specs.append(dataclasses.replace(first, request_id=rid, sampling=dataclasses.replace(
                        first.sampling, seed=seed)))
                    toolsets.append(toolsets[i - i % n])
                version = specs[-1].adapter_version
                if version is not None and self.adapters is not None:
                    self.adapters.hold(version)  # at once: a delete from now on sees it in use
                    held.append(version)
            spec, request = specs[0], requests[0]
            if spec.adapter_version is not None and self.on_adapter_named is not None:
                self.on_adapter_named(spec.adapter_version, request.adapter)
            for span, s in zip(spans, specs):
                span.set_adapter(s.adapter_ref)
            log_context.update(client_request_id=spec.client_request_id or None, adapter=spec.adapter_ref)
            structlog.contextvars.bind_contextvars(**log_context)
            for lease, s in zip(leases, specs):
                lease.charge(len(s.prompt_token_ids))
            for i, s in enumerate(specs):
                handle = self.loop.submit(s, RequestContext(lease=leases[i] if leases else None, span=spans[i],
                                                            front=front),
                                          stream_interval=self.stream_interval if streamed else None)
                parser = toolsets[i].parser() if toolsets[i] is not None else None
                if parser is not None:
                    handle.transform = parser.apply  # before any reader: the handle is not handed out yet
                handles.append(handle)
        except BaseException as e:
            # Not submitted: the loop's on_finished will never run for them, so undo here. (`loop.submit` raises
            # only when the loop is closed or its queue full: a group cut short there stops what it submitted.)
            submitted = handles
            for h in submitted:
                h.cancel()  # their holds and spans end with them, on the loop (Accounting.on_finished)
            for version in held[len(submitted):]:
                self.adapters.release(version)
            for lease in leases:  # the loop charges a lease but never releases it: every one goes here
                lease.release()
            if release_slot is not None:
                release_slot()
            for span in spans[len(submitted):]:
                span.fail(e)
            raise
        gens = []
        for i, handle in enumerate(handles):
            gen = Generation(handle, leases[i] if leases else None, release_slot if i == 0 else None,
                             self.watchdog.watch(call, "write") if self.watchdog is not None else None, log_context)
            if not call.add_callback(gen.end):  # when the call ends for any reason
                gen.end()  # the call ended while we were submitting
            gens.append(gen)
        return gens

    def _span(self, request: convert.GenerateLike, tenant: Any, request_id: str, front: Front,
              operation: str) -> RequestSpan:
        sampling = request.sampling
        return RequestSpan(self.tracer, operation=operation, base_model=self.base_model, tenant=tenant.id,
                           request_id=request_id, attributes={
                               "loraserve.front": front,
                               "gen_ai.request.max_tokens": sampling.max_tokens
                               if sampling.HasField("max_tokens") else None,
                               "gen_ai.request.temperature": sampling.temperature
                               if sampling.HasField("temperature") else None,
                               "gen_ai.request.seed": sampling.seed if sampling.HasField("seed") else None})

    # ---- tokens -----------------------------------------------------------------------------------------
    def tokenize(self, request: pb.TokenizeRequest, tenant: Any) -> tuple[list[int], list[str]]:
        """A prompt's token ids as a generation would see them, and each token's text. Metered like a generation's
        prompt: the size is checked first, then the call holds one of the tenant's concurrent requests while the
        tokenizer runs, and its tokens are charged to the tenant's tokens-per-minute bucket."""
        self.converter.check_bounds(request)
        lease = self.limiter.acquire(tenant, 0) if self.limiter is not None else None
        try:
            ids = self.converter.prompt_ids(request)
            if lease is not None:
                lease.charge(len(ids))
            return ids, [self.converter.piece(i) for i in ids]  # < max_model_len of them
        finally:
            if lease is not None:
                lease.release()

    def detokenize(self, ids: list[int]) -> str:
        """Token ids (fewer than the context window, each in the vocabulary) back to text, special tokens kept."""
        if len(ids) >= self.converter.max_model_len:
            raise ValueError(f"tokens has {len(ids)} ids; at most {self.converter.max_model_len - 1} (the context "
                             "window less one) are allowed")
        self.converter.check_ids("tokens", ids)
        return self.converter.tokenizer.decode(ids, skip_special_tokens=False)

    # ---- outputs, for a thread that may wait ------------------------------------------------------------
    def follow(self, handle: RequestHandle, call: CallContext) -> Iterator[RequestOutput]:
        """The request's outputs up to and including the final one, or the exception its end maps to.
        Leaving early (client gone, deadline, error) aborts the sequence, which frees its KV blocks."""
        try:
            while True:
                remaining = call.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the deadline passed before the request finished; it was stopped")
                try:
                    out = handle.get(timeout=POLL_S if remaining is None else min(remaining, POLL_S))
                except queue.Empty:
                    if not call.is_active():
                        raise RequestCancelled("the call was cancelled") from None
                    continue
                if out.final is not None:
                    self.log_finished(out.final)
                    wait_recorded(handle)
                    self.check_final(handle, out.final, call)
                yield out
                if out.final is not None:
                    return
        finally:
            abandon(handle, call)

    # ---- the end of a request, for either kind of waiter ------------------------------------------------
    @staticmethod
    def log_finished(final: FinalOutput) -> None:
        log.info("request_finished", finish_reason=final.finish_reason.value, input_tokens=final.usage.input_tokens,
                 cached_input_tokens=final.usage.cached_input_tokens, output_tokens=final.usage.output_tokens,
                 draft_tokens=final.speculation.draft_tokens, accepted_tokens=final.speculation.accepted_tokens,
                 total_ms=round(final.timings.total_s * 1000, 1),
                 error=final.error.message if final.error else None)

    @staticmethod
    def check_final(handle: RequestHandle, final: FinalOutput, call: CallContext) -> None:
        """Raise what a request that did not end with its answer maps to (nothing for one that did)."""
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
            remaining = call.time_remaining()
            if kind is ErrorKind.DEADLINE_EXCEEDED or (remaining is not None and remaining <= 0):
                raise DeadlineExceeded("the deadline passed before the request finished; it was stopped")
            raise RequestCancelled("the call was cancelled")


def recorded_future(handle: RequestHandle) -> Future[bool] | None:
    """Done once the request's usage row is committed (None for a request nobody bills)."""
    return getattr(handle.context, "recorded", None)


def wait_recorded(handle: RequestHandle) -> None:
    """Until the request's usage row is committed: the client gets its last message only once it is billed
    (group commit keeps this to about one fsync)."""
    recorded = recorded_future(handle)
    if recorded is None:
        return
    try:
        if not recorded.result(timeout=RECORD_WAIT_S):
            log.error("usage_not_recorded_before_response")
    except FutureTimeout:
        log.error("usage_record_slow", waited_s=RECORD_WAIT_S)


def abandon(handle: RequestHandle, call: CallContext) -> None:
    """The waiter leaves: an unfinished request (client gone, deadline, error) is stopped, its blocks freed."""
    if not handle.done:
        handle.cancel()
        log.info("request_abandoned", client_active=call.is_active())
