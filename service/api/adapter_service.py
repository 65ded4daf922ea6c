"""AdapterService: upload, list, get, delete, promote, load, unload and share tenants' adapters.

Every call acts as the authenticated tenant (admins may act on any adapter). Errors are exceptions the
interceptor maps: the registry's (NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, ...), ValueError
for bad input (INVALID_ARGUMENT), TooLarge for an upload past its size (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from adapters.peft_format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from adapters.registry_types import AdapterInfo, AdapterVersion, check_name, check_tenant
from service.adapter_manager import AdapterManager
from service.api.auth import current_tenant
from service.api.errors import TooLarge
from service.api.gen.loraserve.v1 import adapters_pb2 as pb
from service.api.gen.loraserve.v1 import adapters_pb2_grpc as pb_grpc
from service.api.stalls import CallSlots, StallWatchdog

log = structlog.get_logger(__name__)

SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_GRANTS = 256
_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_VISIBILITY = {pb.VISIBILITY_PRIVATE: "private", pb.VISIBILITY_SHARED: "shared", pb.VISIBILITY_PUBLIC: "public"}
_VISIBILITY_PB = {v: k for k, v in _VISIBILITY.items()}
_STATE = {"stored": pb.LOAD_STATE_STORED, "loading": pb.LOAD_STATE_LOADING, "loaded": pb.LOAD_STATE_LOADED,
          "failed": pb.LOAD_STATE_FAILED}


def _required(value: str, field: str, example: str) -> str:
    if not value:
        raise ValueError(f"{field} is empty: give {example}")
    return value


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, manager: AdapterManager, default_max_upload_bytes: int, *,
                 watchdog: StallWatchdog | None = None, call_slots: CallSlots | None = None) -> None:
        self.manager = manager
        self.default_max_upload_bytes = default_max_upload_bytes
        self.watchdog = watchdog  # cancels an upload whose client stops sending
        self.call_slots = call_slots  # uploads and generations together, below the RPC thread pool

    # ---- upload -------------------------------------------------------------------------
    def UploadAdapter(self, request_iterator: Iterator[pb.UploadAdapterRequest],
                      context: grpc.ServicerContext) -> pb.UploadAdapterResponse:
        release_slot = self.call_slots.acquire("upload") if self.call_slots is not None else None
        wait = self.watchdog.watch(context, "read") if self.watchdog is not None else None
        try:
            return self._upload(wait.iterate(request_iterator) if wait is not None else request_iterator)
        finally:
            if wait is not None:
                wait.close()
            if release_slot is not None:
                release_slot()

    def _upload(self, request_iterator: Iterator[pb.UploadAdapterRequest]) -> pb.UploadAdapterResponse:
        tenant = current_tenant()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("content") != "manifest":
            raise ValueError("the first message of an upload must be the manifest (name, sha256, size)")
        m = first.manifest
        check_name(_required(m.name, "manifest.name", "the adapter's name, e.g. support-bot"))
        sha = _required(m.sha256, "manifest.sha256", "the lowercase hex sha256 of every chunk's data, in order")
        if SHA256_RE.fullmatch(sha) is None:
            raise ValueError(f"manifest.sha256 {sha[:80]!r} is invalid: expected 64 lowercase hex characters")
        limit = tenant.limits.max_upload_bytes or self.default_max_upload_bytes
        if m.size == 0:
            raise ValueError("manifest.size is 0: give the total number of bytes the chunks will carry")
        if m.size > limit:
            raise TooLarge(f"manifest.size={m.size} bytes is above the upload limit of {limit} bytes")
        if m.visibility not in (pb.VISIBILITY_UNSPECIFIED, *_VISIBILITY):
            raise ValueError(f"manifest.visibility={m.visibility} is invalid: use VISIBILITY_PRIVATE, "
                             "VISIBILITY_SHARED or VISIBILITY_PUBLIC")
        structlog.contextvars.bind_contextvars(adapter=f"{tenant.id}/{m.name}")
        files: dict[str, bytearray] = {}
        digest = hashlib.sha256()
        received = 0
        current = None
        for msg in request_iterator:
            kind = msg.WhichOneof("content")
            if kind == "manifest":
                raise ValueError("only the first message of an upload may be a manifest; later ones carry chunks")
            if kind is None:
                raise ValueError("a message after the manifest carries neither a manifest nor a chunk")
            chunk = msg.chunk
            name = chunk.file_name
            if name != current:
                if name in files:
                    raise ValueError(f"the chunks of {name!r} are not contiguous: send each file's chunks in one run")
                _check_file_name(name)
                files[name] = bytearray()
                current = name
            received += len(chunk.data)
            if received > m.size:  # refused as the bytes arrive, before they are all held in memory
                raise TooLarge(f"the upload sent more than the {m.size} bytes its manifest announced")
            digest.update(chunk.data)
            files[name] += chunk.data
        if received != m.size:
            raise ValueError(f"the upload ended after {received} bytes; its manifest announced {m.size}")
        if digest.hexdigest() != sha:
            raise ValueError(f"the sha256 of the uploaded data is {digest.hexdigest()}, not the manifest's {sha}: "
                             "the upload was corrupted or the manifest is wrong; nothing was stored")
        missing = [f for f in _FILES if f not in files]
        if missing:
            raise ValueError(f"the upload lacks {', '.join(missing)}: a PEFT LoRA adapter is {CONFIG_FILE} + "
                             f"{WEIGHTS_FILE}")
        promote = m.promote if m.HasField("promote") else True
        reg = self.manager.register_files(tenant.id, m.name, {k: bytes(v) for k, v in files.items()},
                                          description=m.description, visibility=_VISIBILITY.get(m.visibility),
                                          promote=promote)
        return pb.UploadAdapterResponse(version=self._version(reg.version), created=reg.created,
                                        current=reg.current)

    # ---- reads --------------------------------------------------------------------------
    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext) -> pb.ListAdaptersResponse:
        tenant = current_tenant()
        if request.page_size < 0:
            raise ValueError(f"page_size={request.page_size} is invalid: must be >= 0 (0 = 100, at most 1000)")
        page = self.manager.registry.list(tenant.id, request.page_size, request.page_token, admin=tenant.admin)
        return pb.ListAdaptersResponse(adapters=[self._adapter(a) for a in page.adapters],
                                       next_page_token=page.next_page_token)

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.GetAdapterResponse:
        tenant = current_tenant()
        name = _required(request.name, "name", "an adapter name or owner/name")
        return pb.GetAdapterResponse(adapter=self._adapter(self.manager.registry.get(tenant.id, name,
                                                                                      admin=tenant.admin)))

    # ---- changes ------------------------------------------------------------------------
    def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context: grpc.ServicerContext
                      ) -> pb.DeleteAdapterResponse:
        tenant = current_tenant()
        ref = _required(request.adapter, "adapter", "name (the whole adapter) or name@version (one version)")
        released = self.manager.delete(tenant.id, ref, admin=tenant.admin)
        return pb.DeleteAdapterResponse(released_version_ids=list(released))

    def PromoteAdapter(self, request: pb.PromoteAdapterRequest, context: grpc.ServicerContext
                       ) -> pb.PromoteAdapterResponse:
        tenant = current_tenant()
        name = _required(request.name, "name", "the adapter (name or owner/name)")
        version = _required(request.version, "version", "a version id (v-...) or number (1, 2, ...)")
        v = self.manager.registry.promote(tenant.id, name, version, admin=tenant.admin)
        log.info("adapter_promoted", name=name, version_id=v.version_id, number=v.number)
        return pb.PromoteAdapterResponse(current_version=self._version(v))

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.LoadAdapterResponse:
        tenant = current_tenant()
        ref = _required(request.adapter, "adapter", "name[@version] or owner/name[@version]")
        # Without a deadline grpc reports ~9e18 s remaining, more than any thread wait accepts: no timeout.
        remaining = context.time_remaining()
        timeout = None
        if remaining is not None and remaining <= threading.TIMEOUT_MAX:
            timeout = max(remaining - 0.1, 0.0)
        v, state, error = self.manager.load(tenant.id, ref, wait=request.wait, admin=tenant.admin,
                                            max_loaded=tenant.limits.max_loaded_adapters,
                                            timeout=timeout)
        return pb.LoadAdapterResponse(version=self._version(v, state), error=error)

    def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
                      ) -> pb.UnloadAdapterResponse:
        tenant = current_tenant()
        ref = _required(request.adapter, "adapter", "name[@version] or owner/name[@version]")
        v, state = self.manager.unload(tenant.id, ref, admin=tenant.admin)
        return pb.UnloadAdapterResponse(version=self._version(v, state))

    def ShareAdapter(self, request: pb.ShareAdapterRequest, context: grpc.ServicerContext) -> pb.ShareAdapterResponse:
        tenant = current_tenant()
        name = _required(request.name, "name", "the adapter (name or owner/name)")
        if not request.grant and not request.revoke:
            raise ValueError("nothing to change: give tenant ids in grant and/or revoke (\"*\" = every tenant)")
        if len(request.grant) + len(request.revoke) > MAX_GRANTS:
            raise ValueError(f"at most {MAX_GRANTS} tenant ids per call")
        # Every id is checked before the first change: a refused call changes nothing.
        for t in (*request.grant, *request.revoke):
            if t != "*":
                check_tenant(t)
        both = sorted(set(request.grant) & set(request.revoke))
        if both:
            raise ValueError(f"{both[0][:80]!r} is in both grant and revoke: give each id in one of them")
        registry = self.manager.registry
        info = None
        for ids, change in ((request.grant, registry.share), (request.revoke, registry.unshare)):
            named = [t for t in ids if t != "*"]
            if "*" in ids:
                info = change(tenant.id, name, "*", admin=tenant.admin)
            if named:
                info = change(tenant.id, name, named, admin=tenant.admin)
        assert info is not None
        return pb.ShareAdapterResponse(adapter=self._adapter(info))

    # ---- messages -----------------------------------------------------------------------
    def _version(self, v: AdapterVersion, state: str | None = None) -> pb.AdapterVersion:
        state = state or self.manager.versions.state(v.version_id)[0]
        return pb.AdapterVersion(owner=v.owner, name=v.name, version_id=v.version_id, number=v.number,
                                 create_time=_ts(v.created_at), description=v.description, size_bytes=v.size_bytes,
                                 rank=v.rank, target_modules=list(v.target_modules), base_model_id=v.base_model_id,
                                 load_state=_STATE[state])

    def _adapter(self, a: AdapterInfo) -> pb.Adapter:
        return pb.Adapter(owner=a.owner, name=a.name, create_time=_ts(a.created_at),
                          visibility=_VISIBILITY_PB[a.visibility], shared_with=list(a.shared_with),
                          current_version=self._version(a.current), num_versions=a.num_versions,
                          versions=[self._version(v) for v in a.versions])


def _check_file_name(name: str) -> None:
    if name.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"file {name!r} looks like a pickle: only safetensors weights are accepted, pickles are "
                         "never opened")
    if name not in _FILES:
        raise ValueError(f"chunk.file_name {name[:80]!r} is invalid: an adapter upload carries {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE} only")


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
