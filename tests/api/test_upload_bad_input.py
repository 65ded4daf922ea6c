"""UploadAdapter answers a bad upload with the right status code and a message naming what is wrong, never
UNKNOWN or INTERNAL, and registers and stores nothing. Each case is named after its bad input."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable

import grpc
import pytest
import torch

from service.api.gen.loraserve.v1 import adapters_pb2 as apb
from tests.api.adapter_input import (
    BAD_NAMES,
    CONFIG,
    EXHAUSTED,
    HUGE,
    INVALID,
    UPLOAD_LIMIT,
    WEIGHTS,
    Files,
    adapter_files,
    auth,
    check_refusal,
    populated_server,
    snapshot,
    upload,
)
from tests.api.conftest import rpc_error

MIB2 = "x" * (2 << 20)  # quoted whole, it would overflow grpc's 16 KiB of trailing metadata
NAN = float("nan")
Q_A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # [r=8, hidden=64]


@pytest.fixture(scope="module")
def files(tiny) -> Files:
    return adapter_files(tiny)


@pytest.fixture(scope="module")
def server(tiny, files, tmp_path_factory):
    s = populated_server(tiny, files, tmp_path_factory.mktemp("upload-bad-input"))
    yield s
    s.close()


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
