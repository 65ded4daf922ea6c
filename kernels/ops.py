"""The one dispatch point of every compute op the model runs: a kernel backend, chosen once.

Each op has a torch implementation (the CPU path and the test oracle) and, where one pays, a Triton
implementation (the GPU path, `kernels.triton`). `select_kernels(device)` picks the backend when the
runtime starts, from the device and the `LORASERVE_KERNELS` override (read there, once):

- `auto` (default): Triton on a CUDA device (when triton is installed), torch everywhere else;
- `torch`: the torch implementations everywhere;
- `triton`: Triton everywhere; on the CPU that runs the kernels through the Triton interpreter, which
  needs `TRITON_INTERPRET=1` set before the kernels are first imported (how the tests run them).

`embedding` and `write_kv` are gathers and scatters torch does well on any device: both backends use torch.
On the CPU, the torch backend runs the decode step's small fused ops (rotary embedding with the K/V write,
residual add with RMS norm, SiLU-and-multiply, single-token paged attention) through the C kernels of
`kernels.native` when they are built, on bfloat16; otherwise, and for every other dtype, as torch ops. Its
`decode_layers` runs every layer of a step in one C call where the model's weights allow it and the C attention
kernel reads every new token (decodes, verify passes, prompt chunks of up to NATIVE_PREFILL_MAX tokens; the model
checks the weights; see `kernels/cpu/layers.c`).
Nothing outside `kernels` picks an implementation; the model holds the backend it was given.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from kernels import attention as _attn
from kernels import lora as _lora
from kernels import native
from kernels import quant as _quant
from kernels import quant_cpu as _quant_cpu
from kernels.attention import AttentionPlan
from kernels.lora import LoraSegments, SlotWeights
from kernels.quant import QuantizedTensor

if TYPE_CHECKING:
    from kernels.triton.sgmv import SlotTables

__all__ = ["AttentionPlan", "Kernels", "LoraSegments", "QuantizedTensor", "TorchKernels", "TritonKernels",
           "kernel_mode", "select_kernels"]

KERNELS_ENV = "LORASERVE_KERNELS"
MODES = ("auto", "torch", "triton")


class Kernels(Protocol):
    name: str  # "torch" | "triton"

    def linear(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None,
               prompt: bool = False) -> torch.Tensor:
        """y = x @ w.T (+ bias); x: [..., in_features], w: [out_features, in_features] (quantized or dense).
        `prompt`: the step computes prompt tokens (a backend may then keep to the path a whole prompt takes, so
        a prompt's K/V and first token do not depend on how much of it the prefix cache held)."""
        ...

    def linear_f32(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor | None:
        """float32 x `[M, K]` @ w.T in float32, nothing rounded, where a fast path holds a float32 layout of w for
        this M (the LM head's logits); None: the caller takes `linear`."""
        ...

    def embedding(self, ids: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor:
        """ids: [num_tokens] -> [num_tokens, hidden] float32 rows of w."""
        ...

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def rope_write_kv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int
                      ) -> torch.Tensor:
        """Rotary embedding (rotate-half layout, float32 tables `[max_len, head_dim]` read at `positions`) of q
        and k in the fused projection output `qkv [T, (heads + 2 kv_heads) * head_dim]`; k and v written at their
        slots; returns the rotated q `[T, heads, head_dim]`."""
        ...

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     dtype: torch.dtype) -> torch.Tensor:
        """In place: the float32 residual x `[T, hidden]` += delta (None: nothing); returns RMSNorm(x) * weight
        in `dtype`."""
        ...

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of a fused gate/up output `[T, 2 * inter]` -> `[T, inter]`."""
        ...

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

    def linear(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None,
               prompt: bool = False) -> torch.Tensor:
        return _quant.quant_linear(x, w, bias, prompt)

    def linear_f32(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor | None:
        return _quant_cpu.linear_f32(x, w) if isinstance(w, QuantizedTensor) and x.is_cpu else None

    def embedding(self, ids: torch.Tensor, w: QuantizedTensor | torch.Tensor) -> torch.Tensor:
        return _quant.quant_embedding(ids, w)

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        _attn.write_kv(k_cache, v_cache, k, v, slot_mapping)

    def rope_write_kv(self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int
                      ) -> torch.Tensor:
        if qkv.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16:
            q = native.rope_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads)
            if q is not None:
                return q
        return _attn.rope_write_kv_torch(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.bfloat16 and x.dtype == torch.float32 and (delta is None or delta.dtype == dtype):
            out = native.add_rms_norm(x, delta, weight, eps)
            if out is not None:
                return out
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, (x.shape[-1],), weight, eps).to(dtype)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        if gu.dtype == torch.bfloat16:
            out = native.silu_mul(gu)
            if out is not None:
                return out
        inter = gu.shape[-1] // 2
        return F.silu(gu[..., :inter]) * gu[..., inter:]

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                        scale: float) -> torch.Tensor:
        return _attn.paged_attention_torch(q, k_cache, v_cache, plan, scale)

    def sgmv_(self, y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]
              ) -> torch.Tensor:
        return _lora.sgmv_cpu_(y, x, segments, weights) if y.is_cpu else \
            _lora.sgmv_torch_(y, x, segments, weights)

    def sgmv_fused_(self, y: torch.Tensor, x: torch.Tensor, lora: native.FusedLoraArgs, layer: int, group: int
                    ) -> bool:
        """y += the LoRA delta of `layer`'s projection group `group` (an index of `kernels.lora.FUSED_GROUPS`) from
        the step's table as `kernels.lora.fused_lora` builds it: the same deltas as `sgmv_` on the segments and
        weights it was built from (the C kernel, one call with a few pointers). False when it cannot (nothing
        changed: call `sgmv_`)."""
        return native.lora_group_(y, x, lora, layer, group)

    def decode_layers(self, x: torch.Tensor, hs: torch.Tensor, layers: native.DecodeLayers, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan, eps: float, scale: float,
                      lora: native.FusedLoraArgs | None = None, prompt: bool = False) -> torch.Tensor | None:
        """Every layer of a step in one C call (`native.decode_layers`: the same kernels as the op-by-op path, bit
        for bit) when the C attention kernel reads every new token (decodes, verify passes, prompt chunks of up to
        NATIVE_PREFILL_MAX tokens: `plan.native_all`); `lora`: the step's LoRA as `kernels.lora.fused_lora` builds
        it (None: none); `prompt`: the step computes prompt tokens (`linear`'s `prompt`). None otherwise, nothing
        changed. The caller checks the weights and builds the LoRA tables (None from `fused_lora`: the layers
        cannot take that LoRA)."""
        nd = plan.native_all()
        if nd is None:
            return None
        return native.decode_layers(x, hs, layers, positions, cos, sin, plan.slot_mapping, nd.q_rows, nd.nq, nd.ctx,
                                    nd.tables, eps, scale, lora, prompt)


class TritonKernels(TorchKernels):
    """The Triton kernels for quantized matmuls, paged attention and SGMV; dense matmuls stay with torch."""

    name = "triton"

    def __init__(self) -> None:
        # Imported here, once: importing a kernel module defines its kernels (for the interpreter or not).
        from kernels.triton import attention, quant, sgmv

        self._attention, self._quant, self._sgmv = attention, quant, sgmv

    def linear(self, x: torch.Tensor, w: QuantizedTensor | torch.Tensor, bias: torch.Tensor | None = None,
               prompt: bool = False) -> torch.Tensor:
        if isinstance(w, QuantizedTensor):
            return self._quant.quant_linear(x, w, bias)
        return _quant.quant_linear(x, w, bias)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                        scale: float) -> torch.Tensor:
        return self._attention.paged_attention(q, k_cache, v_cache, plan, scale)

    def sgmv_(self, y: torch.Tensor, x: torch.Tensor, segments: LoraSegments, weights: list[SlotWeights]
              ) -> torch.Tensor:
        return self._sgmv.sgmv_(y, x, segments, weights)

    def sgmv_static_(self, y: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, tables: SlotTables
                     ) -> torch.Tensor:
        """`sgmv_` at a fixed launch shape, from tiles and slot tables already on the device (graph replays)."""
        return self._sgmv.sgmv_static_(y, x, tiles, tables)


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
