"""The adapters of a running server: registry (names, versions, visibility) + store (files), over the one
owner of version lifetimes in this process (`adapters.lifecycle.AdapterVersions`: requests' holds,
LoadAdapter pins, host memory and slots).

Upload: parse and validate the files against the base model, derive the version id, store the files
atomically, then register the version (promote = point the name at it). Requests resolve a reference to
a version id once, when they are submitted, and run on that version to the end: promoting or rolling
back changes what new requests get, never a running one. Deleting a version that running or waiting
requests hold is refused with FAILED_PRECONDITION (the caller retries once they finished), so nothing
ever loses its weights mid-generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import structlog

from adapters.identity import adapter_version_id
from adapters.lifecycle import AdapterVersions, LoadState
from adapters.peft_config import BaseShapes
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, parse_adapter, read_adapter_files
from adapters.registry import AdapterRegistry
from adapters.registry_types import LOCAL_OWNER, AdapterRef, AdapterVersion, Registered, VersionMeta
from adapters.store import Store
from service.api.adapter_refs import ResolvedAdapter

log = structlog.get_logger(__name__)

VISIBILITIES = ("private", "shared", "public")


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, store: Store, versions: AdapterVersions, arch: BaseShapes,
                 base_model_id: str, max_rank: int) -> None:
        self.registry, self.store, self.versions = registry, store, versions
        self.arch, self.base_model_id, self.max_rank = arch, base_model_id, max_rank

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

    # ---- delete / load / unload -------------------------------------------------------------------------
    def delete(self, tenant: str, ref: str, admin: bool = False) -> tuple[str, ...]:
        """`name` deletes the adapter, `name@version` one non-current version. Returns the version ids whose
        files were released. AdapterInUse (FAILED_PRECONDITION) while requests hold an affected version."""
        parsed = AdapterRef.parse(ref)
        if parsed.version is None:
            released = self.registry.delete_adapter(tenant, parsed.base, in_use=self.versions.in_use, admin=admin)
        else:
            released = self.registry.delete_version(tenant, parsed.base, parsed.version, in_use=self.versions.in_use,
                                                    admin=admin)
        for vid in released:
            self.versions.forget(vid)
        log.info("adapter_deleted", tenant=tenant, ref=ref, released=list(released))
        return released

    def load(self, tenant: str, ref: str, *, wait: bool, admin: bool = False, timeout: float | None = None,
             max_loaded: int | None = None) -> tuple[AdapterVersion, LoadState, str]:
        """Pin the version in host memory for this tenant (however often it asks) and start its load; it
        stays until every tenant that loaded it unloads it. Returns (version, state, error)."""
        v = self.registry.resolve(tenant, ref, admin=admin)
        self.versions.pin(tenant, v.version_id, max_loaded)
        if wait:
            self.versions.wait_loaded(v.version_id, timeout)
        state, error = self.versions.state(v.version_id)
        return v, state, error

    def unload(self, tenant: str, ref: str, admin: bool = False) -> tuple[AdapterVersion, LoadState]:
        v = self.registry.resolve(tenant, ref, admin=admin)
        self.versions.unpin(tenant, v.version_id)  # another tenant's pin keeps it; only this tenant's goes
        return v, self.versions.state(v.version_id)[0]
