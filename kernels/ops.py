"""The one dispatch point of every compute op the model runner uses.

Each op has a torch implementation (the CPU path and the test oracle). GPU (Triton) implementations
slot in here, chosen per call by the tensors' device; nothing outside `kernels` picks an implementation.
"""

from __future__ import annotations

import torch

from kernels import attention as _attn
from kernels import lora as _lora
from kernels import quant as _quant
from kernels.attention import AttentionPlan
from kernels.lora import LoraSegments, SlotWeights
from kernels.quant import QuantizedTensor

__all__ = ["AttentionPlan", "LoraSegments", "QuantizedTensor", "embedding", "linear", "paged_attention", "sgmv_",
           "write_kv"]


def linear(x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias); x: [..., in_features], w: [out_features, in_features] (quantized or dense)."""
    return _quant.quant_linear(x, w, bias)


def embedding(ids: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor:
    """ids: [num_tokens] -> [num_tokens, hidden] float32 rows of w."""
    return _quant.quant_embedding(ids, w)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    _attn.write_kv(k_cache, v_cache, k, v, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                    scale: float) -> torch.Tensor:
    return _attn.paged_attention_torch(q, k_cache, v_cache, plan, scale)


def sgmv_(y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]) -> torch.Tensor:
    """In place: y [T, out] += the LoRA delta of each segment's adapter slot applied to x [T, in]."""
    return _lora.sgmv_torch_(y, x, segments, weights)
