"""The one dispatch point of every compute op the model runs: a kernel backend, chosen once.

Each op has a torch implementation (the CPU path and the test oracle) and, where one pays, a Triton
implementation (the GPU path, `kernels.triton`). `select_kernels(device)` picks the backend when the
runtime starts, from the device and the `LORASERVE_KERNELS` override (read there, once):

- `auto` (default): Triton on a CUDA device (when triton is installed), torch everywhere else;
- `torch`: the torch implementations everywhere;
- `triton`: Triton everywhere; on the CPU that runs the kernels through the Triton interpreter, which
  needs `TRITON_INTERPRET=1` set before the kernels are first imported (how the tests run them).

`embedding` and `write_kv` are gathers and scatters torch does well on any device: both backends use torch.
Nothing outside `kernels` picks an implementation; the model holds the backend it was given.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import torch

from kernels import attention as _attn
from kernels import lora as _lora
from kernels import quant as _quant
from kernels.attention import AttentionPlan
from kernels.lora import LoraSegments, SlotWeights
from kernels.quant import QuantizedTensor

__all__ = ["AttentionPlan", "Kernels", "LoraSegments", "QuantizedTensor", "TorchKernels", "TritonKernels",
           "kernel_mode", "select_kernels"]

KERNELS_ENV = "LORASERVE_KERNELS"
MODES = ("auto", "torch", "triton")


class Kernels(Protocol):
    name: str  # "torch" | "triton"

    def linear(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """y = x @ w.T (+ bias); x: [..., in_features], w: [out_features, in_features] (quantized or dense)."""
        ...

    def embedding(self, ids: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor:
        """ids: [num_tokens] -> [num_tokens, hidden] float32 rows of w."""
        ...

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                        scale: float) -> torch.Tensor:
        """q [T, heads, head_dim] over the paged cache `[num_blocks, block_size, kv_heads, head_dim]` by `plan`."""
        ...

    def sgmv_(self, y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]
              ) -> torch.Tensor:
        """In place: y [T, out] += the LoRA delta of each segment's adapter slot applied to x [T, in]."""
        ...


class TorchKernels:
    name = "torch"

    def linear(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        return _quant.quant_linear(x, w, bias)

    def embedding(self, ids: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor:
        return _quant.quant_embedding(ids, w)

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        _attn.write_kv(k_cache, v_cache, k, v, slot_mapping)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                        scale: float) -> torch.Tensor:
        return _attn.paged_attention_torch(q, k_cache, v_cache, plan, scale)

    def sgmv_(self, y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]
              ) -> torch.Tensor:
        return _lora.sgmv_torch_(y, x, segments, weights)


class TritonKernels(TorchKernels):
    """The Triton kernels for quantized matmuls, paged attention and SGMV; dense matmuls stay with torch."""

    name = "triton"

    def __init__(self) -> None:
        # Imported here, once: importing a kernel module defines its kernels (for the interpreter or not).
        from kernels.triton import attention, quant, sgmv

        self._attention, self._quant, self._sgmv = attention, quant, sgmv

    def linear(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        if isinstance(w, QuantizedTensor):
            return self._quant.quant_linear(x, w, bias)
        return _quant.quant_linear(x, w, bias)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                        scale: float) -> torch.Tensor:
        return self._attention.paged_attention(q, k_cache, v_cache, plan, scale)

    def sgmv_(self, y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]
              ) -> torch.Tensor:
        return self._sgmv.sgmv_(y, x, segments, weights)


def kernel_mode() -> str:
    """The override from the environment: auto | torch | triton."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not a kernel choice: use one of {', '.join(MODES)}")
    return mode


def select_kernels(device: torch.device | str, mode: str | None = None) -> Kernels:
    """The backend for a model on `device`; `mode` None reads the LORASERVE_KERNELS override."""
    device = torch.device(device)
    mode = kernel_mode() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"kernel backend {mode!r} is unknown: use one of {', '.join(MODES)}")
    has_triton = importlib.util.find_spec("triton") is not None
    if mode == "torch" or (mode == "auto" and (device.type != "cuda" or not has_triton)):
        return TorchKernels()
    if not has_triton:
        raise RuntimeError(f"{KERNELS_ENV}=triton but triton is not installed")
    if device.type == "cpu":
        from kernels.triton.common import interpreting  # imports triton, none of the kernels

        if not interpreting():
            raise RuntimeError(f"{KERNELS_ENV}=triton on the CPU needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before the kernels are first used")
    return TritonKernels()
