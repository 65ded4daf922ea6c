"""What the AdapterService bad-input tests share: the tiny adapter's files and ways to spoil them, an upload's
messages, a server whose registry has something to lose, and the checks every refusal must pass."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from tests.api.conftest import TENANT_KEYS, Server, tenants_server

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
UPLOAD_LIMIT = 200_000  # alice's max_upload_bytes; the tiny adapter is ~25 KB
MAX_MESSAGE_CHARS = 600  # a 100k-character input must not come back whole in the message
HUGE = "x" * 100_000

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
    return (("authorization", f"Bearer {TENANT_KEYS[who]}"),)


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



def adapter_files(tiny) -> Files:
    return Files((tiny[1] / CONFIG).read_bytes(), (tiny[1] / WEIGHTS).read_bytes())


def populated_server(tiny, files: Files, root: Path) -> Server:
    """alice (upload limit UPLOAD_LIMIT) owns `helper` (v1 current, v2 not promoted, private) and `shared-one`
    (shared with bob); ops owns another `shared-one` shared with bob, so a bare `shared-one` is not found for
    bob (it names his own or the service's adapter), with both qualified names in the message."""
    s = tenants_server(tiny, root, f"{{max_upload_bytes: {UPLOAD_LIMIT}}}", adapter=False)
    up = s.adapters.UploadAdapter
    s.v1 = up(iter(upload(files.good(), name="helper")), metadata=auth("alice")).version
    v2 = files.with_config(files.cfg(lora_alpha=8))  # another scale: another version
    s.v2 = up(iter(upload(v2, name="helper", promote=False)), metadata=auth("alice")).version
    assert (s.v1.number, s.v2.number) == (1, 2) and s.v1.version_id != s.v2.version_id
    for owner in ("alice", "ops"):
        up(iter(upload(files.good(), name="shared-one")), metadata=auth(owner))
        share = apb.ShareAdapterRequest(name="shared-one", grant=["bob"])
        s.adapters.ShareAdapter(share, metadata=auth(owner))
    return s


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

