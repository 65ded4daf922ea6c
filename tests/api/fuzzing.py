"""Hypothesis strategies for every loraserve RPC, built from the protos' descriptors: random field values
(boundary and huge numbers, NaN, unknown enum values, long strings, long repeated fields, nested messages)
and byte-level mutations of serialized messages (random bytes, truncations, bit flips, splices). A case is
sent with identity serializers, so whatever bytes it holds reach the server unparsed (`send`)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from service.api.gen.loraserve.v1 import adapters_pb2, inference_pb2, usage_pb2

F = FieldDescriptor
MAX_DEPTH = 3
MAX_GENERATE_TOKENS = 8  # keeps a valid Generate cheap: the fuzzer is after refusals, not completions


@dataclass(frozen=True)
class Rpc:
    path: str  # /loraserve.v1.InferenceService/Generate
    request: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def all_rpcs() -> list[Rpc]:
    """Every RPC of the three loraserve services, read from the generated descriptors."""
    return _rpcs(inference_pb2, adapters_pb2, usage_pb2)


def open_rpcs() -> list[Rpc]:
    """The RPCs anyone may call without a key: health Check and Watch, and reflection."""
    return _rpcs(health_pb2, reflection_pb2)


def _rpcs(*modules: Any) -> list[Rpc]:
    rpcs = []
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                rpcs.append(Rpc(f"/{service.full_name}/{m.name}", message_factory.GetMessageClass(m.input_type),
                                m.client_streaming, m.server_streaming))
    return rpcs


# ---- field values ------------------------------------------------------------------------------------------
# Strings a real caller might send (so requests get past the first checks) and classic trouble.
PLAUSIBLE = ["", "tiny-lora", "tiny-lora@1", "tiny-lora@v-000000000000000000000000", "local/tiny-lora",
             "alice/helper", "helper", "bob", "alice", "ops", "t5 t6 t7", "t3", "../x", "a/b/c", "x..y", "@", "/",
             "A_UPPER", " ", "\x00", "\n", "é", "😀", "%s%n", "'; DROP TABLE adapters; --", "0", "-1", "v-", "@@",
             "adapter_config.json", "adapter_model.safetensors", "a" * 65]
_INT_RANGES = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, 2, 3, 8, 16, 20, 21, 256, 511, 512, 1000, 1001, 2**31 - 1, 2**31, 2**32 - 1, 2**53,
                         2**63 - 1, 2**63, 2**64 - 1, -1, -2, -1000, -1001, -2**31, -2**63) if lo <= v <= hi]
    return st.one_of(st.integers(0, 20), st.sampled_from(edges), st.integers(lo, hi))


def floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, -0.0, -1.0, -2.5, 1e-300, 1e300]),
                     st.floats(width=width, allow_nan=True, allow_infinity=True))


def strings() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(PLAUSIBLE), st.text(max_size=40), st.text("t0123456789 @/-._", max_size=40),
                     st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "t5 "]), st.integers(200, 100_000)))


def blobs() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.builds(lambda n: b"\x00" * n, st.integers(64, 100_000)))


def scalars(field: FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t in _INT_RANGES:
        return ints(*_INT_RANGES[t])
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return floats(64 if t == F.TYPE_DOUBLE else 32)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return strings()
    if t == F.TYPE_BYTES:
        return blobs()
    if t == F.TYPE_ENUM:  # proto3 enums are open: any int32 parses
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), ints(-2**31, 2**31 - 1))
    raise AssertionError(f"no strategy for field type {t} of {field.full_name}")


def values(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if _is_map(field):  # map<K, V>: a dict (a map field is a repeated entry message on the wire)
        key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
        return st.dictionaries(scalars(key), values(value, depth + 1), max_size=20)
    one = messages(field.message_type, depth + 1) if field.type == F.TYPE_MESSAGE else scalars(field)
    if not _is_repeated(field):
        return one
    few = st.lists(one, max_size=5)
    if field.type in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):
        return few
    return st.one_of(few, st.builds(lambda v, n: [v] * n, one, st.integers(17, 50_000)))  # long, cheaply


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Instances of `desc`'s message with any subset of its fields set to any value (a oneof may get several
    members: the last one set wins, as on the wire)."""
    cls = message_factory.GetMessageClass(desc)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: st.deferred(lambda f=f: values(f, depth)) for f in desc.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: _build(cls, kw))


