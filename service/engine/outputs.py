"""What the engine hands back each step (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.engine.types import FinishReason, SampleResult


@dataclass
class RequestOutput:
    """One request's progress in one step. `new_*` is this step's delta; `output_token_ids` and
    `text` are everything so far (`text` without any stop string, and without a held-back tail that
    might still become one)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    output_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    new_logprobs: list[SampleResult] = field(default_factory=list)  # filled when sampling.logprobs is set
    error: str | None = None  # with finish reason ERROR: what went wrong, for the caller
    # With ERROR: "adapter_unavailable" when the request's adapter could not be loaded (it never ran);
    # None for an internal failure.
    error_kind: str | None = None


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

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0
