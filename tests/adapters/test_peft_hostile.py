"""Hostile adapter uploads: each is refused with an AdapterError (a ValueError: INVALID_ARGUMENT over gRPC) whose
message names the bad key or tensor and stays short, however large the bad value. Each case is named after its
bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from adapters import peft_regex
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, parse_adapter
from tests.adapters.peft_files import edit_config, lora, save_adapter, tiny_arch

MAX_MESSAGE = 1024  # gRPC sends the message in trailing metadata (16 KiB at most): far below that
MIB2 = "x" * (2 << 20)
HUGE_INT = 10**400  # a JSON integer with no float: float() and math.isfinite raise OverflowError
RANK = "must be an integer from 1 to 128 (the server's max_rank)"
ALPHA = "must be a finite number from -65536 to 65536"
LAYERS = "integers from 0 to 65535"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save_adapter(tmp_path_factory.mktemp("hostile") / "adapter", lora())[0]


@pytest.fixture
def good(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "adapter"))


def refusal(source, *fragments: str) -> str:
    with pytest.raises(AdapterError) as info:
        parse_adapter(source, tiny_arch())
    message = str(info.value)
    assert len(message) < MAX_MESSAGE, f"a message of {len(message)} characters"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def case(bad: str, changes: dict, *fragments: str):
    return pytest.param(changes, fragments, id=bad)


TOO_LARGE = "is not a valid regular expression: the repetition number is too large"

REGEX_CASES = [
    case("target_modules q{4294967296}", {"target_modules": "q{4294967296}"}, "target_modules", TOO_LARGE),
    case("target_modules a{0,4294967296}", {"target_modules": "a{0,4294967296}"}, "target_modules", TOO_LARGE),
    case("exclude_modules q{4294967296}", {"exclude_modules": "q{4294967296}"}, "exclude_modules", TOO_LARGE),
    case("rank_pattern key q{4294967296}", {"rank_pattern": {"q{4294967296}": 2}},
         "rank_pattern['q{4294967296}']", TOO_LARGE),
    case("alpha_pattern key a{0,4294967296}", {"alpha_pattern": {"a{0,4294967296}": 2}},
         "alpha_pattern['a{0,4294967296}']", TOO_LARGE),
    case("layers_pattern q{4294967296}", {"layers_to_transform": [0], "layers_pattern": "q{4294967296}"},
         "layers_pattern", TOO_LARGE),
    case("target_modules (?:){4294967294}, four billion empty matches", {"target_modules": "(?:){4294967294}"},
         "target_modules repeats a part 4294967294 times; a repeat count must be from 0 to 256"),
    case("exclude_modules q{257}", {"exclude_modules": "q{257}"}, "exclude_modules repeats a part 257 times"),
    case("alpha_pattern key q{0,100000}", {"alpha_pattern": {"q{0,100000}": 2}},
         "alpha_pattern['q{0,100000}'] repeats a part 100000 times"),
    case("layers_pattern redefining the idx group", {"layers_to_transform": [0], "layers_pattern": "(?P<idx>x)"},
         "layers_pattern is not a valid regular expression", "idx"),
    case("rank_pattern key of 2 MiB", {"rank_pattern": {MIB2: 2}},
         "rank_pattern['xxx", "... (2097152 chars)] is longer than 512 characters"),
    case("target_modules regex of 2 MiB", {"target_modules": MIB2}, "target_modules is longer than 512"),
    case("rank_pattern key with a bad group name of 400 chars", {"rank_pattern": {"(?P<" + "-" * 400 + ">x)": 2}},
         "rank_pattern['(?P<---", "is not a valid regular expression: bad character in group name '---"),
]


@pytest.mark.parametrize("changes, fragments", REGEX_CASES)
def test_hostile_regex_is_refused_by_key(good, changes, fragments):
    refusal(edit_config(good, **changes), *fragments)


@pytest.mark.parametrize("error", [RecursionError, OverflowError, MemoryError, KeyError, AssertionError])
def test_any_error_of_the_regex_parser_names_the_key(good, monkeypatch, error):
    def parse(*args, **kwargs):
        raise error("deep inside sre")
    monkeypatch.setattr(peft_regex._sre_parse, "parse", parse)
    refusal(edit_config(good, target_modules="q_proj|v_proj"), "target_modules is not a valid regular expression")


def test_compile_time_of_all_regexes_is_bounded(good, monkeypatch):
    # A 512-character class of every code point compiles in ~0.1-0.5 s; thousands of such keys, in hours.
    monkeypatch.setattr(peft_regex, "MAX_COMPILE_S", 0.05)
    wide = "[\x00-\U0010ffff]" * 100
    keys = {f"{i}{wide}": 2 for i in range(50)}
    refusal(edit_config(good, rank_pattern=keys), "rank_pattern['", "took more than 0.05 s")


CONFIG_CASES = [
    case("r 10**400", {"r": HUGE_INT}, f"key 'r' {RANK}, got <an integer of 1329 bits>"),
    case("r -4", {"r": -4}, f"key 'r' {RANK}, got -4"),
    case("r 0", {"r": 0}, f"key 'r' {RANK}, got 0"),
    case("r 129 above max_rank", {"r": 129}, f"key 'r' {RANK}, got 129"),
    case("r true", {"r": True}, f"key 'r' {RANK}, got True"),
    case("r 4.0", {"r": 4.0}, f"key 'r' {RANK}, got 4.0"),
    case("r NaN", {"r": float("nan")}, f"key 'r' {RANK}, got nan"),
    case("r Infinity", {"r": float("inf")}, f"key 'r' {RANK}, got inf"),
    case("r null", {"r": None}, f"key 'r' {RANK}, got None"),
    case("r a string of 2 MiB", {"r": MIB2}, f"key 'r' {RANK}, got 'xxx", "... (2097152 chars)"),
    case("r a nested object", {"r": {"a": {"b": [MIB2]}}}, f"key 'r' {RANK}, got {{'a': {{'b': [...]}}}}"),
    case("lora_alpha 10**400", {"lora_alpha": HUGE_INT}, f"key 'lora_alpha' {ALPHA}, got <an integer of 1329 bits>"),
    case("lora_alpha -10**400", {"lora_alpha": -HUGE_INT}, f"key 'lora_alpha' {ALPHA}"),
    case("lora_alpha 65537", {"lora_alpha": 65537}, f"key 'lora_alpha' {ALPHA}, got 65537"),
    case("lora_alpha NaN", {"lora_alpha": float("nan")}, f"key 'lora_alpha' {ALPHA}, got nan"),
    case("lora_alpha Infinity", {"lora_alpha": float("inf")}, f"key 'lora_alpha' {ALPHA}, got inf"),
    case("lora_alpha -Infinity", {"lora_alpha": float("-inf")}, f"key 'lora_alpha' {ALPHA}, got -inf"),
    case("lora_alpha true", {"lora_alpha": True}, f"key 'lora_alpha' {ALPHA}, got True"),
    case("lora_alpha '16'", {"lora_alpha": "16"}, f"key 'lora_alpha' {ALPHA}, got '16'"),
    case("lora_alpha a list", {"lora_alpha": [16]}, f"key 'lora_alpha' {ALPHA}, got [16]"),
    case("rank_pattern value 10**400", {"rank_pattern": {"q_proj": HUGE_INT}}, f"rank_pattern['q_proj'] {RANK}"),
    case("rank_pattern value -2", {"rank_pattern": {"q_proj": -2}}, f"rank_pattern['q_proj'] {RANK}, got -2"),
    case("rank_pattern value true", {"rank_pattern": {"q_proj": True}}, f"rank_pattern['q_proj'] {RANK}, got True"),
    case("rank_pattern value 2.5", {"rank_pattern": {"q_proj": 2.5}}, f"rank_pattern['q_proj'] {RANK}, got 2.5"),
    case("rank_pattern value NaN", {"rank_pattern": {"q_proj": float("nan")}}, f"rank_pattern['q_proj'] {RANK}"),
    case("rank_pattern value an object", {"rank_pattern": {"q_proj": {"r": 2}}}, f"rank_pattern['q_proj'] {RANK}"),
    case("rank_pattern a list", {"rank_pattern": [["q_proj", 2]]}, "key 'rank_pattern' must be an object"),
    case("rank_pattern of 4097 keys", {"rank_pattern": {f"k{i}": 2 for i in range(4097)}},
         "rank_pattern has 4097 keys; at most 4096 are allowed"),
    case("alpha_pattern value 10**400", {"alpha_pattern": {"v_proj": HUGE_INT}}, f"alpha_pattern['v_proj'] {ALPHA}"),
    case("alpha_pattern value NaN", {"alpha_pattern": {"v_proj": float("nan")}}, f"alpha_pattern['v_proj'] {ALPHA}"),
    case("alpha_pattern value a string of 2 MiB", {"alpha_pattern": {"v_proj": MIB2}},
         f"alpha_pattern['v_proj'] {ALPHA}", "(2097152 chars)"),
    case("use_rslora 1", {"use_rslora": 1}, "key 'use_rslora' must be true or false, got 1"),
    case("fan_in_fan_out 'yes'", {"fan_in_fan_out": "yes"}, "key 'fan_in_fan_out' must be true or false"),
    case("target_modules of 4097 names", {"target_modules": [f"m{i}" for i in range(4097)]},
         "target_modules has 4097 entries; at most 4096 are allowed"),
    case("target_modules name of 2 MiB", {"target_modules": ["q_proj", MIB2]},
         "target_modules[1] must be a name of 1 to 512 characters, got 'xxx", "(2097152 chars)"),
    case("target_modules name empty", {"target_modules": [""]}, "target_modules[0] must be a name of 1 to 512"),
    case("target_modules name a number", {"target_modules": ["q_proj", 7]}, "target_modules[1] must be a name"),
    case("target_modules name not a projection, 500 chars", {"target_modules": ["y" * 500]},
         "target module 'yyy", "... (500 chars) is not one of the supported projections"),
    case("target_modules an object", {"target_modules": {"q_proj": MIB2}}, "key 'target_modules' must be a string"),
    case("exclude_modules name of 2 MiB", {"exclude_modules": [MIB2]}, "exclude_modules[0] must be a name"),
    case("layers_to_transform 10**400", {"layers_to_transform": HUGE_INT},
         "key 'layers_to_transform'", LAYERS, "got <an integer of 1329 bits>"),
    case("layers_to_transform -1", {"layers_to_transform": [0, -1]}, "key 'layers_to_transform'", LAYERS),
    case("layers_to_transform [true]", {"layers_to_transform": [True]}, "key 'layers_to_transform'", LAYERS),
    case("layers_to_transform 1.5", {"layers_to_transform": 1.5}, "key 'layers_to_transform'", LAYERS),
    case("layers_to_transform of 4097 entries", {"layers_to_transform": [0] * 4097},
         "layers_to_transform has 4097 entries; at most 4096"),
    case("layers_pattern name of 2 MiB", {"layers_to_transform": [0], "layers_pattern": [MIB2]},
         "layers_pattern[0] must be a name of 1 to 512 characters"),
    case("layers matching nothing, with long names", {"layers_to_transform": [60000], "layers_pattern": "w" * 400},
         "matches no module", "layers_pattern='www", "(400 chars)"),
    case("peft_type of 2 MiB", {"peft_type": MIB2}, "peft_type 'xxx", "(2097152 chars) is not supported"),
    case("bias of 2 MiB", {"bias": MIB2}, "bias='xxx", "(2097152 chars) is not supported"),
    case("use_dora a string of 2 MiB", {"use_dora": MIB2}, "DoRA (use_dora) is not supported (got use_dora='xxx"),
    case("megatron_config deeply nested", {"megatron_config": {"a": [[[[[[MIB2]]]]]]}},
         "megatron_config (Megatron-parallel LoRA) is not supported"),
    case("init_lora_weights pissa of 2 MiB", {"init_lora_weights": "pissa" + MIB2},
         "init_lora_weights='pissaxx", "rewritten base weights"),
    case("init_lora_weights an object", {"init_lora_weights": {"method": "pissa"}},
         "key 'init_lora_weights' must be true, false or the name of an initialisation"),
]


@pytest.mark.parametrize("changes, fragments", CONFIG_CASES)
def test_hostile_config_value_is_refused_by_key(good, changes, fragments):
    refusal(edit_config(good, **changes), *fragments)


@pytest.mark.parametrize("text, fragments", [
    pytest.param('{"r": 1e400}', ["key 'r'", RANK, "got inf"], id="r 1e400 float literal"),
    pytest.param('{"lora_alpha": 1e400}', ["key 'lora_alpha'", ALPHA, "got inf"], id="lora_alpha 1e400 float literal"),
    pytest.param('{"lora_alpha": -Infinity}', ["key 'lora_alpha'", ALPHA], id="lora_alpha -Infinity literal"),
    pytest.param('{"lora_dropout": 1' + "0" * 5000 + "}", ["adapter_config.json is not valid JSON", "4300 digits"],
                 id="an integer of 5001 digits"),
])
def test_hostile_json_literals(good, text, fragments):
    cfg = json.loads((good / CONFIG_FILE).read_text())
    text = json.dumps(cfg)[:-1] + ", " + text[1:]  # appended: later keys win
    (good / CONFIG_FILE).write_text(text)
    refusal(good, *fragments)


def test_ignored_fields_stay_ignored_whatever_they_hold(good):
    edit_config(good, lora_dropout=HUGE_INT, task_type={"a": [[[[MIB2]]]]}, revision=float("nan"),
                some_future_field=MIB2, base_model_name_or_path={"not": "a string"}, eva_config=[float("inf")],
                use_dora=False, bias=None, init_lora_weights=None, layers_pattern=None, exclude_modules=None)
    parsed = parse_adapter(good, tiny_arch())
    assert parsed.config.base_model_name_or_path is None and parsed.max_rank == 4


# --- adapter_model.safetensors ----------------------------------------------------------------------------

Q_A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # [r=4, hidden=64]
Q_B0 = Q_A0.replace("lora_A", "lora_B")  # [hidden=64, r=4]: as many bytes as Q_A0


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def read_header(good: Path) -> tuple[dict, bytes]:
    blob = (good / WEIGHTS_FILE).read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_weights(good: Path, header: dict, data: bytes) -> Path:
    (good / WEIGHTS_FILE).write_bytes(safetensors_bytes(header, data))
    return good


def retyped(dtype: str, itemsize: int):
    """lora_A of layer 0's q_proj stored as `dtype` (its bytes resized to match), the other tensors as they were."""
    def change(header: dict, data: bytes) -> tuple[dict, bytes]:
        out, chunks, offset = {}, [], 0
        for name, entry in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                  key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            chunk = data[begin:end] if name != Q_A0 else bytes(4 * 64 * itemsize)
            out[name] = {**entry, "dtype": entry["dtype"] if name != Q_A0 else dtype,
                         "data_offsets": [offset, offset + len(chunk)]}
            chunks.append(chunk)
            offset += len(chunk)
        return out, b"".join(chunks)
    return change


