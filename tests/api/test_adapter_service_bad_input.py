"""The unary AdapterService RPCs answer bad input with the right status code and a message naming what is
wrong, never UNKNOWN or INTERNAL. Each case is named after its bad input. A refused change changes nothing;
another tenant's private adapter is NOT_FOUND exactly like a missing one. (Bad uploads: test_upload_bad_input.)"""

from __future__ import annotations

import grpc
import pytest

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from tests.api.adapter_input import (
    BAD_NAMES,
    HUGE,
    INVALID,
    NOT_FOUND,
    Files,
    adapter_files,
    auth,
    check_refusal,
    populated_server,
    snapshot,
    upload,
)
from tests.api.conftest import rpc_error

DENIED, PRECONDITION = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION
UNKNOWN_VID = "v-000000000000000000000000"
BAD_VERSION = "version id (v-<24 hex chars>) or a version number"


@pytest.fixture(scope="module")
def files(tiny) -> Files:
    return adapter_files(tiny)


@pytest.fixture(scope="module")
def server(tiny, files, tmp_path_factory):
    s = populated_server(tiny, files, tmp_path_factory.mktemp("adapter-bad-input"))
    yield s
    s.close()


def c(rpc: str, bad: str, fields: dict, code: grpc.StatusCode, *fragments: str, who: str = "alice") -> tuple:
    """A unary case: `rpc what-is-bad`, rpc, caller, request fields, code, message fragments."""
    return f"{rpc} {bad}", rpc, who, fields, code, list(fragments)


def _names(rpc: str, field: str, extra: dict) -> list[tuple]:
    return [c(rpc, bad, {field: n, **extra}, INVALID, told) for bad, n, told in BAD_NAMES]


def _refs(rpc: str) -> list[tuple]:
    """The cases every RPC taking a `name[@version]` reference (field `adapter`) shares."""
    def ref(bad: str, value: str, code: grpc.StatusCode, *fragments: str, who: str = "alice") -> tuple:
        return c(rpc, bad, {"adapter": value}, code, *fragments, who=who)
    return [
        ref("adapter empty", "", INVALID, "adapter is empty"),
        *_names(rpc, "adapter", {}),
        ref("unknown adapter", "nope", NOT_FOUND, "adapter 'nope' not found"),
        ref("unknown owner", "zed/helper", NOT_FOUND, "'zed/helper' not found"),
        ref("unknown version number", "helper@9", NOT_FOUND, "adapter 'helper' has no version '9'"),
        ref("unknown version id", f"helper@{UNKNOWN_VID}", NOT_FOUND, f"has no version '{UNKNOWN_VID}'"),
        ref("version not a number", "helper@abc", INVALID, BAD_VERSION),
        ref("version number 0", "helper@0", INVALID, BAD_VERSION),
        ref("version number of 11 digits", "helper@12345678901", INVALID, BAD_VERSION),
        ref("another tenant's private adapter", "alice/helper", NOT_FOUND, "adapter 'alice/helper' not found",
            who="bob"),
        ref("another tenant's private adapter by bare name", "helper", NOT_FOUND,
            "adapter 'helper' not found", who="bob"),
        ref("bare name only other owners share with the caller", "shared-one", NOT_FOUND,
            "adapter 'shared-one' not found", "alice/shared-one, ops/shared-one", who="bob"),
    ]


def _plain_names(rpc: str, extra: dict) -> list[tuple]:
    """The cases of RPCs that name an adapter without a version (field `name`: `name` or `owner/name`)."""
    return [
        c(rpc, "name empty", {"name": "", **extra}, INVALID, "name is empty"),
        *_names(rpc, "name", extra),
        c(rpc, "name with a version", {"name": "helper@1", **extra}, INVALID, "without '@version'"),
        c(rpc, "unknown adapter", {"name": "nope", **extra}, NOT_FOUND, "adapter 'nope' not found"),
        c(rpc, "another tenant's private adapter", {"name": "alice/helper", **extra}, NOT_FOUND,
          "adapter 'alice/helper' not found", who="bob"),
    ]


def _grantee(rpc: str, fields: dict) -> tuple:
    return c(rpc, "grantee changes a shared adapter", fields, DENIED, "belongs to tenant 'alice'",
             "only its owner can change it", who="bob")


def _promote(bad: str, version: str, code: grpc.StatusCode, *fragments: str) -> tuple:
    return c("PromoteAdapter", bad, {"name": "helper", "version": version}, code, *fragments)


def _share(bad: str, grant: list[str], revoke: list[str], *fragments: str) -> tuple:
    return c("ShareAdapter", bad, {"name": "helper", "grant": grant, "revoke": revoke}, INVALID, *fragments)


