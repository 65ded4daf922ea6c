"""Synthetic models: random weights of a named architecture, built on the device and quantized as the GGUF
loader lays them out, so the engine can be timed on a machine that has nothing but this code (`--model
synthetic:NAME`). Projections are int4 with 32-element groups and a zero per group (as Q4_1 loads); the
embedding table int8 in groups of 32 (as Q8_0); norms are ones. The tokenizer is a word-level vocabulary
`t0 .. tN` of the architecture's size: prompts are token ids or words `tK`.
"""

from __future__ import annotations

import hashlib

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from kernels.quant import QuantizedTensor
from service.runtime.arch import ModelArch
from service.runtime.loader import LoadedModel
from service.runtime.tokenizer import Tokenizer

PREFIX = "synthetic:"
GROUP = 32

SHAPES: dict[str, ModelArch] = {
    "smollm2-135m": ModelArch(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                              num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                              rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                              bos_token_id=1, eos_token_ids=(2,)),
    "llama-3-8b": ModelArch(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                            rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_ids=(2,)),
}


def is_synthetic(model: str | None) -> bool:
    return model is not None and model.startswith(PREFIX)


def shape_of(model: str) -> ModelArch:
    name = model[len(PREFIX):]
    if name not in SHAPES:
        raise ValueError(f"model {model!r} is unknown: synthetic models are {', '.join(PREFIX + n for n in SHAPES)}")
    return SHAPES[name]


def _int4(n: int, k: int, device: torch.device, g: torch.Generator) -> QuantizedTensor:
    """[n, k] uniform in about +-2/sqrt(k) (so activations keep their scale through the layers)."""
    span = 4.0 / k**0.5
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=g)
    scales = torch.full((n, k // GROUP), span / 15, dtype=torch.float32, device=device)
    zeros = torch.full((n, k // GROUP), -span / 2, dtype=torch.float32, device=device)
    return QuantizedTensor("int4", (n, k), GROUP, codes, scales, zeros)


def _int8(n: int, k: int, device: torch.device, g: torch.Generator) -> QuantizedTensor:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=g)
    return QuantizedTensor("int8", (n, k), GROUP, q, torch.full((n, k // GROUP), 1 / 127, device=device))


def load_synthetic(model: str, device: torch.device | str = "cpu", seed: int = 0) -> LoadedModel:
    arch = shape_of(model)
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = arch.linear_shapes()
    tensors: dict = {"model.embed_tokens.weight": _int8(arch.vocab_size, arch.hidden_size, device, g),
                     "model.norm.weight": torch.ones(arch.hidden_size, device=device)}
    if not arch.tie_word_embeddings:
        tensors["lm_head.weight"] = _int4(arch.vocab_size, arch.hidden_size, device, g)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(arch.hidden_size, device=device)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(arch.hidden_size, device=device)
        for proj, (n, k) in shapes.items():
            part = "self_attn." if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp."
            tensors[p + part + proj + ".weight"] = _int4(n, k, device, g)
    model_id = hashlib.sha256(f"{model}:{seed}".encode()).hexdigest()
    return LoadedModel(arch=arch, tensors=tensors, model_id=model_id, source=model, quantization="synthetic:int4")


def synthetic_tokenizer(model: str) -> Tokenizer:
    """Words `t0 .. t{vocab-1}`; `t0` is <unk>, the arch's BOS and EOS ids are `<s>` and `</s>`."""
    arch = shape_of(model)
    vocab = {f"t{i}": i for i in range(arch.vocab_size)}
    bos, eos = arch.bos_token_id, arch.eos_token_ids[0]
    vocab = {k: v for k, v in vocab.items() if v not in (0, bos, eos)}
    vocab.update({"<unk>": 0, "<s>": bos, "</s>": eos})
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", vocab_size=arch.vocab_size)
