"""One generation request: what the caller asked for (`RequestSpec`, frozen) and what the engine tracks
while it runs (`Request`), torch-free.

The API builds a `RequestSpec` once; the loop and the engine pass it on unchanged. The model runner reads
`all_token_ids[start:start + n]`, `block_ids`, `lora_slot`, `sampling`, `seed`, `prompt_token_ids` and
`output_token_ids` of a `Request`, and appends to its `prompt_logprobs` (when the request asks for them);
everything else is engine bookkeeping.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from service.engine.block_hash import BlockHash, hash_block_tokens
from service.engine.sampling import SamplingParams
from service.engine.speculative import SpecState
from service.engine.structured import CompiledGrammarLike
from service.engine.types import FinishReason, SampleResult


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # holds blocks, scheduled every step
    PREEMPTED = "preempted"  # back in the waiting queue with no blocks; its context is recomputed
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestSpec:
    """Everything a caller decides about one request. Add a per-request field here, where the API sets it
    and where its one consumer reads it: nothing in between copies fields one by one."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    tenant: str = ""
    # The adapter version the request runs on (immutable, content-derived: also its prefix-cache key), and
    # the name it is accounted under (`owner/name`); None / "" for the base model.
    adapter_version: str | None = None
    adapter_name: str = ""
    priority: int = 0  # lower runs sooner
    # Requests share prefix-cache blocks only with requests of the same salt (the server salts with the
    # tenant, so no tenant can probe another's prompts through cache hits).
    cache_salt: str | None = None
    deadline: float | None = None  # time.monotonic() after which the engine stops the request
    client_request_id: str = ""
    created_at: float = field(default_factory=time.time)  # wall clock, for the usage ledger
    labels: Mapping[str, str] = field(default_factory=dict)  # the caller's own, kept with its usage and span
    # The response format, compiled for this model (service.runtime.structured); None: free text.
    grammar: CompiledGrammarLike | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id={self.request_id!r} is invalid: must be a non-empty string")
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, not {type(self.sampling).__name__}")
        for name in ("adapter_version", "cache_salt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, not {type(value).__name__}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"priority must be an int, not {type(self.priority).__name__}")
        ids = tuple(self.prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        if min(ids) < 0:
            raise ValueError(f"prompt token id {min(ids)} is invalid: token ids are >= 0")
        object.__setattr__(self, "prompt_token_ids", ids)
        if self.grammar is not None and self.sampling.min_tokens:
            raise ValueError(f"sampling.min_tokens={self.sampling.min_tokens} cannot be combined with a response "
                             "format: the format decides where the output ends")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def adapter_ref(self) -> str | None:
        """`owner/name@version` for logs and spans; None for the base model."""
        if self.adapter_version is None:
            return None
        return f"{self.adapter_name}@{self.adapter_version}" if self.adapter_name else self.adapter_version


class Request:
    """Token ids, KV block table and progress of one request.

    `num_computed_tokens` counts positions whose KV is in `block_ids`; the request needs compute
    while it is below `num_tokens`. A preempted request keeps its output tokens: they become part of
    the context that is recomputed on re-admission.
    """

    __slots__ = (
        "spec", "request_id", "prompt_token_ids", "output_token_ids", "sampling", "extra_key", "seed",
        "priority", "num_computed_tokens", "block_ids", "num_cached_tokens", "num_registered_blocks",
        "status", "finish_reason", "arrival_time", "first_scheduled_time", "first_token_time",
        "finished_time", "block_hashes", "arrival_seq", "lora_slot", "engine_seconds", "_all_token_ids",
        "_hash_key",
        "tenant", "num_charged_prompt_tokens", "grammar", "spec_state", "prompt_logprobs",
    )

    def __init__(self, spec: RequestSpec, arrival_time: float | None = None) -> None:
        self.spec = spec
        # Read on every step: kept as plain attributes rather than looked up through the spec.
        self.request_id = spec.request_id
        self.prompt_token_ids: list[int] = list(spec.prompt_token_ids)
        self.sampling = spec.sampling
        self.priority = spec.priority
        self.tenant = spec.tenant
        # The adapter version id: part of every block hash, so different adapters never share KV.
        self.extra_key = spec.adapter_version
        self.output_token_ids: list[int] = []
        # prompt + output in one list, so slicing a context window never concatenates
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        # What the block hashes are keyed by: the adapter version, and the cache salt when there is one
        # (requests with different salts never share blocks, even for the same adapter and prompt).
        salt = spec.cache_salt
        self._hash_key = self.extra_key if salt is None else f"salt:{salt}|{self.extra_key or ''}"
        # Drawn once here so a preempted request resamples the same stream when it is recomputed.
        self.seed: int = self.sampling.seed if self.sampling.seed is not None else secrets.randbelow(2**63)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.num_registered_blocks = 0  # leading blocks of block_ids already in the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time  # monotonic seconds
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        # Chained hashes of the full blocks of all_token_ids, extended as tokens arrive.
        self.block_hashes: list[BlockHash] = []
        self.arrival_seq = 0  # set by the scheduler: FCFS tie-break within a priority
        # The active adapter slot the runner reads this request's LoRA weights from, set by the
        # admission policy while the request runs; -1 = no adapter (base model, or not running).
        self.lora_slot = -1
        # Its share of model-step time: each step's wall time split over its chunks by token count
        # (what usage accounting bills as engine-seconds).
        self.engine_seconds = 0.0
        # Prompt positions already charged to the tenant's fair-share counter (a recomputation after a
        # preemption is not charged again).
        self.num_charged_prompt_tokens = 0
        # Its matcher when it has a response format: advanced by the engine on each sampled token, read by the
        # runner to mask the next token's logits.
        self.grammar = spec.grammar.matcher() if spec.grammar is not None else None
        # Its speculative decoding (proposer, adaptive k, counts), set by the engine; None: it does not speculate.
        self.spec_state: SpecState | None = None
        # With sampling.prompt_logprobs: entry j is prompt token j + 1's logprob given the tokens before it (from
        # the logits at position j), appended by the model runner as it computes those positions, never twice (a
        # recomputation after a preemption adds nothing); the first output carries them.
        self.prompt_logprobs: list[SampleResult] = []

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

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past the first `num_output_tokens` (a verify pass accepted tokens after the one that
        finished the request). Only for a request about to finish: its block table is not touched."""
        drop = self.num_output_tokens - num_output_tokens
        if drop > 0:
            del self.output_token_ids[num_output_tokens:]
            del self._all_token_ids[len(self._all_token_ids) - drop:]
            self.num_computed_tokens = min(self.num_computed_tokens, len(self._all_token_ids))

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