UNARY_CASES = [
    c("ListAdapters", "negative page_size", {"page_size": -1}, INVALID, "page_size=-1", ">= 0"),
    c("ListAdapters", "page_size most negative int32", {"page_size": -2**31}, INVALID,
      "page_size=-2147483648"),
    c("ListAdapters", "page_token not base64", {"page_token": "not a token!"}, INVALID,
      "page_token", "not one this server returned"),
    c("ListAdapters", "page_token of 100k characters", {"page_token": HUGE}, INVALID,
      "not one this server returned"),
    c("ListAdapters", "page_token of other JSON", {"page_token": "eyJhIjogMX0"}, INVALID,
      "not one this server returned"),
    c("ListAdapters", "page_token in unicode", {"page_token": "ünï"}, INVALID,
      "not one this server returned"),
    *_plain_names("GetAdapter", {}),
    c("GetAdapter", "owner that is not a tenant id", {"name": "bad owner!/x"}, INVALID,
      "'bad owner!' is not a valid tenant id"),
    c("GetAdapter", "bare name only other owners share with the caller", {"name": "shared-one"}, NOT_FOUND,
      "adapter 'shared-one' not found", "alice/shared-one, ops/shared-one", who="bob"),
    *_refs("DeleteAdapter"),
    c("DeleteAdapter", "current version by number", {"adapter": "helper@1"}, PRECONDITION,
      "is the current version of adapter 'helper'", "promote another version first"),
    c("DeleteAdapter", "current version by id", {"adapter": "helper@{v1}"}, PRECONDITION,
      "is the current version of adapter 'helper'"),
    _grantee("DeleteAdapter", {"adapter": "alice/shared-one"}),
    *_plain_names("PromoteAdapter", {"version": "2"}),
    _promote("version empty", "", INVALID, "version is empty"),
    _promote("version abc", "abc", INVALID, BAD_VERSION),
    _promote("version number 0", "0", INVALID, BAD_VERSION),
    _promote("version number negative", "-1", INVALID, BAD_VERSION),
    _promote("version with a space", " 2", INVALID, BAD_VERSION),
    _promote("version with an @", "@2", INVALID, BAD_VERSION),
    _promote("version id in upper case", "V-" + "A" * 24, INVALID, BAD_VERSION),
    _promote("version of 100k characters", HUGE, INVALID, "is not an adapter reference"),
    _promote("unknown version number 9", "9", NOT_FOUND, "adapter 'helper' has no version '9'"),
    _promote("unknown version id", UNKNOWN_VID, NOT_FOUND, f"has no version '{UNKNOWN_VID}'"),
    _grantee("PromoteAdapter", {"name": "alice/shared-one", "version": "1"}),
    *_refs("LoadAdapter"),
    *_refs("UnloadAdapter"),
    *_plain_names("ShareAdapter", {"grant": ["bob"]}),
    _share("nothing to change", [], [], "nothing to change"),
    _share("tenant id with a space", ["b ob"], [], "'b ob' is not a valid tenant id"),
    _share("tenant id empty", [""], [], "'' is not a valid tenant id"),
    _share("tenant id with a slash", [], ["a/b"], "'a/b' is not a valid tenant id"),
    _share("tenant id of 100k characters", [HUGE], [], "is not a valid tenant id"),
    _share("257 tenant ids", [f"t{i}" for i in range(200)], [f"u{i}" for i in range(57)],
           "at most 256 tenant ids per call"),
    _share("valid grant with a bad revoke id", ["bob"], ["bad id!"], "'bad id!' is not a valid tenant id"),
    _share("same tenant granted and revoked", ["bob"], ["bob"], "'bob' is in both grant and revoke"),
    _share("star granted and revoked", ["*"], ["*"], "'*' is in both grant and revoke"),
    _grantee("ShareAdapter", {"name": "alice/shared-one", "grant": ["bob"]}),
]
_REQUESTS = {"ListAdapters": apb.ListAdaptersRequest, "GetAdapter": apb.GetAdapterRequest,
             "DeleteAdapter": apb.DeleteAdapterRequest, "PromoteAdapter": apb.PromoteAdapterRequest,
             "LoadAdapter": apb.LoadAdapterRequest, "UnloadAdapter": apb.UnloadAdapterRequest,
             "ShareAdapter": apb.ShareAdapterRequest}


@pytest.mark.parametrize(("bad", "rpc", "who", "fields", "code", "fragments"), UNARY_CASES,
                         ids=[c[0] for c in UNARY_CASES])
