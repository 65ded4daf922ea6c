"""What the engine hands back (torch-free): a delta per request per step, and one final record per request.

`RequestOutput` is one step's delta. The last one of a request carries its `FinalOutput`: text, token ids,
finish reason, usage and timings, computed once, here, from the engine's record. Metrics, tracing,
accounting and the API read only these, never the engine's mutable `Request`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.engine.speculative import SpecStats
from service.engine.types import FinishReason, SampleResult

if TYPE_CHECKING:
    from service.engine.request import Request, RequestSpec


class ErrorKind(str, enum.Enum):
    """Why a request ended without its answer (with finish reason ERROR or CANCELLED)."""

    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # its adapter version could not be loaded; it never ran
    DEADLINE_EXCEEDED = "deadline_exceeded"  # its deadline passed; it was stopped (finish reason CANCELLED)
    INTERNAL = "internal"  # a step or its post-processing failed
    # Its response format reached a point no token of the model's vocabulary continues (INVALID_ARGUMENT)
    FORMAT_DEAD_END = "format_dead_end"


@dataclass(frozen=True)
class RequestError:
    kind: ErrorKind
    message: str  # written for the caller: no storage details, no stack traces


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    cached_input_tokens: int  # prompt tokens whose KV came from the prefix cache (within input_tokens)
    output_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds from the request's arrival at the engine; None for what never happened."""

    queue_s: float | None  # until first scheduled (queueing, adapter load)
    ttft_s: float | None  # until its first output token
    total_s: float  # until it finished
    engine_s: float  # its share of model-step time (each step split over its chunks by token count)
    tpot_s: float | None  # mean time between output tokens after the first (None below two tokens)


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool an answer's text held, as the API's tool parser found it (`service.api.tools`)."""

    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a call as it is written: its opening (index, id and name, no arguments yet), or a piece of its
    arguments (index alone: id and name empty). The pieces of a call's arguments, joined, are its arguments."""

    index: int  # the call's place among the answer's calls, from 0
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class FinalOutput:
    """A finished request, however it ended."""

    spec: RequestSpec
    text: str  # without any stop string
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    seed: int  # the request's seed, or the one the engine drew
    error: RequestError | None = None
    speculation: SpecStats = SpecStats()  # draft tokens it verified and accepted (speculative decoding)

    @classmethod
    def lost(cls, spec: RequestSpec, error: RequestError) -> FinalOutput:
        """For a request the engine could no longer account for (it failed while ending it): nothing counted."""
        return cls(spec, "", (), FinishReason.ERROR, Usage(len(spec.prompt_token_ids), 0, 0),
                   Timings(None, None, 0.0, 0.0, None), spec.sampling.seed or 0, error)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def adapter_version(self) -> str | None:
        return self.spec.adapter_version


@dataclass
class RequestOutput:
    """One request's progress in one step: this step's new tokens and text (held-back text, e.g. a possible
    start of a stop string, comes later), and on the last output the request's `final` record."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[SampleResult] = field(default_factory=list)  # when sampling.logprobs is set
    final: FinalOutput | None = None
    # On a request's first output, when sampling.prompt_logprobs is set: prompt tokens 1.. (the first has none)
    prompt_logprobs: list[SampleResult] | None = None
    # On the final output of a chat with tools: the calls its text held (set by the reader's tool parser; the
    # final's text is then what the answer says besides them)
    tool_calls: list[ToolCall] | None = None
    # With tools: the calls' pieces written in this output (openings, arguments), as they came
    tool_call_deltas: list[ToolCallDelta] | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None


def final_output(request: Request, text: str, error: RequestError | None = None) -> FinalOutput:
    """The final record of a finished request (its finish reason and finished_time set)."""
    assert request.finish_reason is not None, f"{request} is not finished"
    arrival = request.arrival_time
    end = request.finished_time if request.finished_time is not None else time.monotonic()
    first = request.first_token_time
    n = request.num_output_tokens
    timings = Timings(
        queue_s=None if request.first_scheduled_time is None else request.first_scheduled_time - arrival,
        ttft_s=None if first is None else first - arrival,
        total_s=end - arrival,
        engine_s=request.engine_seconds,
        tpot_s=(end - first) / (n - 1) if first is not None and n > 1 else None,
    )
    usage = Usage(request.num_prompt_tokens, request.num_cached_tokens or 0, n)
    st = request.spec_state
    spec = SpecStats(st.draft_tokens, st.accepted_tokens) if st is not None else SpecStats()
    return FinalOutput(request.spec, text, tuple(request.output_token_ids), request.finish_reason, usage, timings,
                       request.seed, error, spec)


@dataclass(frozen=True)
class EngineStats:
    steps: int
    preemptions: int
    prompt_tokens_computed: int  # prompt positions whose KV was computed (recomputation included)
    generation_tokens: int  # tokens sampled
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    # Adapters (version ids) for the `lora_requests_info` metric; all zero / empty without adapters.
    max_active_adapters: int = 0  # active slots
    num_active_adapters: int = 0  # versions holding a slot (== len(running_adapters))
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    adapter_loads_waited: int = 0  # requests that had to wait for their adapter to load
    # Speculative decoding since the engine started: draft tokens verified and accepted, and verify passes by
    # accepted length (index = drafts accepted).
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_lengths: tuple[int, ...] = ()

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0
