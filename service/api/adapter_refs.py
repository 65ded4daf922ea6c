"""Adapter references -> immutable adapter versions, behind one small interface.

The servicer only asks "which version does this reference mean for this caller?"; the server's
`AdapterManager` answers from the registry (tenants, uploads, promote, startup `--adapter`s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adapters.registry_types import InvalidAdapterName, check_name


@dataclass(frozen=True)
class ResolvedAdapter:
    version_id: str  # content-derived, immutable: the engine's extra_key and the prefix-cache key
    ref: str  # canonical `owner/name@version_id`, for logs and spans
    name: str = ""  # `owner/name`: what usage is accounted under


class AdapterResolver(Protocol):
    def resolve(self, tenant: str, ref: str, admin: bool = False) -> ResolvedAdapter:
        """The version `ref` means for `tenant`. InvalidAdapterName (a ValueError) for a malformed
        reference, AdapterNotFound for one the tenant cannot see (existence never leaks)."""
        ...


def parse_adapter_option(value: str) -> tuple[str, str]:
    """`NAME=DIR` of `serve --adapter` -> (name, dir)."""
    name, eq, path = value.partition("=")
    if not eq or not name or not path:
        raise ValueError(f"--adapter {value!r} is invalid: expected NAME=DIR, e.g. --adapter support-bot=./adapters/sb")
    try:
        check_name(name)
    except InvalidAdapterName as e:
        raise ValueError(f"--adapter {value!r}: {e}") from None
    return name, path