def test_bad_request_is_refused_and_changes_nothing(server, bad, rpc, who, fields, code, fragments):
    vid = server.v1.version_id
    fields = {k: v.replace("{v1}", vid) if isinstance(v, str) else v for k, v in fields.items()}
    before = snapshot(server)
    err = rpc_error(getattr(server.adapters, rpc), _REQUESTS[rpc](**fields), metadata=auth(who), timeout=30)
    check_refusal(err, bad, code, fragments)
    assert snapshot(server) == before, f"{bad}: the refused call changed the registry or the store"


@pytest.mark.parametrize("rpc", ["GetAdapter", "DeleteAdapter", "PromoteAdapter", "LoadAdapter",
                                 "UnloadAdapter", "ShareAdapter"])
def test_private_adapter_of_another_tenant_looks_missing(server, rpc):
    """The same code and message (but for the name) for alice's private adapter as for a missing one."""
    field = "adapter" if rpc in ("DeleteAdapter", "LoadAdapter", "UnloadAdapter") else "name"
    extra = {"PromoteAdapter": {"version": "1"}, "ShareAdapter": {"grant": ["bob"]}}.get(rpc, {})
    refs = [("alice/helper", "alice/never")]
    if field == "adapter":  # these references may name a version too
        vid = server.v1.version_id
        refs += [("alice/helper@1", "alice/never@1"), (f"alice/helper@{vid}", f"alice/never@{vid}")]
    for private, missing in refs:
        errs = [rpc_error(getattr(server.adapters, rpc), _REQUESTS[rpc](**{field: ref, **extra}),
                          metadata=auth("bob")) for ref in (private, missing)]
        assert [e.code() for e in errs] == [NOT_FOUND, NOT_FOUND], private
        assert errs[0].details().replace("helper", "never") == errs[1].details()


def test_delete_twice_is_not_found(server, files):
    delete = server.adapters.DeleteAdapter
    up = server.adapters.UploadAdapter(iter(upload(files.good(), name="doomed")), metadata=auth("bob"))
    assert up.created
    delete(apb.DeleteAdapterRequest(adapter="doomed"), metadata=auth("bob"))
    err = rpc_error(delete, apb.DeleteAdapterRequest(adapter="doomed"), metadata=auth("bob"))
    check_refusal(err, "adapter deleted already", NOT_FOUND, ["adapter 'doomed' not found"])
    err = rpc_error(server.adapters.GetAdapter, apb.GetAdapterRequest(name="doomed"), metadata=auth("bob"))
    assert err.code() == NOT_FOUND


def test_delete_a_version_twice_is_not_found(server, files):
    up, delete = server.adapters.UploadAdapter, server.adapters.DeleteAdapter
    up(iter(upload(files.good(), name="twice")), metadata=auth("bob"))
    v2 = files.with_config(files.cfg(lora_alpha=4))
    up(iter(upload(v2, name="twice")), metadata=auth("bob"))  # current now
    delete(apb.DeleteAdapterRequest(adapter="twice@1"), metadata=auth("bob"))
    err = rpc_error(delete, apb.DeleteAdapterRequest(adapter="twice@1"), metadata=auth("bob"))
    check_refusal(err, "version deleted already", NOT_FOUND, ["adapter 'twice' has no version '1'"])


def test_unload_of_a_version_never_loaded_is_not_an_error(server):
    """Unload lets go of what LoadAdapter pinned only: for a version never loaded (or unloaded twice) it is a
    no-op answering the version's state, and it never drops a pin it does not own. LoadAdapter(wait) without
    a deadline waits for the load."""
    versions = server.server.adapters.versions
    vid = server.v2.version_id
    unload = apb.UnloadAdapterRequest(adapter="helper@2")
    r = server.adapters.UnloadAdapter(unload, metadata=auth("alice"))
    assert r.version.version_id == vid and r.version.load_state == apb.LOAD_STATE_STORED
    assert versions.pinned_by(vid) == frozenset()
    load = apb.LoadAdapterRequest(adapter="helper@2", wait=True)
    loaded = server.adapters.LoadAdapter(load, metadata=auth("alice"))  # no deadline
    assert loaded.version.load_state == apb.LOAD_STATE_LOADED and versions.pinned_by(vid) == {"alice"}
    for _ in range(2):
        server.adapters.UnloadAdapter(unload, metadata=auth("alice"))
        assert versions.pinned_by(vid) == frozenset()


def test_huge_page_size_is_capped_not_refused(server):
    page = server.adapters.ListAdapters(apb.ListAdaptersRequest(page_size=10**9), metadata=auth("alice"))
    assert {a.name for a in page.adapters} >= {"helper", "shared-one"} and not page.next_page_token
