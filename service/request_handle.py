"""RequestHandle: one submitted request as its caller sees it, its outputs gathered into messages (torch-free).

The engine loop (`service.loop`) makes one per submitted request and queues its outputs on it from the loop thread;
the caller's thread (a gRPC handler, the HTTP front's event loop) reads them.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from service.engine.outputs import RequestOutput
from service.engine.request import RequestSpec
from service.engine.types import FinishReason

# Finish reasons of a request that ends without its answer (the fronts raise at its final output)
UNANSWERED = (FinishReason.ERROR, FinishReason.CANCELLED)


class RequestHandle:
    """One submitted request as its caller sees it: iterate to get its `RequestOutput`s (the last one
    carries the `FinalOutput`), `cancel()` to abort it.

    `stream_interval`: how many new tokens an output gathers before it is queued. The first output with a token
    is queued at once (time to first token), and so is the final one, whatever it holds. 1 queues every step's
    output; None queues the final output alone (a caller that only wants the whole answer: its thread is woken
    by that output, not once per token). Gathered outputs are joined: their tokens, text and logprobs in order."""

    def __init__(self, spec: RequestSpec, context: Any = None, stream_interval: int | None = 1, *,
                 abort: Callable[[str], None]) -> None:
        """`abort(request_id)`: asks the engine to stop the request (the loop's inbox)."""
        if stream_interval is not None and stream_interval < 1:
            raise ValueError(f"stream_interval={stream_interval} is invalid: must be >= 1, or None for the final "
                             "output alone")
        self.spec = spec
        self.request_id = spec.request_id
        self.context = context  # the submitter's own record (lease, span), handed to on_finished
        self.stopped_by_drain = False  # aborted because the drain's grace period ran out
        self.stream_interval = stream_interval
        self._abort = abort
        self._outputs: queue.Queue[RequestOutput] = queue.Queue()
        # The outputs not queued yet, joined in place into the first of them (loop thread only: a unary call holds
        # its whole answer, no copy per step); their texts are joined once, when it is queued
        self._pending: RequestOutput | None = None
        self._texts: list[str] = []
        self._first_queued = False  # an output with a token was queued (loop thread only)
        self._done = False
        self._cancelled = False
        # Called on the loop thread after each output is queued (an event loop's waiter wakes on it).
        self.on_output: Callable[[], None] | None = None
        # Rewrites each output in place on the reader's thread, in order, as it is read (a chat's tool-call parser,
        # `service.api.tools`); set before the first read.
        self.transform: Callable[[RequestOutput], None] | None = None

    def _gather(self, out: RequestOutput) -> list[RequestOutput]:
        """(Loop thread.) Take one step's output; what is to be queued now, in order. Held outputs are joined in
        place (a unary call holds its whole answer: no copy per step). A final output that ends the request
        without its answer (an error, a cancellation) goes alone, after the tokens it would carry: a front raises
        at such an output, and a stream then has sent every token it got, as it would have with a message a token."""
        held = self._pending
        if held is not None:
            held.new_token_ids += out.new_token_ids
            held.new_logprobs += out.new_logprobs
            held.final = out.final
            self._texts.append(out.new_text)
            n = len(held.new_token_ids)
        else:
            n = len(out.new_token_ids)
        if out.final is not None or (self.stream_interval is not None and n > 0 and (
                not self._first_queued or n >= self.stream_interval)):
            if held is not None:
                held.new_text = "".join(self._texts)
                out, self._pending, self._texts = held, None, []
            self._first_queued = self._first_queued or n > 0
            final = out.final
            if final is not None and final.finish_reason in UNANSWERED and (out.new_token_ids or out.new_text):
                return [replace(out, final=None), RequestOutput(out.request_id, [], "", final=final)]
            return [out]
        if held is None:  # the first held output: copied, as the engine's lists are not ours to extend
            self._pending = replace(out, new_token_ids=list(out.new_token_ids), new_text="",
                                    new_logprobs=list(out.new_logprobs))
            self._texts = [out.new_text]
        return []

    def get(self, timeout: float | None = None) -> RequestOutput:
        """The next output; `queue.Empty` after `timeout` seconds without one."""
        return self._read(self._outputs.get(timeout=timeout))

    def get_nowait(self) -> RequestOutput:
        """The next output if there is one; else `queue.Empty`."""
        return self._read(self._outputs.get_nowait())

    def _read(self, out: RequestOutput) -> RequestOutput:
        if self.transform is not None:
            self.transform(out)
        if out.finished:
            self._done = True
        return out

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self._done:
            yield self.get()

    @property
    def done(self) -> bool:
        """The final output has been read."""
        return self._done

    def cancel(self) -> None:
        """Abort the request (idempotent; harmless once finished). Its KV blocks return at once and a
        final CANCELLED output ends the stream."""
        if not self._cancelled:
            self._cancelled = True
            self._abort(self.request_id)
