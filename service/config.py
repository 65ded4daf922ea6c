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


DTYPES = ("bfloat16", "float32")
QUANTIZE_MODES = ("int8", "int4")


@dataclass(frozen=True)
class RuntimeConfig:
    """Which model to serve and how it sits in memory."""

    model: str | None = None  # a .gguf file or an HF directory; None = the embedded default model
    quantize: str | None = None  # quantize an fp16/bf16/fp32 HF checkpoint on load
    dtype: str = "bfloat16"  # compute dtype: bfloat16 (fast CPU path) or float32 (exact reference path)
    kv_cache_gib: float = 1.0  # size of the preallocated paged KV arena
    max_model_len: int | None = None  # default: the model's context length
    threads: int | None = None  # torch intra-op threads; default: all cores

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={self.quantize!r} is invalid: allowed values are {', '.join(QUANTIZE_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: allowed values are {', '.join(DTYPES)}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib} is invalid: must be > 0")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len={self.max_model_len} is invalid: must be >= 16")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} is invalid: must be >= 1")


@dataclass(frozen=True)
class AdapterConfig:
    """The LoRA tiers: host memory (LRU, bytes and count bounded) and active slots the batch reads."""

    max_active_adapters: int = 32  # distinct adapters in one step's batch (active slots)
    host_cache_mib: int = 2048  # host-memory tier, in model layout
    host_cache_max_count: int = 256
    max_lora_rank: int = 128
    max_overtake_steps: int = 8  # how long ready adapters may overtake one waiting for a slot
    load_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("max_active_adapters", "host_cache_mib", "host_cache_max_count", "max_lora_rank",
                     "load_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.max_overtake_steps < 0:
            raise ValueError(f"max_overtake_steps={self.max_overtake_steps} is invalid: must be >= 0")


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC front: where to listen, how many RPC threads, how long a shutdown waits for requests."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the ready log line says which)
    drain_grace_s: float = 30.0  # on SIGTERM: running requests get this long to finish, then are aborted
    grpc_workers: int | None = None  # RPC threads; default: enough for every running and waiting request
    warmup: bool = True  # run one short generation before reporting SERVING

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is empty: give an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} is invalid: must be in [0, 65535] (0 = any free port)")
        if not self.drain_grace_s >= 0:
            raise ValueError(f"drain_grace_s={self.drain_grace_s} is invalid: must be >= 0")
        if self.grpc_workers is not None and self.grpc_workers < 2:
            raise ValueError(f"grpc_workers={self.grpc_workers} is invalid: must be >= 2")
