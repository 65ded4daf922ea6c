"""AdapterService answers bad input with the right status code and a message naming what is wrong, never
UNKNOWN or INTERNAL. Each case is named after its bad input. A refused upload registers and stores nothing;
a refused change changes nothing; another tenant's private adapter is NOT_FOUND exactly like a missing one."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from tests.api.conftest import TENANT_KEYS, Server, rpc_error, write_tenants

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
DENIED, EXHAUSTED = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
KEYS = TENANT_KEYS
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
UPLOAD_LIMIT = 200_000  # alice's max_upload_bytes; the tiny adapter is ~25 KB
MAX_MESSAGE_CHARS = 600  # a 100k-character input must not come back whole in the message
HUGE = "x" * 100_000
MIB2 = "x" * (2 << 20)  # quoted whole, it would overflow grpc's 16 KiB of trailing metadata
NAN = float("nan")
UNKNOWN_VID = "v-000000000000000000000000"
Q_A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # [r=8, hidden=64]
BAD_VERSION = "version id (v-<24 hex chars>) or a version number"

# Names refused wherever an adapter is named: (what is bad, the name, what a reference to it is told).
BAD_NAMES = [
    ("name of 100k characters", HUGE, "is not an adapter reference ([owner/]name[@version])"),
    ("name with path traversal", "../x", "'..' is not a valid tenant id"),
    ("name with two slashes", "a/b/c", "'a/b' is not a valid tenant id"),
    ("name in upper case", "A_UPPER", "'A_UPPER' is not a valid adapter name"),
    ("name with two dots", "x..y", "'x..y' is not a valid adapter name"),
    ("name in unicode", "adaptér-ünï", "'adaptér-ünï' is not a valid adapter name"),
    ("name starting with a dot", ".hidden", "'.hidden' is not a valid adapter name"),
    ("name with a space", "my adapter", "'my adapter' is not a valid adapter name"),
]


def auth(who: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[who]}"),)


@dataclass(frozen=True)
class Files:
    """The tiny peft adapter's two files, and ways to spoil them."""

    config: bytes
    weights: bytes

    def cfg(self, **changes: object) -> bytes:
        return json.dumps({**json.loads(self.config), **changes}).encode()

    def good(self) -> list[tuple[str, bytes]]:
        return [(CONFIG, self.config), (WEIGHTS, self.weights)]

    def with_config(self, config: bytes) -> list[tuple[str, bytes]]:
        return [(CONFIG, config), (WEIGHTS, self.weights)]

    def with_weights(self, change: Callable[[dict[str, torch.Tensor]], object]) -> list[tuple[str, bytes]]:
        t = load_tensors(self.weights)
        change(t)
        return [(CONFIG, self.config), (WEIGHTS, save_tensors(t))]

    def with_header(self, name: str, **fields: object) -> list[tuple[str, bytes]]:
        """The weights with one tensor's safetensors header entry changed (its bytes left as they are)."""
        n = int.from_bytes(self.weights[:8], "little")
        header = json.loads(self.weights[8:8 + n])
        header[name] = {**header[name], **fields}
        raw = json.dumps(header).encode()
        return [(CONFIG, self.config), (WEIGHTS, len(raw).to_bytes(8, "little") + raw + self.weights[8 + n:])]


def upload(chunks: list[tuple[str, bytes]], *, name: str = "fresh", sha256: str | None = None,
           size: int | None = None, **manifest: object) -> list[apb.UploadAdapterRequest]:
    """A manifest that matches `chunks` (unless told otherwise), then one message per chunk."""
    data = b"".join(d for _, d in chunks)
    m = apb.UploadManifest(name=name, sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
                           size=len(data) if size is None else size, **manifest)
    return [apb.UploadAdapterRequest(manifest=m)] + [
        apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f, data=d)) for f, d in chunks]


@pytest.fixture(scope="module")
def files(tiny) -> Files:
    return Files((tiny[1] / CONFIG).read_bytes(), (tiny[1] / WEIGHTS).read_bytes())


