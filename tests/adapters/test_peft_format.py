"""PEFT LoRA adapters written by peft itself, parsed and checked against peft's own PeftModel."""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import re
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.identity import adapter_version_id
from adapters.peft_config import module_name
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, ParsedAdapter, parse_adapter
from tests.adapters.peft_files import LAYERS, edit_config, edit_tensors, lora, save_adapter, tiny_arch

BASE_ID = "tiny-llama@sha256:0123"


def peft_modules(pm) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, projection) -> (rank, scaling) of every LoRA layer peft created."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            m = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.(\w+)", name)
            assert m, name
            out[(int(m[1]), m[2])] = (mod.lora_A["default"].weight.shape[0], mod.scaling["default"])
    return out


def parsed_modules(parsed: ParsedAdapter) -> dict[tuple[int, str], tuple[int, float]]:
    assert {k: m.rank for k, m in parsed.config.modules.items()} == {k: w.A.shape[0] for k, w in parsed.weights.items()}
    return {k: (w.A.shape[0], w.scale) for k, w in parsed.weights.items()}


@pytest.fixture
def good(tmp_path) -> Path:
    return save_adapter(tmp_path / "good", lora())[0]


# --- adapters written by peft load unchanged --------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_unchanged(tmp_path, rslora):
    root, pm = save_adapter(tmp_path, lora(r=4, lora_alpha=8, use_rslora=rslora))
    parsed = parse_adapter(root, tiny_arch())
    sd = peft.get_peft_model_state_dict(pm)
    assert set(parsed.weights) == {(i, p) for i in range(LAYERS) for p in ("q_proj", "v_proj")}
    for (layer, proj), w in parsed.weights.items():
        prefix = f"base_model.model.{module_name(layer, proj)}"
        assert w.A.dtype == w.B.dtype == torch.float32
        assert torch.equal(w.A, sd[f"{prefix}.lora_A.weight"]) and torch.equal(w.B, sd[f"{prefix}.lora_B.weight"])
        assert w.scale == (8 / math.sqrt(4) if rslora else 8 / 4)
    assert parsed_modules(parsed) == peft_modules(pm)
    assert parsed.target_modules == {"q_proj", "v_proj"} and parsed.max_rank == 4
    assert parsed.nbytes == sum(w.A.nbytes + w.B.nbytes for w in parsed.weights.values())
    assert parsed.config.use_rslora is rslora


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_follow_peft(tmp_path, rslora):
    config = lora(
        target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6, r"model\.layers\.2\.self_attn\.v_proj": 3},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.down_proj": 5},
    )
    root, pm = save_adapter(tmp_path, config)
    parsed = parse_adapter(root, tiny_arch())
    expected = peft_modules(pm)
    assert parsed_modules(parsed) == expected
    assert expected[(1, "q_proj")][0] == 2 and expected[(2, "v_proj")][0] == 3 and expected[(0, "q_proj")][0] == 4


def test_regex_target_modules(tmp_path):
    root, pm = save_adapter(tmp_path, lora(target_modules=r"model\.layers\.[02]\.(self_attn\.k|mlp\.up)_proj"))
    parsed = parse_adapter(root, tiny_arch())
    assert set(parsed.weights) == {(0, "k_proj"), (0, "up_proj"), (2, "k_proj"), (2, "up_proj")}
    assert parsed_modules(parsed) == peft_modules(pm)


def test_all_linear_written_by_peft_or_by_hand(tmp_path):
    root, pm = save_adapter(tmp_path, lora(target_modules="all-linear", rank_pattern={"mlp.up_proj": 2}))
    by_peft = parse_adapter(root, tiny_arch())  # peft saves the resolved list of names
    assert set(by_peft.weights) == {(i, p) for i in range(LAYERS) for p in tiny_arch().linear_shapes()}
    assert parsed_modules(by_peft) == peft_modules(pm)
    by_hand = parse_adapter(edit_config(root, target_modules="all-linear"), tiny_arch())  # lm_head excluded
    assert parsed_modules(by_hand) == parsed_modules(by_peft)
    with pytest.raises(AdapterError, match="layers_to_transform/layers_pattern cannot be used"):
        parse_adapter(edit_config(root, layers_to_transform=[0]), tiny_arch())


