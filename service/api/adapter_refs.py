"""Adapter references -> immutable adapter versions, behind one small interface.

The servicer only asks "which version does this reference mean for this caller?". Today the answer
comes from adapters registered at startup (`serve --adapter NAME=DIR`); the registry-backed resolver
(tenants, uploads, promote) implements the same `resolve` with `AdapterRegistry.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from adapters.registry_types import AdapterNotFound, AdapterRef, InvalidAdapterName, check_name


@dataclass(frozen=True)
class ResolvedAdapter:
    version_id: str  # content-derived, immutable: the engine's extra_key and the prefix-cache key
    ref: str  # canonical `owner/name@version_id` (or `name@version_id` for local adapters), for logs


class AdapterResolver(Protocol):
    def resolve(self, tenant: str | None, ref: str) -> ResolvedAdapter:
        """The version `ref` means for `tenant`. InvalidAdapterName (a ValueError) for a malformed
        reference, AdapterNotFound for one the tenant cannot see (existence never leaks)."""
        ...


def _not_found(ref: str) -> AdapterNotFound:
    return AdapterNotFound(f"adapter {ref!r} not found")


class LocalAdapters:
    """Adapters named at startup, one version each (`name`, `name@1` and `name@<version id>` all mean it).
    They have no owner, so an owner-qualified reference finds nothing. Registration happens before the
    server starts; afterwards the map is only read, from any thread."""

    def __init__(self) -> None:
        self._versions: dict[str, str] = {}  # name -> version id

    def add(self, name: str, version_id: str) -> None:
        check_name(name)
        if name in self._versions:
            raise ValueError(f"adapter name {name!r} is given twice")
        self._versions[name] = version_id

    @property
    def names(self) -> dict[str, str]:
        return dict(self._versions)

    def resolve(self, tenant: str | None, ref: str) -> ResolvedAdapter:
        parsed = AdapterRef.parse(ref)
        version_id = self._versions.get(parsed.name)
        if parsed.owner is not None or version_id is None:
            raise _not_found(ref)
        if parsed.version is not None and parsed.version not in ("1", version_id):
            raise _not_found(ref)
        return ResolvedAdapter(version_id=version_id, ref=f"{parsed.name}@{version_id}")


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
