"""Torch implementations of the quantized ops: the CPU fast paths and the exact reference.

`linear` picks a path per activation dtype and batch size M; the thresholds come from measurements on
a 2-core AVX512-BF16 machine (see `bench/quant_linear.py`, which times every path):

- float32 x: dequantize to float32 (in row chunks that stay in cache) + dense matmul. The reference.
- bf16 x, int4: aten's int4pack kernel (`_weight_int4pack_mm_for_cpu`) for M < 128; from M = 128 on,
  dequantizing to bf16 in row chunks + dense bf16 matmul is faster (dense bf16 runs ~2x the kernel).
- bf16 x, int8 with groups of 32 (GGUF Q8_0), M <= 8, on a CPU with AVX512-VNNI: the C kernel of
  `kernels.native` (int8 dot products with x quantized per group of 32; 1.5-2x the int4pack split below on
  the default model's 49152x576 LM head, at M = 1, one thread).
- bf16 x, int8 with groups otherwise: for M <= 8, split q = 16 * hi + lo into two int4 weights and
  run the int4pack kernel twice (~4x faster than dequantizing at M = 1); above, chunked dequant + matmul.
- bf16 x, int8 per channel: `_weight_int8pack_mm` for M <= 8 (no extra memory; the nibble split is ~15%
  faster at M = 1 but would hold a second copy of the weight), chunked dequant + matmul above.
- bf16 x with a dense copy held (`prepack(w, dense=True)`, when the model is small enough for the runtime to
  afford one): a bf16 matmul from M = 9 on. The int4pack kernel's time grows linearly with M (it reads the
  codes once per row block); the dense matmul's does not. The copy is held in oneDNN's blocked layout for its
  linear kernel (`_onednn_pack`: reordered once at load; `F.linear` on a plain copy reorders it in every call),
  which measured 1.3-2x `F.linear` at every M on the default model's shapes: one layer's four matmuls at M = 16
  0.24 ms against 0.45 ms (int4pack), at M = 64 0.66 ms against 1.01 ms (plain copy); int4pack stays ahead up
  to M = 8 (0.18 against 0.20 ms). The copy holds the dequantized values rounded to bf16, exactly what the
  chunked dequant path computes with, and the blocked kernel gives the plain matmul's results bit for bit.

Tensors here are duck-typed `QuantizedTensor`s (see kernels.quant); this module imports nothing of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import native

if TYPE_CHECKING:
    from kernels.quant import QuantizedTensor

INT4PACK_MAX_M = 127  # int4 bf16: the int4pack kernel below M = 128, chunked dequant + matmul from there
INT8_SPLIT_MAX_M = 8  # grouped int8 bf16: two int4pack matmuls up to here
INT8PACK_MAX_M = 8  # per-channel int8 bf16: aten's int8pack kernel up to here
DENSE_MIN_M = 9  # with a dense bf16 copy held: the dense matmul from here on (the int8 kernels stop at 8)
CHUNK_ELEMS = 1 << 20  # weight elements dequantized per step: 4 MiB float32 + 2 MiB bf16, in L3 (32 MiB)
_INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes the aten int4pack kernel accepts


def unpack_int4(qweight: Tensor) -> Tensor:
    """Codes uint8 `[N, K]` from the canonical nibble-packed uint8 `[N, K//2]` (even k in the low nibble)."""
    n, half = qweight.shape
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(n, 2 * half)


def dequantize_rows(w: QuantizedTensor, r0: int, r1: int) -> Tensor:
    """Rows r0:r1 of the weight in float32: `[r1 - r0, K]`."""
    n, k = r1 - r0, w.shape[1]
    groups = k // w.group_size
    scales = w.scales[r0:r1, :, None].float()  # [n, G, 1]
    if w.kind == "int4":
        qw = w.qweight[r0:r1]  # [n, K//2]
        out = torch.empty(n, k // 2, 2, dtype=torch.float32, device=qw.device)
        out[..., 0] = qw & 15
        out[..., 1] = qw >> 4
        out = out.view(n, groups, w.group_size).mul_(scales).add_(w.zeros[r0:r1, :, None].float())
    else:
        out = w.qweight[r0:r1].float().view(n, groups, w.group_size).mul_(scales)
    return out.view(n, k)


def dequant_mm(x: Tensor, w: QuantizedTensor) -> Tensor:
    """x `[M, K]` @ W^T -> `[M, N]`, dequantizing W to x.dtype a chunk of rows at a time."""
    n, k = w.shape
    rows = max(16, CHUNK_ELEMS // k)
    if n <= rows:
        return F.linear(x, dequantize_rows(w, 0, n).to(x.dtype))
    # y^T [N, M]: each chunk of weight rows writes a contiguous block of rows of y^T.
    yt = torch.empty(n, x.shape[0], dtype=x.dtype, device=x.device)
    xt = x.t()  # [K, M]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(dequantize_rows(w, r0, r1).to(x.dtype), xt, out=yt[r0:r1])
    return yt.t().contiguous()


def _scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    # The int4pack kernel reads one bf16 [K//group, N, 2] table of (scale, zero) pairs.
    return torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _int4pack_group(w: QuantizedTensor) -> int | None:
    """The group size the int4pack kernel can run this weight with, or None if it cannot."""
    n, k = w.shape
    if n % 16 or k % 2:  # the packer needs N % 16 == 0
        return None
    if w.group_size in _INT4PACK_GROUPS:
        return w.group_size
    if w.kind == "int8" and w.group_size == k:  # per channel: repeat the row scale over kernel groups
        return next((g for g in _INT4PACK_GROUPS if k % g == 0), None)
    return None


def _int4pack(w: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """(packed weight, bf16 scales-and-zeros [K//32, N, 2]) for an int4 weight, built once and cached."""
    hit = w.packed.get("int4pack")
    if hit is None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(w.qweight).to(torch.int32), 1)
        # The kernel computes (code - 8) * scale + zero; ours is code * scale + zero.
        hit = w.packed["int4pack"] = (packed, _scales_and_zeros(w.scales, w.zeros + 8 * w.scales))
    return hit


def _int8_split(w: QuantizedTensor) -> tuple[Tensor, ...]:
    """q = 16 * hi + lo with lo in 0..15, hi in -8..7: two int4pack weights, built once and cached."""
    hit = w.packed.get("int8split")
    if hit is None:
        group = _int4pack_group(w)
        q = w.qweight.to(torch.int32)  # [N, K]
        lo = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q & 15, 1)
        hi = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q >> 4) + 8, 1)  # arithmetic shift
        scales = w.scales.repeat_interleave(w.group_size // group, dim=1)  # [N, K//group]
        # lo: (code - 8) * s + 8 s = lo * s;  hi: (code - 8) * 16 s + 0 = 16 * hi * s.
        hit = w.packed["int8split"] = (
            lo,
            _scales_and_zeros(scales, 8 * scales),
            hi,
            _scales_and_zeros(16 * scales, torch.zeros_like(scales)),
        )
    return hit


def int4pack_mm(x: Tensor, w: QuantizedTensor) -> Tensor:
    """bf16 x `[M, K]` @ int4 W^T via aten's int4pack kernel -> bf16 `[M, N]`."""
    packed, sz = _int4pack(w)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, w.group_size, sz)