def _build(cls: type[Message], kw: dict) -> Message:
    msg = cls()
    for name, value in kw.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if field.type == F.TYPE_MESSAGE or _is_repeated(field) else None
        if _is_map(field):
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif _is_repeated(field):
            target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def cheap(msg: Message) -> Message:
    """A generation request whose max_tokens is small (or big enough to be refused): the fuzzer tests the
    answers to odd requests, not the model's speed."""
    if msg.DESCRIPTOR.name in ("GenerateRequest", "GenerateStreamRequest"):
        sp = msg.sampling
        if not sp.HasField("max_tokens") or sp.max_tokens > MAX_GENERATE_TOKENS and sp.max_tokens < 100_000:
            sp.max_tokens = sp.max_tokens % MAX_GENERATE_TOKENS + 1
    return msg


# ---- byte mutations ----------------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` damaged one way: random bytes, cut short, bits flipped, bytes spliced in, a bad varint."""
    how = draw(st.sampled_from(["random", "truncate", "flip", "splice", "varint", "repeat"]))
    if how == "random" or not data:
        return draw(st.binary(min_size=1, max_size=256))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if how == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    if how == "varint":  # a field key followed by a varint that never ends, or a length past the end
        return data + draw(st.sampled_from([b"\x08" + b"\xff" * 11, b"\x12\xff\xff\xff\xff\x0f", b"\x0a\x05ab",
                                            b"\x00", b"\x07", b"\xf8\xff\xff\xff\x0f\x01"]))
    return data * draw(st.integers(2, 4))  # the same fields again: legal, but oneofs and lengths get odd


def payloads(rpc: Rpc, vocab_size: int = 128) -> st.SearchStrategy[bytes]:
    """One request message's bytes: a valid message of odd values, or a mutation of one. Generation requests
    are also drawn near the valid range, so many get past validation into the engine and the sampler."""
    valid = messages(rpc.request.DESCRIPTOR).map(lambda m: cheap(m).SerializeToString())
    if rpc.request.DESCRIPTOR.name in ("GenerateRequest", "GenerateStreamRequest", "TokenizeRequest"):
        valid = st.one_of(valid, near_valid_generation(rpc.request, vocab_size).map(lambda m: m.SerializeToString()))
    return st.one_of(valid, valid.flatmap(mutated))


def near_valid_generation(cls: type[Message], vocab_size: int) -> st.SearchStrategy[Message]:
    """Prompts of the tiny model's words (t3 .. t127) or token ids, with sampling fields drawn from their
    valid ranges and their edges (temperature 1e-300, top_k past the vocabulary, penalties at +-2, ...)."""
    words = st.lists(st.integers(3, vocab_size - 1).map(lambda i: f"t{i}"), min_size=1, max_size=12).map(" ".join)
    ids = st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=40)
    roles = st.sampled_from([1, 2, 3, 4])
    chat = st.lists(st.builds(lambda r, c: {"role": r, "content": c}, roles, words), min_size=1, max_size=4)
    prompt = st.one_of(words.map(lambda w: {"text": w}), ids.map(lambda i: {"token_ids": {"ids": i}}),
                       chat.map(lambda m: {"messages": {"messages": m}}))
    unit = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 5e-324, 1e-300, 0.999999]))
    sampling = st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(1, MAX_GENERATE_TOKENS), "min_tokens": st.integers(0, MAX_GENERATE_TOKENS),
        "temperature": st.one_of(st.floats(0, 100), st.sampled_from([0.0, 5e-324, 1e-300, 1e300])),
        "top_k": st.one_of(st.integers(0, vocab_size + 2), st.just(2**32 - 1)), "top_p": unit, "min_p": unit,
        "repetition_penalty": st.one_of(st.floats(1e-300, 1e300), st.sampled_from([5e-324, 1e-3, 1.0, 100.0])),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(0, 2**63 - 1), "ignore_eos": st.booleans(), "logprobs": st.integers(0, 20)})
    rest = st.fixed_dictionaries({}, optional={
        "adapter": st.sampled_from(["", "tiny-lora", "tiny-lora@1", "local/tiny-lora", "tiny-lora@2"]),
        "sampling": sampling, "stop": st.lists(words, max_size=3),
        "stop_token_ids": st.lists(st.integers(0, vocab_size - 1), max_size=3),
        "client_request_id": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=128),
        "priority": st.integers(-1000, 1000),
        "labels": st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.-]{0,12}", fullmatch=True), st.text(max_size=20),
                                  max_size=4)})
    fields = {f.name for f in cls.DESCRIPTOR.fields}

    def build(p: dict, r: dict) -> Message:
        kw = {k: v for k, v in {**p, **r}.items() if k in fields}
        if "sampling" in fields:
            kw.setdefault("sampling", {}).setdefault("max_tokens", MAX_GENERATE_TOKENS)
        return json_format.ParseDict(kw, cls())

    return st.builds(build, prompt, rest)


