"""The OpenAI-compatible HTTP front: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, vLLM's
`POST /tokenize` and `POST /detokenize`, `GET /health`, `GET /metrics`, as a Starlette app served by uvicorn beside
the gRPC server (`http_server`).

Every generation goes through the request path gRPC uses (`GenerationPath`): the body becomes a
`GenerateRequest`, which is validated, admitted, traced, billed and submitted by the same code. Starting a
request (tokenizer, a response format's compile) runs on a worker thread; waiting for its tokens does not: the
engine loop wakes the event loop when a request has output (`RequestHandle.on_output`), so a thousand open
streams cost no thread each. A client that disconnects mid-stream cancels its request (billed as cancelled);
one that stops reading is cut off by the same stall watchdog as gRPC's.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.registry import MAX_PAGE_SIZE, AdapterRegistry
from adapters.registry_types import LOCAL_OWNER
from service.api import openai_output as oo
from service.api import openai_schema as oa
from service.api.auth import Authenticator
from service.api.errors import (
    ErrorLogs,
    new_request_id,
    set_request_id,
)
from service.api.generation import (
    Generation,
    GenerationPath,
)
from service.api.http_call import HttpCall, call_timeout, follow
from service.api.http_errors import HttpError, http_error, log_refusal
from service.engine.outputs import FinalOutput, RequestOutput
from service.loop import LoopClosed
from service.tenants import Tenant

log = structlog.get_logger("service.api")

JSON_TYPES = ("application/json",)


@dataclass
class HttpFront:
    """What the app needs of the server."""

    path: GenerationPath
    auth: Authenticator
    base_model: str
    list_models: Callable[[Any], list[dict[str, Any]]]  # tenant -> OpenAI model objects it may use
    serving: Callable[[], bool]  # health: loaded, warmed up, not draining, engine healthy
    draining: Callable[[], bool]
    metrics_text: Callable[[], tuple[bytes, str]]
    logs: ErrorLogs
    start_limiter: anyio.CapacityLimiter  # threads that start requests (tokenizer, format compile)


async def _body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise HttpError(415 if ctype else 400, f"the body must be JSON (Content-Type: application/json), not "
                        f"{ctype[:60]!r}")
    return await request.body()


def _parse(model: type, body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise ValueError(oa.validation_message(e)) from None


class OpenAIApp:
    def __init__(self, front: HttpFront) -> None:
        self.f = front
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_exception})

    # ---- plain endpoints --------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.f.serving():
            return JSONResponse({"status": "serving"})
        return JSONResponse({"status": "draining" if self.f.draining() else "not_serving"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        body, ctype = self.f.metrics_text()
        return Response(body, media_type=ctype)

    async def models(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            tenant = self.f.auth.authenticate_header(request.headers.get("authorization"))
            data = await anyio.to_thread.run_sync(self.f.list_models, tenant, limiter=self.f.start_limiter)
            for model in data:  # as vLLM lists it: prompt + max_tokens must fit
                model["max_model_len"] = self.f.path.converter.max_model_len
        except Exception as e:
            return self._error(e, request, t0)
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: metered as gRPC's Tokenize (one of the tenant's concurrent requests while it runs, its
        tokens charged to the tenant's rate)."""
        async def run(tenant: Tenant, body: bytes) -> dict[str, Any]:
            parsed = _parse(oa.TokenizeRequest, body)
            pbreq = oa.tokenize_request(parsed)
            if parsed.model is not None and parsed.model != self.f.base_model:  # 404 as a generation would get
                await anyio.to_thread.run_sync(self.f.path.converter.check_model, parsed.model, tenant,
                                               limiter=self.f.start_limiter)
            ids, pieces = await anyio.to_thread.run_sync(self.f.path.tokenize, pbreq, tenant,
                                                         limiter=self.f.start_limiter)
            return {"count": len(ids), "max_model_len": self.f.path.converter.max_model_len, "tokens": ids,
                    "token_strs": pieces if parsed.return_token_strs else None}
        return await self._small(request, run)

    async def detokenize(self, request: Request) -> Response:
        async def run(tenant: Tenant, body: bytes) -> dict[str, Any]:
            parsed = _parse(oa.DetokenizeRequest, body)
            if parsed.model is not None and parsed.model != self.f.base_model:
                await anyio.to_thread.run_sync(self.f.path.converter.check_model, parsed.model, tenant,
                                               limiter=self.f.start_limiter)
            text = await anyio.to_thread.run_sync(self.f.path.detokenize, parsed.tokens, limiter=self.f.start_limiter)
            return {"prompt": text}
        return await self._small(request, run)

    async def _small(self, request: Request, run: Callable) -> Response:
        """A short authenticated call: its JSON answer, or the error's."""
        t0 = time.perf_counter()
        try:
            tenant = self.f.auth.authenticate_header(request.headers.get("authorization"))
            body = await _body(request)
            return JSONResponse(await run(tenant, body))
        except Exception as e:
            return self._error(e, request, t0)

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.url.path[:80]}; this server answers /v1/chat/completions, "
                        "/v1/completions, /v1/models, /tokenize, /detokenize, /health and /metrics",
                   405: f"{request.method} is not allowed on {request.url.path[:80]}"}.get(exc.status_code,
                                                                                       str(exc.detail))
        return JSONResponse(oo.error_body(message, exc.status_code), status_code=exc.status_code,
                            headers=exc.headers)

    def _error(self, exc: BaseException, request: Request, t0: float, rid: str | None = None) -> Response:
        status, message, code, headers = http_error(exc)
        log_refusal(self.f.logs, exc, status, message, request.url.path, round((time.perf_counter() - t0) * 1000, 1))
        if rid:
            headers["x-request-id"] = rid
        return JSONResponse(oo.error_body(message, status, code), status_code=status, headers=headers)

    # ---- generations ------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, oa.ChatRequest, oa.chat_request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, oa.CompletionRequest, oa.completion_request, chat=False)

    async def _generate(self, request: Request, model: type, convert: Callable, *, chat: bool) -> Response:
        t0 = time.perf_counter()
        rid = new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=rid, method=request.url.path)
        set_request_id(rid)
        try:
            if self.f.draining():
                raise LoopClosed("the server is shutting down and takes no new requests; retry on another replica")
            # Authentication first: a caller without a valid key learns nothing about its body.
            tenant = self.f.auth.authenticate_header(request.headers.get("authorization"))
            structlog.contextvars.bind_contextvars(tenant=tenant.id)
            call = HttpCall(call_timeout(request))
            body = await _body(request)
            parsed = _parse(model, body)
            pbreqs = convert(parsed, self.f.base_model)
            echo = not chat and parsed.echo
            gens = await anyio.to_thread.run_sync(lambda: self._start(pbreqs, call, tenant, rid, parsed.stream, parsed.n),
                                                  limiter=self.f.start_limiter)
        except Exception as e:
            return self._error(e, request, t0, rid)
        structlog.contextvars.bind_contextvars(**gens[0].log_context)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + rid.removeprefix("req-"), "created": int(time.time()),
                "model": parsed.model}
        if parsed.stream:
            options = parsed.stream_options
            usage = "continuous" if options is not None and options.include_usage and options.continuous_usage_stats \
                else "last" if options is not None and options.include_usage else None
            # The background task ends the call if the stream never started (a client gone before its first
            # byte): an async generator that never ran never runs its `finally` either.
            return StreamingResponse(self._stream(gens, call, meta, chat, usage, parsed.n, pbreqs, echo),
                                     media_type="text/event-stream",
                                     headers={"x-request-id": rid, "cache-control": "no-cache"},
                                     background=BackgroundTask(call.end))
        try:
            body = await self._unary(gens, call, request, meta, chat, parsed.n, pbreqs, echo)
        except Exception as e:
            return self._error(e, request, t0, rid)
        finally:
            call.end()
        return JSONResponse(body, headers={"x-request-id": rid})

    def _start(self, pbreqs: list, call: HttpCall, tenant: Tenant, rid: str, streamed: bool, n: int
               ) -> list[Generation]:
        """One generation per choice (request ids `rid`, or `rid-0`, `rid-1`, ... for several), all or none: every
        choice is checked and the tenant admits them together before any is submitted; the n choices of a prompt
        are tokenized once."""
        cap = tenant.limits.max_concurrent_requests
        if cap is not None and len(pbreqs) > cap:  # could never start: not worth a retry
            raise ValueError(f"this call asks for {len(pbreqs)} choices (n times its prompts), each a request of its "
                             f"own; tenant {tenant.id!r} may run at most {cap} at once (max_concurrent_requests)")
        ids = [rid] if len(pbreqs) == 1 else [f"{rid}-{i}" for i in range(len(pbreqs))]
        return self.f.path.start_group(pbreqs, call, tenant=tenant, request_ids=ids, front="http", streamed=streamed,
                                       use_call_slot=False, n=n)

    async def _unary(self, gens: list[Generation], call: HttpCall, request: Request, meta: dict, chat: bool,
                     n: int, pbreqs: list, echo: bool) -> dict:
        async def collect(gen: Generation) -> tuple[FinalOutput, list, list]:
            logprobs: list = []
            final: FinalOutput | None = None
            calls: list = []
            async for out in follow(self.f.path, gen, call, request):
                if out.prompt_logprobs:  # on the first output: before the completion's
                    logprobs.extend(self.f.path.converter.logprobs(out.prompt_logprobs))
                if out.new_logprobs:
                    logprobs.extend(self.f.path.converter.logprobs(out.new_logprobs))
                final, calls = out.final, out.tool_calls or []
            assert final is not None
            gen.release_limits()
            return final, logprobs, calls

        if len(gens) == 1:
            results = [await collect(gens[0])]
        else:  # the first choice to fail fails the call (the call's end then stops the others)
            tasks = [asyncio.create_task(collect(gen)) for gen in gens]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                failed = [task.exception() for task in tasks if task.done() and task.exception() is not None]
                if failed:  # each one retrieved (no "never retrieved" warning); the first in choice order raised
                    raise failed[0]
                results = [task.result() for task in tasks]  # all done: none failed
            finally:
                for task in tasks:
                    task.cancel()
        choices = []
        finals = []
        for i, (gen, (final, logprobs, calls)) in enumerate(zip(gens, results, strict=True)):
            finals.append(final)
            wants_logprobs = gen.handle.spec.sampling.logprobs is not None
            choice: dict[str, Any] = {"index": i, "finish_reason": oo.finish_reason(final, calls), "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": final.text}
                if calls:  # what the answer says besides its calls, if anything, stays in content
                    choice["message"] = {"role": "assistant", "content": final.text or None,
                                         "tool_calls": oo.tool_calls(calls)}
                if wants_logprobs:
                    choice["logprobs"] = oo.chat_logprobs(logprobs)
            else:
                if echo:
                    prompt, first = self._echoed(pbreqs[i], gen)
                    choice["text"] = prompt + final.text
                    if wants_logprobs:
                        choice["logprobs"] = oo.completion_logprobs(logprobs, first=first)
                else:
                    choice["text"] = final.text
                    if wants_logprobs:
                        choice["logprobs"] = oo.completion_logprobs(logprobs)
            choices.append(choice)
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": oo.usage(finals, n), "system_fingerprint": finals[0].adapter_version or None}

    def _echoed(self, pbreq: Any, gen: Generation) -> tuple[str, str]:
        """An echoed prompt's text (as sent, or its token ids decoded) and its first token's text."""
        ids = gen.handle.spec.prompt_token_ids
        text = pbreq.text if pbreq.WhichOneof("prompt") == "text" else \
            self.f.path.converter.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text, self.f.path.converter.piece(ids[0])

    async def _stream(self, gens: list[Generation], call: HttpCall, meta: dict, chat: bool, include_usage: str | None,
                      n: int, pbreqs: list, echo: bool) -> AsyncIterator[bytes]:
        """The choices' chunks as their outputs come (each chunk one choice's, by `index`), then, with
        `include_usage`, one chunk with the call's usage ("last"; "continuous", vLLM's `continuous_usage_stats`: each
        chunk also carries its choice's usage so far)."""
        call.task = asyncio.current_task()
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = [True] * len(gens)
        offset = [0] * len(gens)
        finals: list[FinalOutput | None] = [None] * len(gens)
        generated = [0] * len(gens)  # each choice's tokens so far
        try:
            async for i, out in self._merged(gens, call):
                gen = gens[i]
                final = out.final
                generated[i] += len(out.new_token_ids)  # (a chunk skipped below still counts its tokens)
                wants_logprobs = gen.handle.spec.sampling.logprobs is not None
                if not out.new_text and final is None and not out.tool_call_deltas and (not out.new_token_ids or (
                        gen.handle.transform is not None and not first[i] and not wants_logprobs)):
                    continue  # nothing to say (a tool call's tokens whose text is held)
                choice: dict[str, Any] = {"index": i, "finish_reason": oo.finish_reason(final, out.tool_calls),
                                          "logprobs": None}
                lps = self.f.path.converter.logprobs(out.new_logprobs) if out.new_logprobs else []
                if chat:
                    delta: dict[str, Any] = {"role": "assistant"} if first[i] else {}
                    if out.tool_call_deltas:  # calls as they are written: openings, then pieces of arguments
                        if out.new_text:
                            delta["content"] = out.new_text
                        delta["tool_calls"] = oo.tool_call_deltas(out.tool_call_deltas)
                    elif out.new_text or not out.tool_calls:  # a last chunk after calls says only how it ended
                        delta["content"] = out.new_text
                    choice["delta"] = delta
                    if wants_logprobs:
                        choice["logprobs"] = oo.chat_logprobs(lps)
                else:
                    choice["text"] = out.new_text
                    lead = None
                    if echo and first[i]:  # the prompt goes first, in the choice's first chunk
                        prompt, lead = self._echoed(pbreqs[i], gen)
                        choice["text"] = prompt + out.new_text
                        if out.prompt_logprobs:
                            lps = self.f.path.converter.logprobs(out.prompt_logprobs) + lps
                    if wants_logprobs:
                        # Offsets count each token's own text, as the unary answer's do: the same whatever
                        # tokens a chunk holds (the server's stream interval, speculative steps).
                        choice["logprobs"] = oo.completion_logprobs(lps, offset[i], first=lead)
                        offset[i] += sum(len(t.token) for t in lps) + (len(lead) if lead is not None else 0)
                first[i] = False
                chunk = {**meta, "object": obj, "choices": [choice]}
                if include_usage == "continuous":
                    prompt = len(gen.handle.spec.prompt_token_ids)
                    chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": generated[i],
                                      "total_tokens": prompt + generated[i]}
                elif include_usage:
                    chunk["usage"] = None
                if final is not None:
                    gen.release_limits()
                    finals[i] = final
                gen.waiting()
                yield _sse(chunk)
                gen.done_waiting()
            if include_usage:
                done = [f for f in finals if f is not None]
                yield _sse({**meta, "object": obj, "choices": [], "usage": oo.usage(done, n)})
        except Exception as e:  # the status line is sent: the error goes out as an event
            status, message, code, _ = http_error(e)
            log_refusal(self.f.logs, e, status, message, "stream", 0.0)
            yield _sse(oo.error_body(message, status, code))
        finally:
            call.end()
        yield b"data: [DONE]\n\n"

    async def _merged(self, gens: list[Generation], call: HttpCall) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) of every generation as they come, up to each one's final output; the first
        error of any ends the merge with it (the call's end then stops the others)."""
        if len(gens) == 1:
            async for out in follow(self.f.path, gens[0], call):
                yield 0, out
            return
        items: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            try:
                async for out in follow(self.f.path, gen, call):
                    items.put_nowait((i, out, None))
            except Exception as e:
                items.put_nowait((i, None, e))

        tasks = [asyncio.create_task(pump(i, gen)) for i, gen in enumerate(gens)]
        try:
            left = len(gens)
            while left:
                i, out, err = await items.get()
                if err is not None:
                    raise err
                if out.final is not None:
                    left -= 1
                yield i, out
        finally:
            for task in tasks:
                task.cancel()


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def model_object(model_id: str, owned_by: str, created: float, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by, "root": root,
            "parent": parent}


MAX_MODEL_PAGES = 10  # GET /v1/models lists at most this many registry pages of adapters


def list_models(registry: AdapterRegistry, tenant: Tenant, base_model: str, started_at: float) -> list[dict]:
    """GET /v1/models: the base model, then every adapter `tenant` may use, by the reference it would use
    (its own and the service's by bare name, other tenants' shared ones as owner/name)."""
    infos = []
    token = ""
    for _ in range(MAX_MODEL_PAGES):
        page = registry.list(tenant.id, MAX_PAGE_SIZE, token, admin=tenant.admin)
        infos.extend(page.adapters)
        token = page.next_page_token
        if not token:
            break
    own = {a.name for a in infos if a.owner == tenant.id}
    out = [model_object(base_model, "loraserve", started_at, base_model, None)]
    for a in infos:
        bare = a.owner == tenant.id or (a.owner == LOCAL_OWNER and a.name not in own)
        out.append(model_object(a.name if bare else f"{a.owner}/{a.name}", a.owner, a.created_at,
                                a.current.version_id, base_model))
    return out