@pytest.fixture(scope="module")
def server(tiny, files, tmp_path_factory):
    """alice owns `helper` (v1 current, v2 not promoted, private) and `shared-one` (shared with bob); ops
    owns another `shared-one` shared with bob, so a bare `shared-one` is not found for bob (it names his own or
    the service's adapter), with both qualified names in the message."""
    root = tmp_path_factory.mktemp("adapter-bad-input")
    s = Server(tiny[0], root / "data", service={"tenants_file": write_tenants(root / "tenants.yaml", f"{{max_upload_bytes: {UPLOAD_LIMIT}}}")})
    up = s.adapters.UploadAdapter
    s.v1 = up(iter(upload(files.good(), name="helper")), metadata=auth("alice")).version
    v2 = files.with_config(files.cfg(lora_alpha=8))  # another scale: another version
    s.v2 = up(iter(upload(v2, name="helper", promote=False)), metadata=auth("alice")).version
    assert (s.v1.number, s.v2.number) == (1, 2) and s.v1.version_id != s.v2.version_id
    for owner in ("alice", "ops"):
        up(iter(upload(files.good(), name="shared-one")), metadata=auth(owner))
        share = apb.ShareAdapterRequest(name="shared-one", grant=["bob"])
        s.adapters.ShareAdapter(share, metadata=auth(owner))
    yield s
    s.close()


def snapshot(server: Server) -> tuple[list[str], list[str]]:
    """Everything a refused call must leave as it was: every adapter as the admin sees it (owner, versions,
    current version, visibility, grants) and the entries of the adapter store's directory."""
    page = server.adapters.ListAdapters(apb.ListAdaptersRequest(page_size=1000), metadata=auth("ops"))
    adapters = [str(server.adapters.GetAdapter(apb.GetAdapterRequest(name=f"{a.owner}/{a.name}"),
                                               metadata=auth("ops")).adapter) for a in page.adapters]
    store = Path(server.server.service_config.data_dir) / "adapters"
    return adapters, sorted(p.name for p in store.iterdir())


def check_refusal(err: grpc.RpcError, bad: str, code: grpc.StatusCode, fragments: list[str]) -> None:
    assert err.code() == code, f"{bad}: {err.code()} {err.details()}"
    assert len(err.details()) <= MAX_MESSAGE_CHARS, f"{bad}: message of {len(err.details())} characters"
    for fragment in fragments:
        assert fragment in err.details(), f"{bad}: {fragment!r} not in {err.details()!r}"


# ---- UploadAdapter ---------------------------------------------------------------------------------------

def _second_manifest(f: Files) -> list[apb.UploadAdapterRequest]:
    msgs = upload(f.good())
    return [msgs[0], msgs[0], *msgs[1:]]


def _interleaved(f: Files) -> list[apb.UploadAdapterRequest]:
    half = len(f.config) // 2
    return upload([(CONFIG, f.config[:half]), (WEIGHTS, f.weights), (CONFIG, f.config[half:])])


def _set(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name].clone()
        t[name][0, 0] = value
    return change