@pytest.mark.parametrize("layers, pattern", [(1, None), ([0, 2], "layers")])
def test_layers_to_transform(tmp_path, layers, pattern):
    root, pm = save_adapter(tmp_path, lora(layers_to_transform=layers, layers_pattern=pattern))
    parsed = parse_adapter(root, tiny_arch())
    assert {layer for layer, _ in parsed.weights} == ({layers} if isinstance(layers, int) else set(layers))
    assert parsed_modules(parsed) == peft_modules(pm)


def test_in_memory_upload_and_default_infix(good):
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    from_dir = parse_adapter(good, tiny_arch())
    renamed = edit_tensors(good, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    from_mem = parse_adapter({**files, WEIGHTS_FILE: (renamed / WEIGHTS_FILE).read_bytes()}, tiny_arch())
    for key, w in from_dir.weights.items():
        assert torch.equal(w.A, from_mem.weights[key].A) and torch.equal(w.B, from_mem.weights[key].B)


def test_half_precision_weights_become_fp32(good):
    edit_tensors(good, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    parsed = parse_adapter(good, tiny_arch())
    assert all(w.A.dtype == torch.float32 and w.B.dtype == torch.float32 for w in parsed.weights.values())


# --- refused adapters: one test each, the message names the problem --------------------------------------


@pytest.mark.parametrize("config, words", [
    (lora(use_dora=True), "DoRA"),
    (lora(modules_to_save=["lm_head"]), "modules_to_save"),
    (lora(bias="all"), "bias='all'"),
    (lora(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    (lora(target_modules=["q_proj", "lm_head"]), "lm_head"),
])
def test_refused_features_written_by_peft(tmp_path, config, words):
    root, _ = save_adapter(tmp_path, config)
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_adapter(root, tiny_arch())


@pytest.mark.parametrize("config, lie, words", [
    (lora(use_dora=True), {"use_dora": False}, "q_proj.lora_magnitude_vector: DoRA"),
    (lora(target_modules=["q_proj", "embed_tokens"]), {"target_modules": ["q_proj"]}, "model.embed_tokens."),
    (lora(modules_to_save=["lm_head"]), {"modules_to_save": None}, "base_model.model.lm_head.weight"),
])
def test_refused_features_detected_from_tensors_alone(tmp_path, config, lie, words):
    root, _ = save_adapter(tmp_path, config)
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_adapter(edit_config(root, **lie), tiny_arch())


def test_other_peft_types(tmp_path):
    root, _ = save_adapter(tmp_path, peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not supported"):
        parse_adapter(root, tiny_arch())
    (root / CONFIG_FILE).write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    with pytest.raises(AdapterError, match="PREFIX_TUNING"):
        parse_adapter(root, tiny_arch())


@pytest.mark.parametrize("key, value, words", [
    ("layer_replication", [[0, 2], [1, 3]], "layer_replication"),
    ("use_qalora", True, "QA-LoRA"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config"),
    ("lora_bias", True, "lora_bias"),
    ("trainable_token_indices", [5], "trainable_token_indices"),
    ("alora_invocation_tokens", [3, 4], "activated LoRA"),
    ("init_lora_weights", "pissa_niter_4", "rewritten base weights"),
])
def test_refused_config_features(good, key, value, words):
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_adapter(edit_config(good, **{key: value}), tiny_arch())


def test_harmless_config_fields_are_ignored(good):
    edit_config(good, lora_dropout=0.1, init_lora_weights="gaussian", fan_in_fan_out=True, task_type="CAUSAL_LM",
                base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", some_future_field=None)
    parsed = parse_adapter(good, tiny_arch())
    assert parsed.config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_lm_head_tensor_refused(good):
    edit_tensors(good, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(AdapterError, match="base_model.model.lm_head.lora_A.weight.*lm_head"):
        parse_adapter(good, tiny_arch())


def test_adapter_for_another_hidden_size(tmp_path):
    root, _ = save_adapter(tmp_path, lora(), hidden=128)
    with pytest.raises(AdapterError, match=r"lora_A\.weight has shape \[4, 128\].*hidden size 128.*hidden size is 64"):
        parse_adapter(root, tiny_arch())


def test_shape_mismatch_names_tensor_expected_and_actual(good):
    edit_config(good, rank_pattern={"model.layers.1.self_attn.v_proj": 8})
    with pytest.raises(AdapterError, match=re.escape(
            "tensor base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight has shape [4, 64], expected [8, 64]")):
        parse_adapter(good, tiny_arch())


def test_adapter_for_a_deeper_model(good):
    with pytest.raises(AdapterError, match="layer 2 but the base model has 2 layers"):
        parse_adapter(good, tiny_arch(layers=2))
    with pytest.raises(AdapterError, match="model.layers.3.self_attn.q_proj but adapter_model.safetensors has no"):
        parse_adapter(good, tiny_arch(layers=4))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights(good, bad):
    name = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][3, 1] = bad
        return t

    with pytest.raises(AdapterError, match=re.escape(f"tensor {name} holds 1 NaN or inf values")):
        parse_adapter(edit_tensors(good, poison), tiny_arch())


def test_missing_half_of_a_pair(good):
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(good, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(AdapterError, match=r"no lora_B for model\.layers\.1\.self_attn\.q_proj"):
        parse_adapter(good, tiny_arch())


def test_unexpected_tensor(good):
    edit_tensors(good, lambda t: {**t, "base_model.model.model.norm.weight": torch.ones(64)})
    with pytest.raises(AdapterError, match=r"unexpected tensor base_model\.model\.model\.norm\.weight"):
        parse_adapter(good, tiny_arch())


def test_pickle_files_refused_without_being_opened(good, monkeypatch):
    (good / "adapter_model.bin").write_bytes(b"\x80\x04garbage that would be unpickled")
    opened: list[str] = []

    def spy(real):
        def wrapper(file, *args, **kwargs):
            opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
            return real(file, *args, **kwargs)
        return wrapper

    for mod, attr in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(mod, attr, spy(getattr(mod, attr)))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(AdapterError, match="adapter_model.bin: pickle-based weight files"):
        parse_adapter(good, tiny_arch())
    with pytest.raises(AdapterError, match="training_args.bin"):
        parse_adapter({CONFIG_FILE: b"{}", WEIGHTS_FILE: b"", "training_args.bin": b"\x80"}, tiny_arch())
    assert not [p for p in opened if p.endswith(".bin")]
    (good / "adapter_model.bin").unlink()
    parse_adapter(good, tiny_arch())
    assert any(p.endswith(CONFIG_FILE) for p in opened)  # the spy does see the files that are read


@pytest.mark.parametrize("changes, words", [
    ({"layers_to_transform": [7]}, "matches no module"),
    ({"target_modules": ["c_attn"]}, "target module 'c_attn' is not one of the supported projections"),
    ({"target_modules": r".*\.mlp"}, "matches model.layers.0.mlp, which is not one of the supported projections"),
])
def test_adapter_matching_nothing_or_other_modules(good, changes, words):
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_adapter(edit_config(good, **changes), tiny_arch())


@pytest.mark.parametrize("changes, words", [
    ({"target_modules": "(.*)*x"}, "target_modules nests a repetition"),
    ({"target_modules": ".*" * 6 + "x"}, "target_modules has 6 repetitions"),
    ({"exclude_modules": "(a|a)*b"}, "exclude_modules nests"),
    ({"rank_pattern": {"(.|.)*q_proj": 2}}, "rank_pattern['(.|.)*q_proj'] nests"),
    ({"alpha_pattern": {".*.*.*.*x": 2}}, "alpha_pattern['.*.*.*.*x'] has 4 repetitions"),
])
def test_regexes_that_could_hang_the_server_are_refused(good, changes, words):
    # Python's re would backtrack for hours on `(.*)*x` against a module name: refuse such patterns upfront.
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_adapter(edit_config(good, **changes), tiny_arch())


def test_rank_limits(tmp_path, good):
    root, _ = save_adapter(tmp_path / "big", lora(r=16))
    with pytest.raises(AdapterError, match=re.escape("key 'r' must be an integer from 1 to 8 (the server's max_rank), got 16")):
        parse_adapter(root, tiny_arch(), max_rank=8)
    assert parse_adapter(root, tiny_arch()).max_rank == 16  # default max_rank 128
    with pytest.raises(AdapterError, match=re.escape("rank_pattern['q_proj'] must be an integer from 1 to 128")):
        parse_adapter(edit_config(good, rank_pattern={"q_proj": 0}), tiny_arch())


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ('["r", 4]', "JSON object"),
    ('{"peft_type": "LORA", "target_modules": ["q_proj"]}', "required key 'r' is missing"),
    ('{"peft_type": "LORA", "r": "4", "target_modules": ["q_proj"]}', "key 'r' must be an integer from 1 to 128"),
    ('{"peft_type": "LORA", "r": true, "target_modules": ["q_proj"]}', "key 'r' must be an integer from 1 to 128"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": "x", "target_modules": ["q_proj"]}', "key 'lora_alpha'"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": 5}', "key 'target_modules'"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": "(q_proj"}', "target_modules is not a valid regular"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": "8"}}', "rank_pattern['q_proj']"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": "0"}', "key 'layers_to_transform'"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_rslora": "yes"}', "key 'use_rslora'"),
])
def test_malformed_config_names_the_key(good, text, words):
    (good / CONFIG_FILE).write_text(text)
    with pytest.raises(AdapterError, match=re.escape(words)):
        parse_adapter(good, tiny_arch())


def test_missing_or_corrupt_files(good):
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        parse_adapter({CONFIG_FILE: files[CONFIG_FILE]}, tiny_arch())
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        parse_adapter({**files, WEIGHTS_FILE: b"\x10\x00\x00\x00\x00\x00\x00\x00{broken"}, tiny_arch())
    with pytest.raises(AdapterError, match="does not exist"):
        parse_adapter(good / "nope", tiny_arch())


# --- version ids ------------------------------------------------------------------------------------------


def test_version_id_is_content_derived(good, tmp_path):
    vid = adapter_version_id(parse_adapter(good, tiny_arch()), BASE_ID)
    assert re.fullmatch(r"v-[0-9a-f]{24}", vid)

    # Same content, other layout: reversed/renamed tensors with metadata, re-ordered and re-indented config.
    other = tmp_path / "other"
    other.mkdir()
    tensors = load_file(good / WEIGHTS_FILE)
    save_file({k.replace(".weight", ".default.weight"): tensors[k] for k in sorted(tensors, reverse=True)},
              other / WEIGHTS_FILE, metadata={"format": "pt", "trainer": "someone else"})
    cfg = json.loads((good / CONFIG_FILE).read_text())
    (other / CONFIG_FILE).write_text(json.dumps(dict(reversed(list(cfg.items()))), indent=7) + "\n\n")
    assert (other / WEIGHTS_FILE).read_bytes() != (good / WEIGHTS_FILE).read_bytes()
    assert adapter_version_id(parse_adapter(other, tiny_arch()), BASE_ID) == vid

    assert adapter_version_id(parse_adapter(good, tiny_arch()), "another-base") != vid

    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = torch.nextafter(tensors[name][0, 0], torch.tensor(math.inf))  # one ulp
    save_file(tensors, other / WEIGHTS_FILE)
    assert adapter_version_id(parse_adapter(other, tiny_arch()), BASE_ID) != vid


def test_version_id_changes_with_scale(good):
    vid = adapter_version_id(parse_adapter(good, tiny_arch()), BASE_ID)
    assert adapter_version_id(parse_adapter(edit_config(good, lora_alpha=16), tiny_arch()), BASE_ID) != vid
