"""What the registry tests share: version ids, metadata, a clock that ticks a second a call (the fixtures that
open registries on SQLite and PostgreSQL are in conftest.py)."""

from __future__ import annotations

from adapters.registry import VersionMeta

BASE = "tiny-llama@sha256:0123"


def vid(n: int) -> str:
    return f"v-{n:024x}"


def meta(rank: int = 4, description: str = "", base: str = BASE) -> VersionMeta:
    return VersionMeta(size_bytes=1000 * rank, rank=rank, target_modules=("v_proj", "q_proj"), base_model_id=base,
                       description=description)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1
        return self.t
