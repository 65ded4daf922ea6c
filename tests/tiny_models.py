"""Tiny random Llama-family checkpoints written by transformers itself, for reference comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128

KINDS = {
    # name: (config class name, extra config)
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-bias": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
}


def make_tiny_model(root: Path, kind: str = "llama-gqa", seed: int = 0, layers: int = 2):
    """Write a random model of `kind` to root/kind and return (path, the transformers model in fp32)."""
    import transformers

    cls_name, extra = KINDS[kind]
    cfg_cls = getattr(transformers, cls_name)
    cfg = cfg_cls(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
        initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if cls_name == "Qwen2Config":  # biases default to zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    path = root / kind
    model.save_pretrained(path, safe_serialization=True)
    write_tiny_tokenizer(path)
    return path, model


def write_tiny_tokenizer(path: Path) -> None:
    """A word-level vocabulary `t0 .. t127` (ids 0-2 are <unk>, <s>, </s>) so a tiny model dir is complete."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def template_tokenizer(template: str):
    """A one-word vocabulary with the given chat template: for tests of how a template renders, not of tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from service.runtime.tokenizer import Tokenizer
    return Tokenizer(HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")), chat_template=template)
