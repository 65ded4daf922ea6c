"""The adapter lifecycle of a running server: registry (names, versions, visibility) + store (files) +
host cache (memory), and which versions running requests hold.

Upload: parse and validate the files against the base model, derive the version id, store the files
atomically, then register the version (promote = point the name at it). Requests resolve a reference to
a version id once, when they are submitted, and run on that version to the end: promoting or rolling
back changes what new requests get, never a running one. Deleting a version that running or waiting
requests hold is refused with FAILED_PRECONDITION (the caller retries once they finished), so nothing
ever loses its weights mid-generation.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import structlog

from adapters.cache import AdapterLoadFailed, HostAdapterCache
from adapters.identity import adapter_version_id
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, parse_adapter, read_adapter_files
from adapters.registry import AdapterRegistry
from adapters.registry_types import LOCAL_OWNER, AdapterRef, AdapterVersion, Registered, VersionMeta
from adapters.store import Store
from service.api.adapter_refs import ResolvedAdapter
from service.runtime.arch import ModelArch

log = structlog.get_logger(__name__)

class PinLimitReached(Exception):
    """The tenant holds as many LoadAdapter pins as its limit allows (RESOURCE_EXHAUSTED)."""


VISIBILITIES = ("private", "shared", "public")


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, store: Store, cache: HostAdapterCache, arch: ModelArch,
                 base_model_id: str, max_rank: int) -> None:
        self.registry, self.store, self.cache = registry, store, cache
        self.arch, self.base_model_id, self.max_rank = arch, base_model_id, max_rank
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()  # version id -> submitted, unfinished requests
        # version id -> tenants whose LoadAdapter holds it (one cache pin per version while any does)
        self._loaded_by_rpc: dict[str, set[str]] = {}

    # ---- registering ------------------------------------------------------------------------------------
    def register_files(self, owner: str, name: str, files: Mapping[str, bytes], *, description: str = "",
                       visibility: str | None = None, promote: bool = True) -> Registered:
        """Validate, store and register one version. AdapterError (a ValueError) names what is wrong;
        nothing is stored or registered then."""
        parsed = parse_adapter(dict(files), self.arch, max_rank=self.max_rank)
        vid = adapter_version_id(parsed, self.base_model_id)
        stored = {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: files[WEIGHTS_FILE]}
        size = sum(len(b) for b in stored.values())
        meta = VersionMeta.of(parsed, self.base_model_id, size, description)  # checks the description first
        self.store.put(vid, stored)  # idempotent: identical content is stored once
        reg = self.registry.register_version(owner, name, vid, meta, promote=promote)
        if visibility == "public":
            self.registry.share(owner, f"{owner}/{name}", "*", admin=True)
        elif visibility == "private":
            self.registry.unshare(owner, f"{owner}/{name}", "*", admin=True)
        log.info("adapter_registered", owner=owner, name=name, version_id=vid, created=reg.created,
                 current=reg.current, size_bytes=size)
        return reg

    def register_dir(self, name: str, path: str | Path) -> Registered:
        """`serve --adapter NAME=DIR`: a public adapter owned by `local` (re-registering is a no-op)."""
        config, weights = read_adapter_files(Path(path))
        return self.register_files(LOCAL_OWNER, name, {CONFIG_FILE: config, WEIGHTS_FILE: weights},
                                   description=f"registered at startup from {path}", visibility="public")

    # ---- resolving (inference) --------------------------------------------------------------------------
    def resolve(self, tenant: str, ref: str, admin: bool = False) -> ResolvedAdapter:
        v = self.registry.resolve(tenant, ref, admin=admin)
        return ResolvedAdapter(version_id=v.version_id, ref=v.ref, name=f"{v.owner}/{v.name}")

    def hold(self, version_id: str) -> None:
        """A request on this version was submitted (until `release`, the version cannot be deleted)."""
        with self._lock:
            self._in_flight[version_id] += 1

    def release(self, version_id: str) -> None:
        with self._lock:
            self._in_flight[version_id] -= 1
            if self._in_flight[version_id] <= 0:
                del self._in_flight[version_id]

    def in_use(self, version_id: str) -> bool:
        with self._lock:
            return self._in_flight.get(version_id, 0) > 0

    # ---- delete / load / unload -------------------------------------------------------------------------
    def delete(self, tenant: str, ref: str, admin: bool = False) -> tuple[str, ...]:
        """`name` deletes the adapter, `name@version` one non-current version. Returns the version ids whose
        files were released. AdapterInUse (FAILED_PRECONDITION) while requests hold an affected version."""
        parsed = AdapterRef.parse(ref)
        if parsed.version is None:
            released = self.registry.delete_adapter(tenant, parsed.base, in_use=self.in_use, admin=admin)
        else:
            released = self.registry.delete_version(tenant, parsed.base, parsed.version, in_use=self.in_use,
                                                    admin=admin)
        for vid in released:
            with self._lock:
                if self._loaded_by_rpc.pop(vid, None) is not None:
                    self.cache.unpin(vid)
            self.cache.discard(vid)
        log.info("adapter_deleted", tenant=tenant, ref=ref, released=list(released))
        return released

    def load(self, tenant: str, ref: str, *, wait: bool, admin: bool = False, timeout: float | None = None,
             max_loaded: int | None = None) -> tuple[AdapterVersion, str, str]:
        """Pin the version in host memory for this tenant (however often it asks) and start its load; it
        stays until every tenant that loaded it unloads it. Returns (version, state, error) with state one of
        stored/loading/loaded/failed."""
        v = self.registry.resolve(tenant, ref, admin=admin)
        vid = v.version_id
        with self._lock:  # pins change under the lock: a racing unload or delete never unpins twice
            if max_loaded is not None and tenant not in self._loaded_by_rpc.get(vid, ()):
                held = sum(tenant in holders for holders in self._loaded_by_rpc.values())
                if held >= max_loaded:
                    raise PinLimitReached(f"tenant {tenant!r} already holds {held} loaded adapter versions, its "
                                          f"limit (max_loaded_adapters); unload one first")
            holders = self._loaded_by_rpc.setdefault(vid, set())
            if not holders:
                self.cache.pin(vid)
            holders.add(tenant)
        self.cache.ensure_loading(vid)
        if wait:
            try:
                self.cache.wait(vid, timeout)
            except (TimeoutError, LookupError, AdapterLoadFailed):
                pass  # reported through the state (and error) below
        state, error = self.state(vid)
        return v, state, error

    def unload(self, tenant: str, ref: str, admin: bool = False) -> tuple[AdapterVersion, str]:
        v = self.registry.resolve(tenant, ref, admin=admin)
        with self._lock:
            holders = self._loaded_by_rpc.get(v.version_id, set())
            if tenant in holders:
                holders.discard(tenant)
                if not holders:  # another tenant's load keeps it pinned; only this tenant's hold goes
                    del self._loaded_by_rpc[v.version_id]
                    self.cache.unpin(v.version_id)
        return v, self.state(v.version_id)[0]

    def state(self, version_id: str) -> tuple[str, str]:
        s = self.cache.status(version_id)
        if s == "ready":
            return "loaded", ""
        if s == "failed":
            err = self.cache.error(version_id)
            return "failed", str(err) if err else "the load failed"
        return ("loading", "") if s == "loading" else ("stored", "")
