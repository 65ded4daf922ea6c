"""Configuration: frozen dataclasses validated on construction (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and KV-cache limits of one engine."""

    block_size: int = 16
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 1024  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 1024  # waiting-queue bound; past it add_request refuses
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size={self.block_size} is invalid: must be a power of two in [1, 128]")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} is invalid: must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is invalid: must be >= 1")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting={self.max_waiting} is invalid: must be >= 0")
