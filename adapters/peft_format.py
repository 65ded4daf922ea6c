"""Read and validate a PEFT LoRA adapter against the base model: `adapter_config.json` +
`adapter_model.safetensors`, from a directory or from uploaded files held in memory.

Weights come from safetensors only: a pickle-based file (`.bin`, `.pt`, ...) anywhere in the adapter is
refused by its name, before anything is opened. Tensor names are peft's saved format,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]); the `.lora_A.default.weight` variant some tools write is accepted too.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from adapters.errors import AdapterError, quote
from adapters.peft_config import (
    DEFAULT_MAX_RANK,
    PROJECTIONS,
    BaseShapes,
    LoraAdapterConfig,
    ModuleLora,
    module_name,
    parse_lora_config,
)

__all__ = [
    "AdapterError", "AdapterSource", "LoraAdapterConfig", "LoraWeights", "ModuleLora", "ParsedAdapter",
    "parse_adapter", "parse_lora_config", "read_adapter_files", "CONFIG_FILE", "WEIGHTS_FILE",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Formats that unpickle on load (torch.load, joblib, ...): refused without being opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# safetensors dtype -> bytes per element, of those we load: each converts to fp32 exactly (F64 would not).
SUPPORTED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER_BYTES = 1 << 20  # ~5000 tensor entries; an all-linear adapter of a 128-layer model has 1792
_MAX_TENSOR_NAME = 256  # peft's names are < 80 characters; messages quote names whole
_MAX_NDIM = 8
_MAX_DIM = 2**31 - 1
_DTYPE_RE = re.compile(r"[A-Z0-9_]{1,16}")
# Projections whose input is the hidden state (lora_A is [r, hidden]) and those whose output is (lora_B is
# [hidden, r]): where a model with another hidden size shows first.
_HIDDEN_IN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_HIDDEN_OUT = ("o_proj", "down_proj")
_TENSOR_RE = re.compile(
    r"base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<proj>\w+)"
    r"\.lora_(?P<part>[AB])(?:\.default)?\.(?P<param>weight|bias)"
)

AdapterSource = Union[str, "os.PathLike[str]", Mapping[str, bytes]]


class LoraWeights(NamedTuple):
    """One projection's LoRA: delta(x) = scale * (x @ A.T) @ B.T."""

    A: torch.Tensor  # [r, in] float32
    B: torch.Tensor  # [out, r] float32
    scale: float


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single-bool equality
class ParsedAdapter:
    """A validated adapter: its resolved config and fp32 weights per (layer, projection)."""

    config: LoraAdapterConfig
    weights: Mapping[tuple[int, str], LoraWeights]

    @property
    def target_modules(self) -> frozenset[str]:
        return self.config.target_modules

    @property
    def max_rank(self) -> int:
        return self.config.max_rank

    @property
    def nbytes(self) -> int:
        return sum(w.A.nbytes + w.B.nbytes for w in self.weights.values())


def parse_adapter(source: AdapterSource, arch: BaseShapes, *, max_rank: int = DEFAULT_MAX_RANK) -> ParsedAdapter:
    """Parse an adapter directory, or a mapping file name -> bytes, and validate it against `arch`.

    Raises AdapterError (a ValueError) naming the feature, key, file or tensor that is refused.
    """
    config_bytes, weights_bytes = read_adapter_files(source)
    config = parse_lora_config(config_bytes, arch, max_rank=max_rank)
    _check_safetensors_header(weights_bytes)
    tensors = _load_safetensors(weights_bytes)
    pairs = _pair_tensors(tensors, arch)
    _check_coverage(pairs, config)
    weights: dict[tuple[int, str], LoraWeights] = {}
    for (layer, proj), spec in sorted(config.modules.items()):
        (a_name, a), (b_name, b) = pairs[(layer, proj)]["A"], pairs[(layer, proj)]["B"]
        out_features, in_features = arch.linear_shapes()[proj]
        _check_tensor(a_name, a, (spec.rank, in_features))
        _check_tensor(b_name, b, (out_features, spec.rank))
        # Copies (contiguous, owned): nothing keeps the file buffer alive.
        weights[(layer, proj)] = LoraWeights(
            A=a.to(torch.float32).contiguous(), B=b.to(torch.float32).contiguous(), scale=spec.scale
        )
    return ParsedAdapter(config=config, weights=MappingProxyType(weights))


