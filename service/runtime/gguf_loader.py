"""Read a llama.cpp GGUF file into HF-named weights, keeping Q4_0/Q4_1/Q8_0 quantized.

The file is memory-mapped by `gguf.GGUFReader`; each tensor is decoded once with vectorized torch ops
into our canonical layouts (kernels.quant). llama.cpp's converter permutes the rows of the Q and K
projections of llama-layout models for its interleaved rope; we undo that (a row gather, so quantized
groups stay intact) so the model uses the HF rotate-half rope. Qwen2 files are not permuted.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import Tensor

from kernels.quant import QuantizedTensor
from service.runtime.arch import SUPPORTED_ARCHITECTURES, ModelArch
from service.runtime.weight_utils import Weight, check_quantize, convert_plain, sample_digest

T = GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1)
GGML_BLOCK = 32  # elements per Q8_0 / Q4_0 / Q4_1 block
_PERMUTED_ARCHS = ("llama", "mistral")  # archs whose q/k rows llama.cpp permutes

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for names we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A memory-mapped reader for `path`, or ValueError if it is not a GGUF file."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file starts with b'GGUF'): "
            "expected a .gguf file or an HF directory with config.json + *.safetensors"
        )
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _meta(reader: GGUFReader, key: str, default: object = None, required: bool = False) -> object:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _f32(v: object) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06),
    which is the value the HF config the file was converted from held."""
    return float(str(np.float32(v)))


