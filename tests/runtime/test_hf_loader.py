"""HF directory loading: tiny random transformers checkpoints (single file, sharded, quantized on load)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kernels.quant import QuantizedTensor
from service.runtime.loader import load_model


def make_model(root: Path, kind: str = "llama", tied: bool = False, seed: int = 0, shard: str | None = None):
    """Save a random 2-layer model (hidden 64, 4 heads / 2 kv heads, vocab 96); return (dir, state dict)."""
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[kind]
    cfg = cfg_cls(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=[2, 3])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialized biases and unit norms would hide mistakes
            p.normal_(0, 0.2)
    path = root / f"{kind}-{seed}-{'tied' if tied else 'untied'}-{shard or 'single'}"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    return path, state


@pytest.mark.parametrize(("kind", "tied"), [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)])
def test_loads_exact_tensors(tmp_path: Path, kind: str, tied: bool) -> None:
    path, state = make_model(tmp_path, kind, tied)
    m = load_model(path)
    a = m.arch
    assert (a.arch, a.num_layers, a.hidden_size, a.intermediate_size, a.num_heads, a.num_kv_heads, a.head_dim) == (
        kind, 2, 64, 128, 4, 2, 16)
    assert (a.vocab_size, a.rope_theta, a.rms_norm_eps, a.max_position_embeddings) == (96, 5000.0, 1e-5, 256)
    assert (a.tie_word_embeddings, a.attention_bias) == (tied, kind == "qwen2")
    assert (a.bos_token_id, a.eos_token_ids) == (1, (2, 3))
    assert m.quantization == "float32" and m.source == str(path)
    assert set(m.tensors) == set(state)
    for name, want in state.items():
        got = m.tensors[name]
        assert got.dtype == torch.float32 and torch.equal(got, want), name


def test_sharded_checkpoint(tmp_path: Path) -> None:
    path, state = make_model(tmp_path, "qwen2", shard="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    m = load_model(path)
    assert set(m.tensors) == set(state)
    assert all(torch.equal(m.tensors[k], v) for k, v in state.items())


def test_dtype_keeps_norms_float32(tmp_path: Path) -> None:
    path, state = make_model(tmp_path, "qwen2")
    m = load_model(path, dtype=torch.bfloat16)
    assert m.quantization == "bfloat16"
    assert m.tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert m.tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert m.tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_on_load(tmp_path: Path, quantize: str) -> None:
    path, state = make_model(tmp_path, "llama")
    m = load_model(path, quantize=quantize)
    assert m.quantization == quantize
    full = load_model(path)
    assert m.resident_bytes() < full.resident_bytes() / 3
    for name, want in state.items():
        got = m.tensors[name]
        if want.dim() == 1:
            assert torch.equal(got, want), name
            continue
        assert isinstance(got, QuantizedTensor), name
        if quantize == "int8" or name == "model.embed_tokens.weight":
            # per-channel int8: at most half a step (row max / 127 / 2) from the original.
            assert (got.kind, got.group_size) == ("int8", want.shape[1]), name
            bound = want.abs().amax(dim=1, keepdim=True) / 127 / 2
        else:
            # int4 group 32: at most half a step ((max - min) / 15 / 2) of the element's group.
            assert (got.kind, got.group_size) == ("int4", 32), name
            g = want.reshape(want.shape[0], -1, 32)
            bound = ((g.amax(-1) - g.amin(-1)) / 30).repeat_interleave(32, dim=1)
        assert ((got.dequantize() - want).abs() <= bound + 1e-6).all(), name


def test_model_id_is_content_derived(tmp_path: Path) -> None:
    a, _ = make_model(tmp_path / "a", "llama", seed=0)
    b, _ = make_model(tmp_path / "b", "llama", seed=0)
    c, _ = make_model(tmp_path / "c", "llama", seed=1)
    ids = [load_model(p).model_id for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]
    assert len(ids[0]) == 64


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no config.json: expected an HF directory with config.json \+ \*.safetensors"):
        load_model(tmp_path)


def test_bin_only_checkpoint_is_refused(tmp_path: Path) -> None:
    path, _ = make_model(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    # A pickle that would run code if it were ever unpickled: the loader must refuse it unopened.
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(ValueError, match=r"only PyTorch pickle checkpoints \(\*.bin/\*.pt\), which are never loaded: "
                                         r"convert them to safetensors"):
        load_model(path)
    assert not Path("pwned").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    path, _ = make_model(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\] are not supported: supported are "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_model(path)


def test_missing_tensor_and_bad_shape(tmp_path: Path) -> None:
    path, _ = make_model(tmp_path, "llama")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.down_proj.weight'\]"):
        load_model(path)
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' .* has shape \[64, 64\], "
                                         r"config.json implies \[64, 128\]"):
        load_model(path)


def test_bad_quantize_and_no_weights(tmp_path: Path) -> None:
    path, _ = make_model(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"quantize='fp8' is not supported: use one of int8, int4 or None"):
        load_model(path, quantize="fp8")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has no \*.safetensors weights"):
        load_model(path)


def test_rope_config_old_and_new_keys(tmp_path: Path) -> None:
    path, _ = make_model(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 128}
    cfg["rope_parameters"] = {"rope_theta": 500000.0, **llama3}  # transformers 5 style
    (path / "config.json").write_text(json.dumps(cfg))
    a = load_model(path).arch
    assert (a.rope_theta, a.rope_scaling) == (500000.0, llama3)
    del cfg["rope_parameters"]
    cfg.update(rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0})  # transformers 4 style
    (path / "config.json").write_text(json.dumps(cfg))
    a = load_model(path).arch
    assert (a.rope_theta, a.rope_scaling) == (250000.0, {"type": "linear", "factor": 2.0})
