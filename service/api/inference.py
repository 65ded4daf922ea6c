"""InferenceService: proto in, engine loop, proto out. Status codes come from exceptions (api.errors)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from service.api import convert
from service.api.auth import current_tenant
from service.api.errors import current_request_id
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.api.gen.loraserve.v1 import inference_pb2_grpc as pb_grpc
from service.api.generation import Generation, GenerationPath
from service.engine.outputs import FinalOutput


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """The gRPC front of the request path (`GenerationPath`): every generation holds one RPC thread and one
    call slot for its life."""

    def __init__(self, path: GenerationPath) -> None:
        self.path = path
        self.converter = path.converter
        self.limiter = path.limiter

    # ---- RPCs ---------------------------------------------------------------------------
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        call = self._start(request, context, streamed=False)
        handle = call.handle
        token_ids: list[int] = []
        logprobs: list[pb.TokenLogprob] = []
        prompt_logprobs: list[pb.TokenLogprob] = []
        final: FinalOutput | None = None
        for out in self.path.follow(handle, context):
            if out.prompt_logprobs:
                prompt_logprobs = self.converter.logprobs(out.prompt_logprobs)
            token_ids.extend(out.new_token_ids)
            if out.new_logprobs:
                logprobs.extend(self.converter.logprobs(out.new_logprobs))
            final = out.final
        assert final is not None  # follow() ends only after a final output (or raises)
        response = pb.GenerateResponse(
            text=final.text, token_ids=token_ids, finish_reason=convert.finish_reason(final, out.tool_calls),
            tool_calls=convert.tool_calls(out.tool_calls),
            usage=convert.usage(final.usage), adapter_version=final.adapter_version or "", seed=final.seed,
            timings=convert.timings(final.timings), logprobs=logprobs, request_id=handle.request_id,
            speculation=convert.speculation(final.speculation), prompt_logprobs=prompt_logprobs,
        )
        call.release_limits()  # the response goes out with the status, after this returns
        call.waiting()  # a client that never reads it is cut off by the watchdog
        return response

    def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.GenerateStreamResponse]:
        call = self._start(request, context, streamed=True)
        handle = call.handle
        for out in self.path.follow(handle, context):
            msg = pb.GenerateStreamResponse(text=out.new_text, token_ids=out.new_token_ids,
                                            request_id=handle.request_id)
            if out.new_logprobs:
                msg.logprobs.extend(self.converter.logprobs(out.new_logprobs))
            if out.prompt_logprobs:
                msg.prompt_logprobs.extend(self.converter.logprobs(out.prompt_logprobs))
            for d in out.tool_call_deltas or ():
                msg.tool_call_deltas.add(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
            final = out.final
            if final is not None:
                msg.finish_reason = convert.finish_reason(final, out.tool_calls)
                msg.tool_calls.extend(convert.tool_calls(out.tool_calls))
                msg.usage.CopyFrom(convert.usage(final.usage))
                msg.adapter_version = final.adapter_version or ""
                msg.seed = final.seed
                msg.timings.CopyFrom(convert.timings(final.timings))
                msg.speculation.CopyFrom(convert.speculation(final.speculation))
            call.waiting()
            yield msg  # grpc asks for the next message only once this one is written
            call.done_waiting()
        call.release_limits()  # the last message is written: only the status is left to send

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        """Metered like a generation's prompt (`GenerationPath.tokenize`)."""
        ids, tokens = self.path.tokenize(request, current_tenant())
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens, max_model_len=self.converter.max_model_len)

    # ---- helpers ------------------------------------------------------------------------
    def _start(self, request: convert.GenerateLike, context: grpc.ServicerContext, *, streamed: bool) -> Generation:
        return self.path.start(request, context, tenant=current_tenant(), request_id=current_request_id(),
                               front="grpc", streamed=streamed)