def read_arch(reader: GGUFReader) -> ModelArch:
    """The model's shape from the GGUF metadata (keys are prefixed by `general.architecture`)."""
    arch = _meta(reader, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            "GGUF tensor 'rope_freqs.weight' (per-dimension rope factors, Llama 3.1 style) is not supported; "
            "supported rope scaling comes from the '<arch>.rope.scaling.*' metadata (linear)"
        )

    def key(k: str, default: object = None, required: bool = False) -> object:
        return _meta(reader, f"{arch}.{k}", default, required)

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dims = key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count={rope_dims}, head_dim={head_dim}) are not supported")
    vocab = key("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ValueError(f"GGUF has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens' to give the vocab size")
    scaling = None
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": _f32(key("rope.scaling.factor", 1.0))}
        orig = key("rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
    eos: list[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):  # any of them ends a turn
        v = _meta(reader, f"tokenizer.ggml.{k}")
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    bos = _meta(reader, "tokenizer.ggml.bos_token_id")
    return ModelArch(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=int(key("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", required=True)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", required=True)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        rope_scaling=scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
    )


def expected_names(arch: ModelArch) -> list[str]:
    """GGUF names of every tensor the model needs."""
    names = ["token_embd.weight", "output_norm.weight"] + ([] if arch.tie_word_embeddings else ["output.weight"])
    per_layer = [f"{k}.weight" for k in _LAYER_NAMES]
    if arch.attention_bias:
        per_layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    return names + [f"blk.{i}.{n}" for i in range(arch.num_layers) for n in per_layer]


def _as_torch(a: np.ndarray) -> Tensor:
    # A view of the read-only memory map: every decoder below makes new tensors from it, never writes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _f16(b: Tensor) -> Tensor:
    """Little-endian fp16 from bytes `[..., 2]` -> float32 `[...]`."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _ggml_nibbles(qs: Tensor) -> Tensor:
    """ggml int4 blocks `[N, G, 16]` -> canonical nibbles `[N, G * 16]`.

    ggml keeps element j of a block in the low nibble of byte j and element j + 16 in its high nibble;
    ours keeps even k in the low nibble and odd k in the high nibble of byte k // 2.
    """
    codes = torch.cat((qs & 15, qs >> 4), dim=-1)  # [N, G, 32] in element order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(qs.shape[0], -1)


def decode_tensor(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> Tensor | QuantizedTensor:
    """One GGUF tensor -> float tensor (F32/F16/BF16) or QuantizedTensor (Q8_0/Q4_0/Q4_1).

    `shape` is the torch shape (GGUF dims reversed); quantized tensors must be 2-D `[N, K]`.
    """
    data = _as_torch(raw)
    if ggml_type in (T.F32, T.F16):
        return data.reshape(shape)
    if ggml_type == T.BF16:
        return data.contiguous().view(torch.bfloat16).reshape(shape)
    n, k = shape
    groups = k // GGML_BLOCK
    if ggml_type == T.Q8_0:  # block: fp16 d, 32 x int8 q; value = d * q
        blocks = data.reshape(n, groups, 34)
        qweight = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedTensor("int8", (n, k), GGML_BLOCK, qweight, _f16(blocks[..., :2]))
    if ggml_type == T.Q4_0:  # block: fp16 d, 16 bytes of nibbles; value = d * (q - 8)
        blocks = data.reshape(n, groups, 18)
        d = _f16(blocks[..., :2])
        return QuantizedTensor("int4", (n, k), GGML_BLOCK, _ggml_nibbles(blocks[..., 2:]), d, -8 * d)
    if ggml_type == T.Q4_1:  # block: fp16 d, fp16 m, 16 bytes of nibbles; value = d * q + m
        blocks = data.reshape(n, groups, 20)
        d, m = _f16(blocks[..., :2]), _f16(blocks[..., 2:4])
        return QuantizedTensor("int4", (n, k), GGML_BLOCK, _ggml_nibbles(blocks[..., 4:]), d, m)
    raise AssertionError(f"decode_tensor called with unsupported type {ggml_type.name}")


def unpermute_index(rows: int, n_head: int) -> Tensor:
    """Row order undoing llama.cpp's q/k permute: hf_weight = gguf_weight[index].

    llama.cpp views each head's rows as [2, head_dim/2] (rotate-half pairs) and stores them transposed as
    [head_dim/2, 2] (interleaved pairs): gguf row h*hd + 2j + s holds HF row h*hd + s*hd/2 + j.
    """
    hd = rows // n_head
    return torch.arange(rows).reshape(n_head, hd // 2, 2).transpose(1, 2).reshape(-1)


def _gather_rows(w: Tensor | QuantizedTensor, index: Tensor) -> Tensor | QuantizedTensor:
    return w.rows(index) if isinstance(w, QuantizedTensor) else w[index]


def _torch_shape(t: object) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _expected_shape(name: str, arch: ModelArch) -> tuple[int, ...] | None:
    if name in ("token_embd.weight", "output.weight"):
        return (arch.vocab_size, arch.hidden_size)
    if name == "output_norm.weight":
        return (arch.hidden_size,)
    kind, suffix = name.split(".")[2:]
    if kind in ("attn_norm", "ffn_norm"):
        return (arch.hidden_size,)
    out_in = arch.linear_shapes()[_LAYER_NAMES[kind].split(".")[1]]
    return out_in if suffix == "weight" else out_in[:1]


def load_gguf(source: str | os.PathLike[str] | GGUFReader, quantize: str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[ModelArch, dict[str, Weight], str, str]:
    """(arch, HF-named tensors, quantization label, model id) of a GGUF file (or an open reader).

    Q8_0 -> int8 group 32, Q4_0/Q4_1 -> int4 group 32 QuantizedTensors; F32/F16/BF16 matrices are held in
    `dtype` (or quantized with `quantize`), norms and biases in float32.
    """
    check_quantize(quantize)
    reader = source if isinstance(source, GGUFReader) else open_gguf(source)
    arch = read_arch(reader)
    by_name = {t.name: t for t in reader.tensors}
    wanted = expected_names(arch)
    for name in wanted:  # check everything before decoding anything
        t = by_name.get(name)
        if t is None:
            raise ValueError(f"GGUF tensor {name!r} ({hf_name(name)}) is missing")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {name!r} has type {t.tensor_type.name}, which is not supported: "
                f"supported types are {', '.join(s.name for s in SUPPORTED_TYPES)}"
            )
        shape, want = _torch_shape(t), _expected_shape(name, arch)
        if shape != want:
            raise ValueError(f"GGUF tensor {name!r} has shape {list(shape)}, the metadata implies {list(want)}")
        if t.tensor_type not in (T.F32, T.F16, T.BF16) and shape[-1] % GGML_BLOCK:
            raise ValueError(f"GGUF tensor {name!r}: K={shape[-1]} is not a multiple of the block size {GGML_BLOCK}")
    tensors: dict[str, Weight] = {}
    for name in wanted:
        t = by_name[name]
        w = decode_tensor(t.data, t.tensor_type, _torch_shape(t))
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if arch.arch in _PERMUTED_ARCHS and kind in ("attn_q", "attn_k"):
            n_head = arch.num_heads if kind == "attn_q" else arch.num_kv_heads
            w = _gather_rows(w, unpermute_index(w.shape[0], n_head))
        key = hf_name(name)
        tensors[key] = w if isinstance(w, QuantizedTensor) else convert_plain(key, w, quantize, dtype)
    return arch, tensors, _quantization_label(reader, wanted, by_name, quantize), gguf_model_id(reader)


def _quantization_label(reader: GGUFReader, wanted: list[str], by_name: dict, quantize: str | None) -> str:
    # The most common type among the matrices, e.g. "gguf:Q4_1" (its embedding may be Q8_0).
    counts = Counter(by_name[n].tensor_type.name for n in wanted if len(by_name[n].shape) == 2)
    label = f"gguf:{counts.most_common(1)[0][0]}"
    float_matrices = any(by_name[n].tensor_type in (T.F32, T.F16, T.BF16) for n in wanted if len(by_name[n].shape) == 2)
    return f"{label}+{quantize}" if quantize and float_matrices else label


def gguf_model_id(reader: GGUFReader) -> str:
    """sha256 of the header (metadata + tensor names, types, shapes, offsets) and sampled tensor bytes."""
    h = hashlib.sha256(b"gguf\0")
    data = memoryview(reader.data)
    h.update(data[: reader.data_offset])
    sample_digest(h, data, reader.data_offset, len(data))
    return h.hexdigest()
