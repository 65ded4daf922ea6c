"""A tiny peft LoRA adapter on disk, and ways to spoil it: shared by the tests of adapters.peft_format."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from service.runtime.arch import ModelArch

LAYERS = 3


def tiny_arch(hidden: int = 64, layers: int = LAYERS) -> ModelArch:
    return ModelArch(
        arch="llama", vocab_size=128, hidden_size=hidden, intermediate_size=128, num_layers=layers,
        num_heads=4, num_kv_heads=2, head_dim=hidden // 4, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=False,
    )


def save_adapter(root: Path, config: peft.PeftConfig, hidden: int = 64, seed: int = 0):
    """peft.get_peft_model on a tiny random Llama, save_pretrained(root); return (root, PeftModel)."""
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), config)
    pm.save_pretrained(root)
    return root, pm


def lora(**kw) -> peft.LoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return peft.LoraConfig(init_lora_weights=False, **kw)  # random A and B, so weights are distinguishable


def edit_config(root: Path, **changes) -> Path:
    cfg = json.loads((root / CONFIG_FILE).read_text())
    cfg.update(changes)
    (root / CONFIG_FILE).write_text(json.dumps(cfg))
    return root


def edit_tensors(root: Path, fn) -> Path:
    tensors = load_file(root / WEIGHTS_FILE)
    save_file(fn(dict(tensors)), root / WEIGHTS_FILE)
    return root
