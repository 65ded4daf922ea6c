"""Small typed values passed between the scheduler, the engine and the model runner (torch-free)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.engine.outputs import RequestError
    from service.engine.request import Request


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"  # a stop sequence or stop token id matched
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class ScheduledChunk:
    """Tokens of one request computed in one step: positions [start, start + num_tokens)."""

    request: Request
    start: int  # == request.num_computed_tokens when scheduled
    num_tokens: int
    sample: bool  # True when this chunk catches the request up: sample its next token
    # Speculative decoding: draft tokens computed after the request's last token, at positions
    # [start + 1, start + num_tokens) (so num_tokens == 1 + len(drafts)); the runner returns the target token of
    # every one of those num_tokens positions, as a list (service.engine.speculative).
    draft_token_ids: tuple[int, ...] = ()


@dataclass
class SchedulerOutput:
    """One step's work. Chunks come in scheduling order; the runner groups them by adapter itself
    (each chunk's `request.lora_slot` is set by the time the scheduler returns this)."""

    chunks: list[ScheduledChunk]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)
    # Waiting requests the admission policy failed (e.g. their adapter did not load), with why. They are
    # still queued: the engine finishes them with ERROR.
    failed: list[tuple[Request, RequestError]] = field(default_factory=list)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # log-probability of token_id under the model (raw logits)
    top_logprobs: list[tuple[int, float]] | None = None


class ModelRunnerLike(Protocol):
    """What the engine needs from the (torch) model runner."""

    num_blocks: int
    block_size: int
    max_model_len: int

    def execute(self, out: SchedulerOutput) -> list[SampleResult | list[SampleResult] | None]:
        """Run one step; return one entry per chunk (None where chunk.sample is False; for a chunk with drafts, a
        list of its num_tokens target tokens, each sampled as if the drafts before it were accepted)."""
        ...


class TokenizerLike(Protocol):
    eos_token_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