def spoil(change):
    return lambda header, data: (change(header), data)


def _set(name: str, **fields):
    return spoil(lambda h: {**h, name: {**h[name], **fields}})


SUPPORTED = "supported: F32, F16, BF16"
DTYPE_CASES = [pytest.param(retyped(dtype, size), [f"tensor {Q_A0} has dtype {dtype}; {SUPPORTED}"], id=f"lora_A {dtype}")
               for dtype, size in [("F8_E8M0", 1), ("F8_E4M3", 1), ("F8_E5M2", 1), ("I8", 1), ("U8", 1),
                                   ("BOOL", 1), ("I32", 4), ("I64", 8), ("F64", 8), ("C64", 8), ("F4", 1)]]
HEADER_CASES = [
    *DTYPE_CASES,
    pytest.param(_set(Q_A0, dtype="X" * 100_000), [f"tensor {Q_A0} has dtype 'XXX", "(100000 chars)", SUPPORTED],
                 id="dtype a string of 100k chars"),
    pytest.param(_set(Q_A0, dtype=7), [f"tensor {Q_A0} has dtype 7", SUPPORTED], id="dtype a number"),
    pytest.param(_set(Q_A0, shape=[4, 65]), [f"tensor {Q_A0}: shape [4, 65] (F32) needs 1040 bytes",
                                             "data_offsets", "hold 1024"], id="shape larger by one column"),
    pytest.param(_set(Q_A0, shape=[8, 64]), [f"tensor {Q_A0}: shape [8, 64] (F32) needs 2048 bytes"],
                 id="shape larger than its bytes"),
    pytest.param(_set(Q_A0, shape=[HUGE_INT, 64]), [f"tensor {Q_A0}: shape", "must be a list of at most 8"],
                 id="shape with a dim of 10**400"),
    pytest.param(_set(Q_A0, shape=[-4, -64]), [f"tensor {Q_A0}: shape [-4, -64] must be a list of at most 8"],
                 id="shape negative"),
    pytest.param(_set(Q_A0, shape=[1] * 9), [f"tensor {Q_A0}: shape", "at most 8"], id="shape of 9 dims"),
    pytest.param(_set(Q_A0, shape="4x64"), [f"tensor {Q_A0}: shape '4x64' must be a list"], id="shape a string"),
    pytest.param(_set(Q_A0, data_offsets=[0, 2**64]), [f"tensor {Q_A0}: data_offsets [0, 18446744073709551616] must be"],
                 id="data_offsets end 2**64"),
    pytest.param(_set(Q_A0, data_offsets=[-1024, 0]), [f"tensor {Q_A0}: data_offsets [-1024, 0] must be"],
                 id="data_offsets negative"),
    pytest.param(_set(Q_A0, data_offsets=[0]), [f"tensor {Q_A0}: data_offsets [0] must be"], id="data_offsets one int"),
    pytest.param(spoil(lambda h: {**h, Q_A0: {**h[Q_A0], "data_offsets": h[Q_B0]["data_offsets"]}}),
                 ["overlap", "or leave a gap"], id="two tensors on the same bytes"),
    pytest.param(spoil(lambda h: {**h, Q_A0: [1, 2]}), [f"tensor {Q_A0}: its header entry must be an object"],
                 id="tensor entry a list"),
    pytest.param(spoil(lambda h: {**h, Q_A0: {"dtype": "F32", "shape": [4, 64]}}),
                 [f"tensor {Q_A0}: its header entry must be an object with dtype, shape and data_offsets"],
                 id="tensor entry without data_offsets"),
    pytest.param(spoil(lambda h: {**h, "__metadata__": {"format": ["pt"]}}),
                 ["__metadata__ must map strings to strings"], id="__metadata__ with a list value"),
    pytest.param(spoil(lambda h: {**h, "n" * 300: h.pop(Q_A0)}), ["a tensor name of 300 characters", "'nnn"],
                 id="tensor name of 300 chars"),
]


