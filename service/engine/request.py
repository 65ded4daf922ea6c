"""One generation request as the engine tracks it (torch-free).

The model runner reads `all_token_ids[start:start + n]`, `block_ids`, `lora_slot`, `sampling`,
`seed`, `prompt_token_ids` and `output_token_ids`; everything else is engine bookkeeping.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Sequence

from service.engine.block_hash import BlockHash, hash_block_tokens
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # holds blocks, scheduled every step
    PREEMPTED = "preempted"  # back in the waiting queue with no blocks; its context is recomputed
    FINISHED = "finished"


class Request:
    """Token ids, KV block table and progress of one request.

    `num_computed_tokens` counts positions whose KV is in `block_ids`; the request needs compute
    while it is below `num_tokens`. A preempted request keeps its output tokens: they become part of
    the context that is recomputed on re-admission.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "sampling", "extra_key", "seed",
        "priority", "num_computed_tokens", "block_ids", "num_cached_tokens", "num_registered_blocks",
        "status", "finish_reason", "arrival_time", "first_scheduled_time", "first_token_time",
        "finished_time", "block_hashes", "arrival_seq", "lora_slot", "error", "engine_seconds", "_all_token_ids",
        "_hash_key", "error_kind",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        extra_key: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # prompt + output in one list, so slicing a context window never concatenates
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.sampling = sampling
        # The adapter version id: part of every block hash, so different adapters never share KV.
        self.extra_key = extra_key
        # What the block hashes are keyed by: the adapter version, and the cache salt when there is one
        # (requests with different salts never share blocks, even for the same adapter and prompt).
        self._hash_key = extra_key if cache_salt is None else f"salt:{cache_salt}|{extra_key or ''}"
        # Drawn once here so a preempted request resamples the same stream when it is recomputed.
        self.seed: int = sampling.seed if sampling.seed is not None else secrets.randbelow(2**63)
        self.priority = priority  # lower runs sooner
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.num_registered_blocks = 0  # leading blocks of block_ids already in the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # Chained hashes of the full blocks of all_token_ids, extended as tokens arrive.
        self.block_hashes: list[BlockHash] = []
        self.arrival_seq = 0  # set by the scheduler: FCFS tie-break within a priority
        # The active adapter slot the runner reads this request's LoRA weights from, set by the
        # admission policy while the request runs; -1 = no adapter (base model, or not running).
        self.lora_slot = -1
        self.error: str | None = None  # why the request failed (finish reason ERROR), for the caller
        self.error_kind: str | None = None  # see RequestOutput.error_kind
        # Its share of model-step time: each step's wall time split over its chunks by token count
        # (what usage accounting bills as engine-seconds).
        self.engine_seconds = 0.0

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output token ids. Read-only for callers: append through `append_output_token`."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def update_block_hashes(self, block_size: int) -> None:
        """Hash the blocks that became full since the last call (each hash chains its parent's)."""
        tokens = self._all_token_ids
        hashes = self.block_hashes
        for i in range(len(hashes), len(tokens) // block_size):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size], self._hash_key))

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
