"""Group-quantized int4/int8 weights and the torch implementations of the ops that consume them.

A `QuantizedTensor` holds a 2-D weight `[N_out, K_in]` quantized in memory. `quant_linear` and
`quant_embedding` are the torch implementations (the CPU fast paths live in `kernels.quant_cpu`);
`kernels.ops` chooses between `quant_linear` and the Triton kernel (`kernels.triton.quant`).

Layouts (canonical, what loaders produce and what the Triton kernel reads):
- int4: `qweight` uint8 `[N, K//2]`, element k of a row in byte k//2, even k in the low nibble, odd k
  in the high nibble, codes 0..15; `scales`, `zeros` float32 `[N, K//group]`;
  value = code * scale + zero (GGUF Q4_0: zero = -8 * scale; Q4_1: scale = d, zero = m).
- int8: `qweight` int8 `[N, K]`, `scales` float32 `[N, K//group]` (group == K: per channel), value = q * scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import quant_cpu

KINDS = ("int4", "int8")


@dataclass(eq=False)
class QuantizedTensor:
    kind: str  # "int4" | "int8"
    shape: tuple[int, int]  # (N_out, K_in) of the dequantized weight
    group_size: int  # elements of a row sharing one scale (and zero); K for per-channel int8
    qweight: Tensor  # int4: uint8 [N, K//2]; int8: int8 [N, K]
    scales: Tensor  # float32 [N, K//group]
    zeros: Tensor | None = None  # int4 only: float32 [N, K//group]
    # Layouts derived lazily for a fast path (e.g. the CPU int4pack kernel), keyed by path name.
    # The canonical tensors above stay: rows(), dequantize() and the Triton path read them.
    packed: dict[str, tuple[Tensor, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, k = self.shape
        if self.kind not in KINDS:
            raise ValueError(f"quantized kind {self.kind!r} is not supported: supported are {', '.join(KINDS)}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide K={k}")
        groups = k // self.group_size
        if self.kind == "int4":
            want = (torch.uint8, (n, k // 2))
            if k % 2 or self.zeros is None or tuple(self.zeros.shape) != (n, groups):
                raise ValueError(f"int4 weight {self.shape} needs even K and zeros of shape {(n, groups)}")
        else:
            want = (torch.int8, (n, k))
        if (self.qweight.dtype, tuple(self.qweight.shape)) != want:
            raise ValueError(
                f"{self.kind} qweight must be {want[0]} {list(want[1])}, "
                f"got {self.qweight.dtype} {list(self.qweight.shape)}"
            )
        if tuple(self.scales.shape) != (n, groups):
            raise ValueError(f"scales must have shape {[n, groups]}, got {list(self.scales.shape)}")

    @property
    def nbytes(self) -> int:
        """Resident bytes of everything held: canonical tensors plus any cached packed layout."""
        held = [self.qweight, self.scales]
        if self.zeros is not None:
            held.append(self.zeros)
        held.extend(t for ts in self.packed.values() for t in ts)
        return sum(t.numel() * t.element_size() for t in held)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full weight `[N, K]` in `dtype` (computed in float32, rounded once to `dtype`)."""
        return quant_cpu.dequantize_rows(self, 0, self.shape[0]).to(dtype)

    def rows(self, index: Tensor | Sequence[int] | slice) -> QuantizedTensor:
        """The rows `index` of the weight, still quantized (embedding gathers, GGUF q/k un-permute).

        A slice gives views sharing storage with this tensor; an index tensor or list gives copies.
        """
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.qweight.device)
        qweight = self.qweight[index]
        return QuantizedTensor(
            kind=self.kind,
            shape=(qweight.shape[0], self.shape[1]),
            group_size=self.group_size,
            qweight=qweight,
            scales=self.scales[index],
            zeros=None if self.zeros is None else self.zeros[index],
        )

    @classmethod
    def cat_rows(cls, ws: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Stack weights along the output dimension (fused q/k/v or gate/up), staying quantized."""
        first = ws[0]
        for w in ws[1:]:
            if (w.kind, w.group_size, w.shape[1]) != (first.kind, first.group_size, first.shape[1]):
                raise ValueError(
                    "cannot stack quantized weights of different layouts: "
                    f"{first.kind} group {first.group_size} K={first.shape[1]} vs "
                    f"{w.kind} group {w.group_size} K={w.shape[1]}"
                )
        return cls(
            kind=first.kind,
            shape=(sum(w.shape[0] for w in ws), first.shape[1]),
            group_size=first.group_size,
            qweight=torch.cat([w.qweight for w in ws]),
            scales=torch.cat([w.scales for w in ws]),
            zeros=None if first.zeros is None else torch.cat([w.zeros for w in ws]),
        )

    def prepack(self, dense: bool = False, dtype: torch.dtype | None = None, exact: bool = False) -> None:
        """Build the CPU fast-path layouts now rather than on the first bf16 matmul; `dense`: also hold a dense
        copy (bf16, or float32 on a CPU without native bf16; `dtype` to choose) for batched matmuls; `exact`: a
        float32 copy holds the values unrounded (for `quant_cpu.linear_f32`; see kernels.quant_cpu)."""
        quant_cpu.prepack(self, dense, dtype, exact)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same weight on `device` (canonical tensors only: fast-path layouts are per device, built there)."""
        device = torch.device(device)
        if self.qweight.device == device:
            return self
        return QuantizedTensor(self.kind, self.shape, self.group_size, self.qweight.to(device),
                               self.scales.to(device), None if self.zeros is None else self.zeros.to(device))


def _as_groups(w: Tensor, group_size: int) -> Tensor:
    # w: [N, K] -> [N, K//group, group]
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k} of a weight of shape {list(w.shape)}")
    return w.float().reshape(n, k // group_size, group_size)


def quantize_int4(w: Tensor, group_size: int = 32) -> QuantizedTensor:
    """Asymmetric int4: per group of `group_size` elements, codes 0..15 span [min, max]."""
    if w.dim() != 2 or w.shape[1] % 2:
        raise ValueError(f"int4 quantization needs a 2-D weight with even K, got shape {list(w.shape)}")
    g = _as_groups(w, group_size)  # [N, G, group]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, G]
    scales = (hi - lo) / 15
    # A constant group has scale 0: any code dequantizes to `lo`, so divide by 1 instead of 0.
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = torch.round((g - lo[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    codes = codes.reshape(w.shape[0], -1)  # [N, K]
    qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, K//2]
    return QuantizedTensor("int4", tuple(w.shape), group_size, qweight.contiguous(), scales, lo.contiguous())


def quantize_int8(w: Tensor, group_size: int | None = None) -> QuantizedTensor:
    """Symmetric int8, q in -127..127 per group (group_size None: one scale per output row)."""
    if w.dim() != 2:
        raise ValueError(f"int8 quantization needs a 2-D weight, got shape {list(w.shape)}")
    group_size = w.shape[1] if group_size is None else group_size
    g = _as_groups(w, group_size)  # [N, G, group]
    scales = g.abs().amax(dim=-1) / 127  # [N, G]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(g * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(w.shape)
    return QuantizedTensor("int8", tuple(w.shape), group_size, q.contiguous(), scales)


# --- the torch implementations of the ops (kernels.ops dispatches between these and Triton) ---


def quant_linear(x: Tensor, w: QuantizedTensor | Tensor, bias: Tensor | None = None, prompt: bool = False) -> Tensor:
    """y = x @ W^T + bias for x `[..., K]`, W `[N, K]` quantized or plain; returns `[..., N]` in x.dtype.
    `prompt`: a step that computes prompt tokens (see `quant_cpu.linear`)."""
    if isinstance(w, Tensor):
        # Plain weights (e.g. GGUF F16 tensors) may be held in another dtype than the activations.
        weight = w if w.dtype == x.dtype else w.to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects K={w.shape[1]}")
    if x.dim() == 2 and bias is None:  # the model's case: no reshapes (~4 us a call, 120 calls a decode step)
        return quant_cpu.linear(x, w, prompt)
    x2 = x.reshape(-1, w.shape[1])  # [M, K]
    y = quant_cpu.linear(x2, w, prompt)  # [M, N]
    if bias is not None:
        y = y.add_(bias.to(y.dtype))
    return y.reshape(*x.shape[:-1], w.shape[0])


def quant_embedding(ids: Tensor, w: QuantizedTensor | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows `ids` of the embedding table `[vocab, hidden]`, dequantized: returns `[*ids.shape, hidden]`."""
    if isinstance(w, Tensor):
        return F.embedding(ids, w).to(dtype)
    flat = ids.reshape(-1)
    return w.rows(flat).dequantize(dtype).reshape(*ids.shape, w.shape[1])