@pytest.mark.parametrize("change, fragments", HEADER_CASES)
def test_hostile_safetensors_header_is_refused_before_loading(good, change, fragments):
    write_weights(good, *change(*read_header(good)))
    refusal(good, *fragments)


@pytest.mark.parametrize("blob, fragments", [
    pytest.param(b"", ["adapter_model.safetensors is not a valid safetensors file: 0 bytes"], id="empty file"),
    pytest.param(b"\x10\x00\x00", ["3 bytes"], id="3 bytes"),
    pytest.param(struct.pack("<Q", 2**64 - 1) + b"{}", ["header of 18446744073709551615 bytes",
                                                        "at most 1048576"], id="header length 2**64-1"),
    pytest.param(struct.pack("<Q", (1 << 20) + 1) + b" " * ((1 << 20) + 1), ["header of 1048577 bytes"],
                 id="header of 1 MiB + 1"),
    pytest.param(struct.pack("<Q", 100) + b"{}", ["header of 100 bytes", "only 2 follow"],
                 id="header longer than the file"),
    pytest.param(safetensors_bytes([1, 2], b""), ["header must be a JSON object"], id="header a JSON list"),
    pytest.param(struct.pack("<Q", 5) + b"{bad}", ["header is not valid JSON"], id="header not JSON"),
    pytest.param(struct.pack("<Q", 3) + b"\xff\xfe{", ["header is not valid JSON"], id="header not UTF-8"),
    pytest.param(struct.pack("<Q", 20000) + b"[" * 20000, ["header is not valid JSON"], id="header nested 20k deep"),
])
def test_corrupt_safetensors_file(good, blob, fragments):
    (good / WEIGHTS_FILE).write_bytes(blob)
    refusal(good, *fragments)