# ---- uploads -----------------------------------------------------------------------------------------------
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def upload_streams(config: bytes, weights: bytes) -> st.SearchStrategy[list[bytes]]:
    """UploadAdapter request streams: consistent uploads (manifest with the right size and sha256) of the
    real adapter's files, spoiled ones or random ones, so they reach the adapter validation; and streams of
    arbitrary or damaged messages."""
    cfg = json.loads(config)
    config_files = st.one_of(
        st.just(config),
        st.fixed_dictionaries({}, optional={k: st.one_of(st.none(), st.booleans(), ints(-2**63, 2**63 - 1),
                                                         floats(64), strings(),
                                                         st.lists(st.sampled_from(["q_proj", "v_proj", "x", ""])))
                                            for k in (*cfg, "use_dora", "layers_to_transform", "modules_to_save")}
                              ).map(lambda ch: json.dumps({**cfg, **ch}).encode()),
        st.binary(max_size=64), mutated(config))
    weight_files = st.one_of(st.just(weights), mutated(weights), st.binary(max_size=64),
                             st.builds(lambda head: len(head).to_bytes(8, "little") + head, st.binary(max_size=64)))
    files = st.lists(st.tuples(st.sampled_from([CONFIG, WEIGHTS, "x.bin", "../x", "", "a" * 300]),
                               st.one_of(config_files, weight_files)), max_size=3)
    good = st.tuples(config_files, weight_files).map(lambda cw: [(CONFIG, cw[0]), (WEIGHTS, cw[1])])
    manifests = messages(adapters_pb2.UploadManifest.DESCRIPTOR)

    @st.composite
    def consistent(draw: st.DrawFn) -> list[bytes]:
        chunks = draw(st.one_of(good, files))
        data = b"".join(d for _, d in chunks)
        m = draw(manifests)
        m.name = draw(st.one_of(st.sampled_from(["fuzzed", "tiny-lora", "helper"]), strings()))
        m.size, m.sha256 = len(data), hashlib.sha256(data).hexdigest()
        msgs = [adapters_pb2.UploadAdapterRequest(manifest=m)]
        for name, d in chunks:
            cut = draw(st.integers(0, len(d)))  # each file in one or two chunks
            msgs += [adapters_pb2.UploadAdapterRequest(chunk=adapters_pb2.FileChunk(file_name=name, data=part))
                     for part in (d[:cut], d[cut:]) if part]
        out = [msg.SerializeToString() for msg in msgs]
        if draw(st.booleans()):  # damage one message of the stream, possibly in the middle
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(mutated(out[i]))
        return out

    arbitrary = st.lists(payloads(Rpc("", adapters_pb2.UploadAdapterRequest, True, False)), max_size=4)
    return st.one_of(consistent(), arbitrary)


# ---- sending -----------------------------------------------------------------------------------------------
LONG_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Case:
    rpc: Rpc
    requests: Sequence[bytes]  # one for a unary request
    caller: str | None  # a tenant of TENANT_KEYS, "stranger" (a wrong key), or None (no credentials)
    timeout: float = LONG_TIMEOUT_S  # a short one expires in the middle of the call
    cancel: bool = False  # a streaming call cancelled by the client after its first message


def send(channel: grpc.Channel, case: Case, metadata: tuple) -> tuple[grpc.StatusCode, str]:
    """Send the case's bytes as they are; the status code and message the call ended with."""
    rpc = case.rpc
    kind: Callable
    if rpc.client_streaming:
        kind = channel.stream_stream if rpc.server_streaming else channel.stream_unary
        arg: object = iter(case.requests)
    else:
        kind = channel.unary_stream if rpc.server_streaming else channel.unary_unary
        arg = case.requests[0]
    call = kind(rpc.path)  # no serializers: bytes go out and come back as they are
    try:
        if rpc.client_streaming and not rpc.server_streaming and case.cancel:
            sent, release = threading.Event(), threading.Event()
            future = call.future(_first_then_wait(case.requests, sent, release), metadata=metadata,
                                 timeout=case.timeout)
            while not sent.wait(0.01) and not future.done():  # done: the server ended it after one message
                pass
            future.cancel()
            release.set()
            future.result()
        elif rpc.server_streaming:
            responses = call(arg, metadata=metadata, timeout=case.timeout)
            for _ in responses:
                if case.cancel:
                    responses.cancel()
        else:
            call(arg, metadata=metadata, timeout=case.timeout)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    except grpc.FutureCancelledError:
        return grpc.StatusCode.CANCELLED, "cancelled by the client"
    return grpc.StatusCode.OK, ""


def _first_then_wait(requests: Sequence[bytes], sent: threading.Event, release: threading.Event) -> Iterator[bytes]:
    """The first request, then nothing until `release` (the caller cancels the call in between)."""
    yield from requests[:1]
    sent.set()
    release.wait(LONG_TIMEOUT_S)