def read_adapter_files(source: AdapterSource) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes); pickle-based files refused unopened."""
    if isinstance(source, Mapping):
        _refuse_pickles(list(source))
        files = {name: source.get(name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    else:
        root = Path(source)
        if not root.is_dir():
            raise AdapterError(f"adapter directory {root} does not exist")
        # Names only (rglob stats, never opens): a pickle file anywhere, even a nested one, is refused.
        _refuse_pickles([p.relative_to(root).as_posix() for p in root.rglob("*")])
        files = {name: (root / name).read_bytes() if (root / name).is_file() else None
                 for name in (CONFIG_FILE, WEIGHTS_FILE)}
    for name, data in files.items():
        if data is None:
            raise AdapterError(f"the adapter has no {name}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AdapterError(f"{name} must be given as bytes")
    return bytes(files[CONFIG_FILE]), bytes(files[WEIGHTS_FILE])  # type: ignore[arg-type]


def _refuse_pickles(names: list[str]) -> None:
    for name in sorted(names):
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterError(
                f"{name}: pickle-based weight files ({', '.join(PICKLE_SUFFIXES)}) are refused and never "
                f"opened; ship the adapter as {WEIGHTS_FILE} only"
            )


def _check_safetensors_header(data: bytes) -> None:
    """Refuse by name, before safetensors or torch sees the file, what they would fail on (an F8_E8M0 tensor
    raises KeyError deep in safetensors.torch) or load into something we do not serve (I64, F64, ...).

    Layout: an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}},
    then the tensors' bytes, each at [begin, end) of what follows the header, contiguous and covering it all.
    """
    bad = f"{WEIGHTS_FILE} is not a valid safetensors file"
    if len(data) < 8:
        raise AdapterError(f"{bad}: {len(data)} bytes, fewer than the 8 of its header length")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER_BYTES:
        raise AdapterError(f"{bad}: a header of {n} bytes; at most {_MAX_HEADER_BYTES} are allowed")
    if n > len(data) - 8:
        raise AdapterError(f"{bad}: a header of {n} bytes, but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # incl. UnicodeDecodeError
        raise AdapterError(f"{bad}: its header is not valid JSON: {quote(str(e), 200)}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{bad}: its header must be a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{bad}: __metadata__ must map strings to strings")
    size = len(data) - 8 - n
    spans = sorted(_tensor_span(name, entry, size) for name, entry in header.items() if name != "__metadata__")
    end_of_previous = 0
    for begin, end, name in spans:
        if begin != end_of_previous:
            raise AdapterError(f"tensor {name}: data_offsets [{begin}, {end}] overlap another tensor's or leave a "
                               f"gap (the tensor before it ends at {end_of_previous})")
        end_of_previous = end
    if end_of_previous != size:
        raise AdapterError(f"{bad}: its tensors hold {end_of_previous} of the {size} bytes after the header")


def _tensor_span(name: str, entry: object, size: int) -> tuple[int, int, str]:
    """[begin, end) of one tensor's bytes, after checking its header entry against the data that follows."""
    if len(name) > _MAX_TENSOR_NAME:
        raise AdapterError(f"{WEIGHTS_FILE} has a tensor name of {len(name)} characters, {quote(name)}; at most "
                           f"{_MAX_TENSOR_NAME} are allowed")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterError(f"tensor {name}: its header entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        shown = dtype if isinstance(dtype, str) and _DTYPE_RE.fullmatch(dtype) else quote(dtype)
        raise AdapterError(f"tensor {name} has dtype {shown}; supported: {', '.join(SUPPORTED_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_int(d, 0, _MAX_DIM) for d in shape)):
        raise AdapterError(f"tensor {name}: shape {quote(shape)} must be a list of at most {_MAX_NDIM} integers "
                           f"from 0 to {_MAX_DIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o, 0, size) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise AdapterError(f"tensor {name}: data_offsets {quote(offsets)} must be [begin, end] with 0 <= begin <= "
                           f"end <= {size}, the number of bytes after the header")
    begin, end = offsets
    needed = math.prod(shape) * SUPPORTED_DTYPES[dtype]
    if end - begin != needed:
        raise AdapterError(f"tensor {name}: shape {shape} ({dtype}) needs {needed} bytes, but its data_offsets "
                           f"[{begin}, {end}] hold {end - begin}")
    return begin, end, name


def _is_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)  # safetensors only: never torch.load or pickle
    except (SafetensorError, ValueError, TypeError, OverflowError) as e:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {quote(str(e), 200)}") from None


def _pair_tensors(
    tensors: Mapping[str, torch.Tensor], arch: BaseShapes
) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """Group peft tensor names into {(layer, proj): {"A": (name, tensor), "B": (name, tensor)}}."""
    pairs: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if "lora_magnitude_vector" in name:
            raise AdapterError(f"tensor {name}: DoRA (lora_magnitude_vector) is not supported")
        if "lora_embedding_" in name or re.search(r"(^|\.)(embed_tokens|lm_head)\.", name):
            raise AdapterError(f"tensor {name}: LoRA on embed_tokens / lm_head (or a trained copy of them) "
                               f"is not supported; only the projections {', '.join(PROJECTIONS)} are")
        m = _TENSOR_RE.fullmatch(name)
        if m is None:
            raise AdapterError(f"unexpected tensor {name} in {WEIGHTS_FILE}: not a peft LoRA weight of a decoder "
                               f"layer projection (base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A/B.weight)")
        layer, proj, part = int(m["layer"]), m["proj"], m["part"]
        if m["param"] == "bias":
            raise AdapterError(f"tensor {name}: lora_bias (a bias on lora_B) is not supported")
        if PROJECTIONS.get(proj) != m["parent"]:
            raise AdapterError(f"tensor {name}: {m['parent']}.{proj} is not one of the supported projections "
                               f"({', '.join(PROJECTIONS)})")
        if layer >= arch.num_layers:
            raise AdapterError(f"tensor {name} is for layer {layer} but the base model has {arch.num_layers} "
                               f"layers: an adapter for another base model?")
        _check_hidden_size(name, t, proj, part, arch)
        slot = pairs.setdefault((layer, proj), {})
        if part in slot:
            raise AdapterError(f"tensors {slot[part][0]} and {name} are both lora_{part} of {module_name(layer, proj)}")
        slot[part] = (name, t)
    return pairs


def _check_hidden_size(name: str, t: torch.Tensor, proj: str, part: str, arch: BaseShapes) -> None:
    """Name the likely cause of a shape mismatch: the adapter was trained on a model of another width."""
    if t.ndim != 2:
        return  # _check_tensor reports the shape with the expected one
    if part == "A" and proj in _HIDDEN_IN:
        hidden = t.shape[1]
    elif part == "B" and proj in _HIDDEN_OUT:
        hidden = t.shape[0]
    else:
        return
    if hidden != arch.hidden_size:
        raise AdapterError(
            f"tensor {name} has shape {list(t.shape)}: the adapter was trained for a base model with hidden size "
            f"{hidden}, but this base model's hidden size is {arch.hidden_size}"
        )


def _check_coverage(pairs: Mapping[tuple[int, str], Mapping[str, object]], config: LoraAdapterConfig) -> None:
    """Weights and config must describe the same modules, each with both halves of its A/B pair."""
    for key in sorted(pairs):
        name = module_name(*key)
        if key not in config.modules:
            raise AdapterError(f"{WEIGHTS_FILE} has weights for {name}, which adapter_config.json does not target")
        for part in "AB":
            if part not in pairs[key]:
                raise AdapterError(f"{WEIGHTS_FILE} has no lora_{part} for {name} (the A/B pair is incomplete)")
    missing = sorted(set(config.modules) - set(pairs))
    if missing:
        raise AdapterError(f"adapter_config.json targets {module_name(*missing[0])} but {WEIGHTS_FILE} has no "
                           f"weights for it ({len(missing)} such modules): an adapter for another base model?")


def _check_tensor(name: str, t: torch.Tensor, expected: tuple[int, int]) -> None:
    if tuple(t.shape) != expected:
        raise AdapterError(f"tensor {name} has shape {list(t.shape)}, expected {list(expected)}")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise AdapterError(f"tensor {name} holds {bad} NaN or inf values")
