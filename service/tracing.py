"""OpenTelemetry: one span per generation request, with the GenAI semantic-convention attributes.

The server gets its own TracerProvider (never the process-global one), so tests read spans from an
in-memory exporter and two servers in one process keep their traces apart. OTLP/gRPC export is on when
an endpoint is configured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service.engine.outputs import FinalOutput
from service.engine.types import FinishReason

PROVIDER_NAME = "loraserve"


def make_tracer_provider(service_name: str = "loraserve", otlp_endpoint: str | None = None,
                         exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    for exporter in exporters:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


_FINISH = {FinishReason.STOP: "stop", FinishReason.EOS: "stop", FinishReason.LENGTH: "length",
           FinishReason.CANCELLED: "cancelled", FinishReason.ERROR: "error"}


class RequestSpan:
    """The span of one Generate / GenerateStream call. Started on the RPC thread; ended exactly once,
    either by `finish` (the engine's final output, on the loop thread) or by `fail` (refused before it
    reached the engine)."""

    def __init__(self, tracer: trace.Tracer, *, operation: str, base_model: str, tenant: str, request_id: str,
                 attributes: dict[str, Any]) -> None:
        self.span: Span = tracer.start_span(f"{operation} {base_model}", kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER_NAME,
            "gen_ai.request.model": base_model, "loraserve.tenant.id": tenant,
            "loraserve.request.id": request_id, **{k: v for k, v in attributes.items() if v is not None},
        })
        self.base_model = base_model
        self._ended = False

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def set_adapter(self, ref: str | None) -> None:
        if ref:
            self.span.set_attribute("loraserve.adapter", ref)

    def finish(self, final: FinalOutput) -> None:
        if self._ended:
            return
        self._ended = True
        s = self.span
        t = final.timings
        s.set_attribute("gen_ai.response.model", final.adapter_version or self.base_model)
        s.set_attribute("gen_ai.usage.input_tokens", final.usage.input_tokens)
        s.set_attribute("gen_ai.usage.output_tokens", final.usage.output_tokens)
        s.set_attribute("loraserve.usage.cached_input_tokens", final.usage.cached_input_tokens)
        s.set_attribute("gen_ai.response.finish_reasons", [_FINISH[final.finish_reason]])
        s.set_attribute("loraserve.engine_seconds", round(t.engine_s, 6))
        for key, value in final.spec.labels.items():
            s.set_attribute(f"loraserve.label.{key}", value)
        if t.queue_s is not None:
            s.set_attribute("loraserve.queue_time_s", t.queue_s)
        if t.ttft_s is not None:
            s.set_attribute("loraserve.time_to_first_token_s", t.ttft_s)
        if final.finish_reason is FinishReason.ERROR:
            s.set_status(Status(StatusCode.ERROR, final.error.message if final.error else "the engine failed"))
            s.set_attribute("error.type", final.error.kind.value if final.error else "internal")
        elif final.finish_reason is FinishReason.CANCELLED:
            s.set_attribute("error.type", final.error.kind.value if final.error else "cancelled")
        s.end()

    def fail(self, exc: BaseException) -> None:
        if self._ended:
            return
        self._ended = True
        self.span.set_status(Status(StatusCode.ERROR, str(exc)))
        self.span.set_attribute("error.type", type(exc).__name__)
        self.span.end(end_time=time.time_ns())
