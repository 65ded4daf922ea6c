"""Read an HF checkpoint directory (config.json + safetensors, single or sharded) into HF-named weights.

Only safetensors are read (`safetensors.safe_open`, memory-mapped); `.bin` checkpoints are pickles and
are refused without being opened. Matrices are held in `dtype` or quantized on load (int8 per
channel, or int4 group 32 with int8 embeddings); norms and biases in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from service.runtime.arch import ModelArch
from service.runtime.weight_utils import (
    EMBED_NAME,
    LM_HEAD_NAME,
    Weight,
    check_quantize,
    convert_plain,
    sample_digest,
)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPECTED = "an HF directory with config.json + *.safetensors (or a .gguf file)"


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"directory {directory} has no config.json: expected {EXPECTED}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the old keys or transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta") or params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return theta, scaling


def arch_from_config(cfg: dict) -> ModelArch:
    names = cfg.get("architectures") or []
    known = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if not known:
        raise ValueError(
            f"config.json architectures {names} are not supported: supported are {', '.join(ARCHITECTURES)}"
        )
    arch = known[0]
    if cfg.get("mlp_bias"):
        raise ValueError("config.json sets mlp_bias=true: MLP biases are not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    try:
        return ModelArch(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always carries q/k/v biases; Llama/Mistral only with attention_bias=true.
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks the required key {e.args[0]!r}") from e


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's shards: from the index if sharded, else model.safetensors (or the only *.safetensors)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for f in files:  # shard names come from a file: keep them inside the directory
            if Path(f).name != f or not (directory / f).is_file():
                raise ValueError(f"{index} names a shard {f!r} that is not a file in {directory}")
        return [directory / f for f in files]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise ValueError(
            f"{directory} holds only PyTorch pickle checkpoints (*.bin/*.pt), which are never loaded: "
            "convert them to safetensors (model.safetensors or a sharded model.safetensors.index.json)"
        )
    raise ValueError(f"{directory} has no *.safetensors weights: expected {EXPECTED}")


def expected_names(arch: ModelArch) -> list[str]:
    names = [EMBED_NAME, "model.norm.weight"] + ([] if arch.tie_word_embeddings else [LM_HEAD_NAME])
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if arch.attention_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
    return names


def _expected_shape(name: str, arch: ModelArch) -> tuple[int, ...]:
    if name in (EMBED_NAME, LM_HEAD_NAME):
        return (arch.vocab_size, arch.hidden_size)
    if name.endswith("norm.weight"):
        return (arch.hidden_size,)
    out_in = arch.linear_shapes()[name.split(".")[-2]]
    return out_in if name.endswith(".weight") else out_in[:1]


def load_hf(directory: str | os.PathLike[str], quantize: str | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[ModelArch, dict[str, Weight], str, str]:
    """(arch, HF-named tensors, quantization label, model id) of an HF checkpoint directory."""
    check_quantize(quantize)
    directory = Path(directory)
    cfg = read_config(directory)
    arch = arch_from_config(cfg)
    files = safetensors_files(directory)
    wanted = expected_names(arch)
    wanted_set = set(wanted)
    tensors: dict[str, Weight] = {}
    extra: list[str] = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key not in wanted_set:
                    extra.append(key)
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != _expected_shape(key, arch):
                    raise ValueError(
                        f"tensor {key!r} in {path.name} has shape {list(t.shape)}, "
                        f"config.json implies {list(_expected_shape(key, arch))}"
                    )
                tensors[key] = convert_plain(key, t, quantize, dtype)
    missing = [n for n in wanted if n not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint in {directory} is missing tensors {missing[:3]}{more}")
    if any(k.endswith("o_proj.bias") for k in extra):
        raise ValueError("the checkpoint has o_proj biases, which are not supported")
    label = quantize or str(dtype).removeprefix("torch.")
    return arch, tensors, label, hf_model_id(directory, files)


def hf_model_id(directory: Path, files: list[Path]) -> str:
    """sha256 of config.json, each shard's safetensors header and sampled weight bytes."""
    h = hashlib.sha256(b"hf\0")
    h.update((directory / "config.json").read_bytes())
    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(header_len))
            # Sample the data section through reads at offsets (no mapping of the whole file).
            start = 8 + header_len
            h.update(path.name.encode())
            sample_digest(h, _FileSpan(f), start, size)
    return h.hexdigest()


class _FileSpan:
    """Slice access `span[a:b]` to bytes of an open file, for `sample_digest`."""

    def __init__(self, f: object) -> None:
        self._f = f

    def __getitem__(self, s: slice) -> bytes:
        self._f.seek(s.start)
        return self._f.read(s.stop - s.start)
