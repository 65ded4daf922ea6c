"""The one dispatch point of every compute op the model runner uses.

Each op has a torch implementation (the CPU path and the test oracle) and, where one pays, a Triton
implementation (the GPU path, `kernels.triton`). The implementation is chosen per call: Triton for CUDA
tensors, torch otherwise. `LORASERVE_KERNELS` overrides the choice:

- `auto` (default): Triton for CUDA tensors when triton is installed, torch for everything else;
- `torch`: the torch implementations everywhere;
- `triton`: Triton everywhere; on CPU tensors that runs the kernels through the Triton interpreter, which
  needs `TRITON_INTERPRET=1` set before the kernels are first imported (how the tests run them).

`embedding` and `write_kv` are gathers and scatters torch does well on any device: they have no Triton
kernel. Nothing outside `kernels` picks an implementation.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kernels import attention as _attn
from kernels import lora as _lora
from kernels import quant as _quant
from kernels.attention import AttentionPlan
from kernels.lora import LoraSegments, SlotWeights
from kernels.quant import QuantizedTensor

__all__ = ["AttentionPlan", "LoraSegments", "QuantizedTensor", "embedding", "kernel_mode", "linear",
           "paged_attention", "sgmv_", "use_triton", "write_kv"]

KERNELS_ENV = "LORASERVE_KERNELS"
MODES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    """The override from the environment (read per call, so tests can switch it): auto | torch | triton."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r} is not a kernel choice: use one of {', '.join(MODES)}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensors on t's device runs its Triton implementation."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError(f"{KERNELS_ENV}=triton but triton is not installed")
        from kernels.triton.common import interpreting  # imports triton, none of the kernels

        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError(f"{KERNELS_ENV}=triton on CPU tensors needs the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before the kernels are first used")
        return True
    return t.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def linear(x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias); x: [..., in_features], w: [out_features, in_features] (quantized or dense).

    Dense weights go to torch's matmul on every device; quantized ones to the dequantizing kernel.
    """
    if isinstance(w, QuantizedTensor) and use_triton(x):
        from kernels.triton import quant as _tq

        return _tq.quant_linear(x, w, bias)
    return _quant.quant_linear(x, w, bias)


def embedding(ids: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor:
    """ids: [num_tokens] -> [num_tokens, hidden] float32 rows of w."""
    return _quant.quant_embedding(ids, w)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    _attn.write_kv(k_cache, v_cache, k, v, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                    scale: float) -> torch.Tensor:
    """q [T, heads, head_dim] over the paged cache `[num_blocks, block_size, kv_heads, head_dim]` by `plan`."""
    if use_triton(q):
        from kernels.triton import attention as _ta

        return _ta.paged_attention(q, k_cache, v_cache, plan, scale)
    return _attn.paged_attention_torch(q, k_cache, v_cache, plan, scale)


def sgmv_(y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]) -> torch.Tensor:
    """In place: y [T, out] += the LoRA delta of each segment's adapter slot applied to x [T, in]."""
    if use_triton(x):
        from kernels.triton import sgmv as _ts

        return _ts.sgmv_(y, x, segments, weights)
    return _lora.sgmv_torch_(y, x, segments, weights)