def _put(name: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({name: tensor})


def _widen(t: dict[str, torch.Tensor]) -> None:
    for k, v in t.items():  # every hidden-size dimension 64 -> 128 (rank 8 stays): trained on a wider model
        t[k] = torch.zeros([128 if d == 64 else d for d in v.shape])


def _deeper(t: dict[str, torch.Tensor]) -> None:
    for k in [k for k in t if ".layers.1." in k]:
        t[k.replace(".layers.1.", ".layers.5.")] = t.pop(k)


def u(bad: str, build: Callable[[Files], list], code: grpc.StatusCode, *fragments: str) -> tuple:
    """An upload case: what is bad, the messages (from the adapter's files), code, message fragments."""
    return bad, build, code, list(fragments)


def _sized(delta: int) -> Callable[[Files], list]:
    return lambda f: upload(f.good(), size=len(f.config) + len(f.weights) + delta)


UPLOAD_CASES = [
    u("no message at all", lambda f: [], INVALID, "first message", "manifest"),
    u("first message a chunk", lambda f: upload(f.good())[1:], INVALID, "first message", "manifest"),
    u("first message empty", lambda f: [apb.UploadAdapterRequest(), *upload(f.good())[1:]], INVALID,
      "first message", "manifest"),
    u("two manifests", _second_manifest, INVALID, "only the first message", "manifest"),
    u("manifest again after the chunks", lambda f: upload(f.good()) + upload(f.good())[:1], INVALID,
      "only the first message"),
    u("empty message after the manifest", lambda f: [*upload(f.good()), apb.UploadAdapterRequest()], INVALID,
      "neither a manifest nor a chunk"),
    u("name empty", lambda f: upload(f.good(), name=""), INVALID, "manifest.name is empty"),
    *[u(bad, lambda f, n=n: upload(f.good(), name=n), INVALID, "not a valid adapter name", "lowercase")
      for bad, n, _ in BAD_NAMES],
    u("name of 64 characters", lambda f: upload(f.good(), name="a" * 64), INVALID,
      "not a valid adapter name"),
    u("name qualified by an owner", lambda f: upload(f.good(), name="alice/fresh"), INVALID,
      "not a valid adapter name"),
    u("sha256 missing", lambda f: upload(f.good(), sha256=""), INVALID, "manifest.sha256 is empty"),
    u("sha256 in upper case", lambda f: upload(f.good(), sha256="AB" * 32), INVALID,
      "manifest.sha256", "64 lowercase hex"),
    u("sha256 too short", lambda f: upload(f.good(), sha256="ab" * 16), INVALID, "64 lowercase hex"),
    u("sha256 of 100k characters", lambda f: upload(f.good(), sha256="a" * 100_000), INVALID,
      "manifest.sha256", "64 lowercase hex"),
    u("sha256 of other data", lambda f: upload(f.good(), sha256=hashlib.sha256(b"other").hexdigest()),
      INVALID, "sha256 of the uploaded data", "nothing was stored"),
    u("size 0", lambda f: upload(f.good(), size=0), INVALID, "manifest.size is 0"),
    u("size above the tenant's upload limit", lambda f: upload(f.good(), size=UPLOAD_LIMIT + 1), EXHAUSTED,
      f"manifest.size={UPLOAD_LIMIT + 1}", f"upload limit of {UPLOAD_LIMIT} bytes"),
    u("size of 2**64-1 bytes", lambda f: upload(f.good(), size=2**64 - 1), EXHAUSTED, "upload limit"),
    u("one byte more than announced", _sized(-1), EXHAUSTED, "more than the", "its manifest announced"),
    u("far more bytes than announced", lambda f: upload([(WEIGHTS, b"\0" * UPLOAD_LIMIT)], size=100),
      EXHAUSTED, "more than the 100 bytes"),
    u("fewer bytes than announced", _sized(1), INVALID, "the upload ended after", "announced"),
    u("manifest without chunks", lambda f: upload(f.good())[:1], INVALID, "ended after 0 bytes"),
    u("visibility 99", lambda f: upload(f.good(), visibility=99), INVALID, "manifest.visibility=99"),
    u("description of 5000 characters", lambda f: upload(f.good(), description="d" * 5000), INVALID,
      "description has 5000 characters", "4096"),
    u("unknown file name", lambda f: upload([*f.good(), ("README.md", b"hi")]), INVALID,
      "chunk.file_name 'README.md' is invalid", CONFIG, WEIGHTS),
    u("empty file name", lambda f: upload([("", f.config), (WEIGHTS, f.weights)]), INVALID,
      "chunk.file_name '' is invalid"),
    u("file name with a path", lambda f: upload([(f"../{CONFIG}", f.config), (WEIGHTS, f.weights)]), INVALID,
      "chunk.file_name", "is invalid"),
    u("file name of 100k characters", lambda f: upload([(HUGE, f.config), (WEIGHTS, f.weights)]), INVALID,
      "chunk.file_name", "is invalid"),
    u("pickle file adapter_model.bin",
      lambda f: upload([(CONFIG, f.config), ("adapter_model.bin", f.weights)]), INVALID,
      "adapter_model.bin", "pickle", "never opened"),
    u("weights file missing", lambda f: upload([(CONFIG, f.config)]), INVALID, f"lacks {WEIGHTS}"),
    u("config file missing", lambda f: upload([(WEIGHTS, f.weights)]), INVALID, f"lacks {CONFIG}"),
    u("chunks of one file not contiguous", _interleaved, INVALID,
      f"the chunks of '{CONFIG}' are not contiguous"),
    u("config not JSON", lambda f: upload(f.with_config(b"{r: 8,")), INVALID,
      "adapter_config.json is not valid JSON"),
    u("config empty", lambda f: upload(f.with_config(b"")), INVALID, "adapter_config.json is not valid JSON"),
    u("config not UTF-8", lambda f: upload(f.with_config(b"\xff\xfe{")), INVALID,
      "adapter_config.json is not valid JSON"),
    u("config nested 100k deep", lambda f: upload(f.with_config(b"[" * 100_000)), INVALID,
      "adapter_config.json is not valid JSON"),
    u("config a JSON list", lambda f: upload(f.with_config(b"[1, 2]")), INVALID,
      "adapter_config.json must hold a JSON object"),
    u("config DoRA use_dora true", lambda f: upload(f.with_config(f.cfg(use_dora=True))), INVALID,
      "DoRA (use_dora) is not supported"),
    u("config not LoRA peft_type IA3", lambda f: upload(f.with_config(f.cfg(peft_type="IA3"))), INVALID,
      "peft_type 'IA3' is not supported"),
    u("config rank above the server's max", lambda f: upload(f.with_config(f.cfg(r=100_000))), INVALID,
      "key 'r' must be an integer from 1 to", "max_rank", "got 100000"),
    u("weights not safetensors", lambda f: upload([(CONFIG, f.config), (WEIGHTS, b"\x00" * 64)]), INVALID,
      f"{WEIGHTS} is not a valid safetensors file"),
    u("weights a pickle under the safetensors name",
      lambda f: upload([(CONFIG, f.config), (WEIGHTS, pickle.dumps({"lora": [1.0]}))]), INVALID,
      f"{WEIGHTS} is not a valid safetensors file"),
    u("lora_A of the wrong rank", lambda f: upload(f.with_weights(_put(Q_A0, torch.zeros(4, 64)))), INVALID,
      Q_A0, "shape [4, 64], expected [8, 64]"),
    u("lora_A with three dimensions", lambda f: upload(f.with_weights(_put(Q_A0, torch.zeros(8, 64, 1)))),
      INVALID, Q_A0, "shape [8, 64, 1]"),
    u("adapter for a wider base model", lambda f: upload(f.with_weights(_widen)), INVALID,
      "hidden size 128", "this base model's hidden size is 64"),
    u("adapter for a deeper base model", lambda f: upload(f.with_weights(_deeper)), INVALID,
      "layer 5", "the base model has 2 layers"),
    u("NaN weight", lambda f: upload(f.with_weights(_set(Q_A0, float("nan")))), INVALID, Q_A0, "NaN or inf"),
    u("inf weight", lambda f: upload(f.with_weights(_set(Q_A0, float("inf")))), INVALID, Q_A0, "NaN or inf"),
    u("integer weights", lambda f: upload(f.with_weights(_put(Q_A0, torch.zeros(8, 64, dtype=torch.int32)))),
      INVALID, f"tensor {Q_A0} has dtype I32; supported: F32, F16, BF16"),
    u("lora_A of dtype F8_E8M0", lambda f: upload(f.with_header(Q_A0, dtype="F8_E8M0", shape=[8, 256])), INVALID,
      f"tensor {Q_A0} has dtype F8_E8M0; supported: F32, F16, BF16"),
    u("lora_A whose shape needs more bytes than it has", lambda f: upload(f.with_header(Q_A0, shape=[8, 65])),
      INVALID, f"tensor {Q_A0}: shape [8, 65] (F32) needs 2080 bytes", "hold 2048"),
    u("config target_modules q{4294967296}", lambda f: upload(f.with_config(f.cfg(target_modules="q{4294967296}"))),
      INVALID, "target_modules is not a valid regular expression", "repetition number is too large"),
    u("config rank_pattern key a{0,4294967296}",
      lambda f: upload(f.with_config(f.cfg(rank_pattern={"a{0,4294967296}": 2}))), INVALID,
      "rank_pattern['a{0,4294967296}'] is not a valid regular expression"),
    u("config lora_alpha 10**400", lambda f: upload(f.with_config(f.cfg(lora_alpha=10**400))), INVALID,
      "key 'lora_alpha' must be a finite number from -65536 to 65536, got <an integer of 1329 bits>"),
    u("config alpha_pattern value NaN", lambda f: upload(f.with_config(f.cfg(alpha_pattern={"q_proj": NAN}))),
      INVALID, "alpha_pattern['q_proj'] must be a finite number"),
    u("config r -1", lambda f: upload(f.with_config(f.cfg(r=-1))), INVALID, "key 'r' must be an integer from 1 to"),
    u("lora_B missing for a module",
      lambda f: upload(f.with_weights(lambda t: t.pop(Q_A0.replace("_A.", "_B.")))), INVALID,
      "no lora_B", "model.layers.0.self_attn.q_proj"),
    u("weights for a module the config does not target",
      lambda f: upload(f.with_weights(_put(Q_A0.replace("q_proj", "k_proj"), torch.zeros(8, 64)))), INVALID,
      "k_proj", "does not target"),
    u("DoRA magnitude tensor",
      lambda f: upload(f.with_weights(_put(Q_A0.replace("lora_A.weight", "lora_magnitude_vector"),
                                           torch.ones(64)))), INVALID, "DoRA"),
    u("LoRA on the embeddings",
      lambda f: upload(f.with_weights(_put("base_model.model.model.embed_tokens.lora_embedding_A",
                                           torch.zeros(8, 128)))), INVALID, "embed_tokens"),
]


@pytest.mark.parametrize(("bad", "build", "code", "fragments"), UPLOAD_CASES,
                         ids=[c[0] for c in UPLOAD_CASES])
def test_bad_upload_is_refused_and_leaves_nothing_behind(server, files, bad, build, code, fragments):
    before = snapshot(server)
    err = rpc_error(server.adapters.UploadAdapter, iter(build(files)), metadata=auth("alice"), timeout=30)
    check_refusal(err, bad, code, fragments)
    assert snapshot(server) == before, f"{bad}: the refused upload changed the registry or the store"


def test_chunk_over_the_grpc_message_limit_is_resource_exhausted(server):
    """One chunk above grpc's 4 MiB message limit, within the tenant's upload limit (ops: 64 MiB)."""
    before = snapshot(server)
    data = b"\0" * (5 << 20)
    err = rpc_error(server.adapters.UploadAdapter, iter(upload([(WEIGHTS, data)], name="big")),
                    metadata=auth("ops"), timeout=30)
    assert err.code() == EXHAUSTED and "larger than max" in err.details()
    assert snapshot(server) == before


@pytest.mark.parametrize("changes, fragments", [
    pytest.param({"r": MIB2}, ["key 'r' must be an integer from 1 to"], id="r a string of 2 MiB"),
    pytest.param({"lora_alpha": MIB2}, ["key 'lora_alpha' must be a finite number"], id="lora_alpha a string of 2 MiB"),
    pytest.param({"peft_type": MIB2}, ["peft_type 'xxx", "is not supported"], id="peft_type of 2 MiB"),
    pytest.param({"rank_pattern": {MIB2: 2}}, ["rank_pattern['xxx", "is longer than 512"], id="rank_pattern key of 2 MiB"),
    pytest.param({"target_modules": [MIB2]}, ["target_modules[0] must be a name of 1 to 512"],
                 id="target_modules name of 2 MiB"),
])
def test_config_value_of_2_mib_is_invalid_argument_with_a_short_message(server, files, changes, fragments):
    """Quoted whole, the value overflowed the trailing metadata: the client saw RESOURCE_EXHAUSTED "Stream
    removed". ops uploads it (alice's limit is 200 kB), in chunks below grpc's 4 MiB message limit."""
    before = snapshot(server)
    config = files.cfg(**changes)
    chunks = [(CONFIG, config[i:i + (1 << 20)]) for i in range(0, len(config), 1 << 20)] + [(WEIGHTS, files.weights)]
    err = rpc_error(server.adapters.UploadAdapter, iter(upload(chunks, name="huge-value")), metadata=auth("ops"),
                    timeout=60)
    check_refusal(err, str(changes)[:40], INVALID, [*fragments, "... (2097152 chars)"])
    assert snapshot(server) == before


def test_unspoilt_upload_is_accepted(server, files):
    """The builders above spoil one thing each: unspoilt, the same messages register an adapter."""
    r = server.adapters.UploadAdapter(iter(upload(files.good(), name="control")), metadata=auth("bob"))
    assert r.created and r.current and r.version.owner == "bob"


# ---- unary RPCs ------------------------------------------------------------------------------------------

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