def int8_split_mm(x: Tensor, w: QuantizedTensor) -> Tensor:
    """bf16 x `[M, K]` @ int8 W^T as two int4pack matmuls (low and high nibbles) -> bf16 `[M, N]`."""
    lo, sz_lo, hi, sz_hi = _int8_split(w)
    x = x.contiguous()
    g = _int4pack_group(w)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, lo, g, sz_lo)
    return y.add_(torch.ops.aten._weight_int4pack_mm_for_cpu(x, hi, g, sz_hi))


def int8pack_mm(x: Tensor, w: QuantizedTensor) -> Tensor:
    """bf16 x `[M, K]` @ per-channel int8 W^T via aten's int8pack kernel -> bf16 `[M, N]`."""
    hit = w.packed.get("int8pack")
    if hit is None:
        hit = w.packed["int8pack"] = (w.scales[:, 0].to(torch.bfloat16).contiguous(),)
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.qweight, hit[0])


def _q8_sums(w: QuantizedTensor) -> Tensor:
    """scale * the sum of each group's codes, float32 [N, K//group]: what the C int8 kernel takes back out."""
    hit = w.packed.get("q8sums")
    if hit is None:
        n, k = w.shape
        sums = w.qweight.view(n, k // w.group_size, w.group_size).sum(-1, dtype=torch.int32).float()
        hit = w.packed["q8sums"] = ((w.scales.float() * sums).contiguous(),)
    return hit[0]


def _q8_gemv(x: Tensor, w: QuantizedTensor) -> Tensor | None:
    if not native.gemv_available():
        return None
    return native.q8_gemv(x.contiguous(), w.qweight, w.scales, _q8_sums(w))


def _int8pack_ok(w: QuantizedTensor) -> bool:
    # The kernel gives wrong results (or crashes) for K not a multiple of 16: keep to multiples of 32.
    return w.group_size == w.shape[1] and w.shape[1] % 32 == 0


def linear(x: Tensor, w: QuantizedTensor) -> Tensor:
    """x `[M, K]` @ W^T -> `[M, N]` in x.dtype by the fastest exact-enough path for this dtype and M."""
    m = x.shape[0]
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and m > 0:
        dense = w.packed.get("dense")
        if dense is not None and m >= DENSE_MIN_M:
            return dense_mm(x, dense[0])
        if w.kind == "int4":
            if m <= INT4PACK_MAX_M and _int4pack_group(w) == w.group_size:
                return int4pack_mm(x, w)
        elif w.group_size == w.shape[1]:
            if m <= INT8PACK_MAX_M and _int8pack_ok(w):
                return int8pack_mm(x, w)
        else:
            y = _q8_gemv(x, w) if m <= native.GEMV_MAX_M and w.group_size == 32 else None
            if y is not None:
                return y
            if m <= INT8_SPLIT_MAX_M and _int4pack_group(w) is not None:
                return int8_split_mm(x, w)
    return dequant_mm(x, w)


def _onednn_pack(dense: Tensor) -> Tensor:
    """`dense` [N, K] bf16 in oneDNN's blocked layout for its linear kernel, or `dense` itself where torch has no
    oneDNN (`dense_mm` takes either)."""
    if not torch.backends.mkldnn.is_available():
        return dense
    try:
        return torch.ops.mkldnn._reorder_linear_weight(dense, 64)  # 64: the batch it is laid out for (a hint)
    except (AttributeError, RuntimeError):
        return dense


def dense_mm(x: Tensor, dense: Tensor) -> Tensor:
    """x `[M, K]` @ the dense copy^T (plain or oneDNN-blocked, see `_onednn_pack`) -> `[M, N]`."""
    if dense.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], "")
    return F.linear(x, dense)


def dense_bytes(w: QuantizedTensor) -> int:
    """What a dense bf16 copy of `w` takes."""
    return 2 * w.shape[0] * w.shape[1]


def prepack(w: QuantizedTensor, dense: bool = False) -> None:
    """Build the cached layouts the bf16 fast paths of `linear` use for this weight (`dense`: also a dense
    bf16 copy, for batched steps)."""
    if dense and "dense" not in w.packed:
        w.packed["dense"] = (_onednn_pack(dequantize_rows(w, 0, w.shape[0]).to(torch.bfloat16)),)
    if w.kind == "int4" and _int4pack_group(w) == w.group_size:
        _int4pack(w)
    elif w.kind == "int8" and w.group_size == w.shape[1] and _int8pack_ok(w):
        int8pack_mm(torch.zeros(1, w.shape[1], dtype=torch.bfloat16), w)
    elif w.kind == "int8" and w.group_size == 32 and native.gemv_available():
        _q8_sums(w)
    elif w.kind == "int8" and _int4pack_group(w) is not None:
        _int8_split(w)
