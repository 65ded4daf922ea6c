"""Torch implementations of the quantized ops: the CPU fast paths and the exact reference.

`linear` picks a path per activation dtype and batch size M; the thresholds come from measurements on
a 2-core AVX512-BF16 machine (see `bench/quant_linear.py`, which times every path). On a CPU without bf16
dot-product instructions (`kernels.cpu_features.native_bf16`) a bf16 matmul is emulated and runs ~8x slower
than a float32 one; there the dense copy is float32 and the dequantizing path multiplies in float32 (bf16 in,
bf16 out, one rounding at the end), see `dense_dtype`:

- float32 x: dequantize to float32 (in row chunks that stay in cache) + dense matmul. The reference.
- bf16 x, int4: aten's int4pack kernel (`_weight_int4pack_mm_for_cpu`) for M < 128; from M = 128 on,
  dequantizing to bf16 in row chunks + dense bf16 matmul is faster (dense bf16 runs ~2x the kernel).
- bf16 x, int4 with groups of 32, M <= 16, on a CPU with AVX2 and without native bf16: the AVX2 int4 kernel of
  `kernels.native_matmul` instead (x quantized to int16 per group with a power-of-two scale, so its error is about
  the output's bf16 rounding; it reads the canonical codes, no packed copy). On a 2-core AVX2 machine, the
  default model's 120 layer matmuls at M = 1: 6.2-7.7 ms against int4pack's 9.0-9.8 (one process,
  alternating; the C loop alone 4-6 ms), level or ahead up to M = 15. On a CPU with native bf16 it takes
  M <= 4 (`Q4_BF16_MAX_M`; int4pack from 5 to 8): on a 2-core AVX512-BF16 machine a decode step of 1 / 2 / 4 /
  8 requests 6.7-8.5 / 9.9-11.3 / 13.3-16.1 / 27.9-28.9 ms against int4pack's 10.0-12.2 / 12.3-13.6 /
  15.2-19.1 / 24.8-29.2 (two alternations of separate processes; the steps of up to 4 then also run their
  layers in one C call, `native.decode_layers`). Where the AVX512-BF16 int4 kernel runs, it serves instead:
- bf16 x, int4 with groups of 32, M <= 64 (`Q4B_MAX_M`), on a CPU with native bf16 and AVX512-BF16: the tiled
  kernel of `kernels.native_matmul` (`q4b_layout`: a second copy of the weight in tiles of 16 rows, codes + scales and
  zeros in fp16 where they are exact in it, as GGUF's are, else float32; each code becomes the bf16 16 + code with a shift and a bit-select, vdpbf16ps multiplies 16 rows' pairs
  by x's pair broadcast: the outputs are the lanes, products exact, float32 sums). The default model's 120 layer
  matmuls on a 2-core AVX512-BF16 machine (one process, alternating): M = 1 / 2 / 4 / 8 / 16 / 32 2.7 / 2.9 / 2.7
  / 3.7 / 6.2 / 11.6 ms against 3.5 / 5.1 / 6.7 / 6.7 / 8.9 / 12.9 on the paths above; at M = 64 the dense copy
  is level or ahead (21.1 against 22.5 with fp16 scales), but decode steps of up to 64 then run their layers in
  one C call, which saves the op-by-op path's ~270 Python calls: decode steps of 40 / 48 / 56 / 64 requests 27 /
  34 / 34-38 / 44 ms against 30-31 / 39 / 41-42 / 46-47 with the limit at 32 or 48 (separate processes,
  alternating). From 8 rows on the kernel keeps each row's sum in units of its group scale, 16 chains of sums in
  flight instead of 8 (`Q4U_MIN_M` in kernels/cpu/quant.c): M = 8 / 16 / 32 / 64 3.0 / 5.1 / 9.3 / 18.0 ms against
  3.2 / 5.6 / 10.6 / 20.3. A step that computes prompt tokens takes the dense copy at every M (`linear`'s
  `prompt`).
- bf16 x, int8 with groups of 32 (GGUF Q8_0), M <= 64, on a CPU with native bf16, AVX512-VNNI and AVX512-BF16:
  the tiled int8 kernel of `kernels.native_matmul` (`q8t_layout`: tiles of 16 rows, one vpdpbusd multiplies 16 rows'
  4 codes by 4 bytes of x broadcast; x quantized per group of 32 as the kernel below does, the same sums). On the
  default model's 49152x576 LM head, 2 threads: M = 1 / 8 / 32 / 64 0.45-0.50 / 0.45-0.49 / 1.3-1.5 / 2.8-3.5 ms,
  against 0.73-0.78 / 2.7-2.9 ms for the kernel below and 2.6 / 4.6 ms for the dense copy at 32 / 64.
- bf16 x, int8 with groups of 32 (GGUF Q8_0), M <= 8, on a CPU with AVX512-VNNI otherwise: the C kernel of
  `kernels.native_matmul` (int8 dot products with x quantized per group of 32; 1.5-2x the int4pack split below on
  the default model's 49152x576 LM head, at M = 1, one thread).
- bf16 x, int8 with groups of 32 otherwise (no AVX512-VNNI), M <= 16, on a CPU with AVX2: the AVX2 kernel of
  `kernels.native_matmul` (the same scheme; on the LM head 3x the int4pack split at M = 1 and 8 on a 2-core AVX2
  machine: 1.5 against 4.7 ms, 5.9 against 19.7 ms).
- bf16 x, int8 with groups otherwise: for M <= 8, split q = 16 * hi + lo into two int4 weights and
  run the int4pack kernel twice (~4x faster than dequantizing at M = 1); above, chunked dequant + matmul.
- bf16 x, int8 per channel: `_weight_int8pack_mm` for M <= 8 (no extra memory; the nibble split is ~15%
  faster at M = 1 but would hold a second copy of the weight), chunked dequant + matmul above.
- bf16 x with a dense copy held (`prepack(w, dense=True)`, when the model is small enough for the runtime to
  afford one) on a CPU with AVX512-BF16: the copy is held in the paired panels of `native_matmul.gemm_bf16w`
  (`gemm_pack_bf16`: 16 output columns by a pair of K a 64-byte vector, one vdpbf16ps per pair of x; exact
  products, float32 sums rounded once), which takes int4 weights from `gemm_bf16w_min_rows()` (20) rows on, the
  AVX512-BF16 int4 kernel below (both bound by memory there, the int4 codes a quarter of the bytes). The default
  model's 120 layer matmuls on a 2-core AVX512-BF16 machine: M = 32 / 64 / 128 / 400 7.3 / 14.2 / 27.6 / 79.4 ms
  (930-1,070 GFLOP/s) against oneDNN's bf16 kernel on its blocked layout 11.4 / 19.1 / 32.8 / 87.2 and the int4
  kernel's 9.1 / 17.7 at 32 / 64. Elsewhere (below):
- bf16 x with a dense copy held otherwise: a bf16 matmul from M = 9 on. The int4pack kernel's time grows
  linearly with M (it reads the codes once per row block); the dense matmul's does not. The copy is held in
  oneDNN's blocked layout for its linear kernel (`_onednn_pack`: reordered once at load; `F.linear` on a plain copy reorders it in every call),
  which measured 1.3-2x `F.linear` at every M on the default model's shapes: one layer's four matmuls at M = 16
  0.24 ms against 0.45 ms (int4pack), at M = 64 0.66 ms against 1.01 ms (plain copy); int4pack stays ahead up
  to M = 8 (0.18 against 0.20 ms). The copy holds the dequantized values rounded to bf16, exactly what the
  chunked dequant path computes with, and the blocked kernel gives the plain matmul's results bit for bit.
- the same on a CPU without native bf16: the copy is float32 (twice the memory; the values rounded to bf16,
  as the bf16 copy holds them) and it takes over from M = 16. Where the CPU has AVX2 and FMA the copy is held in
  the panels of `kernels.native_matmul.gemm_pack` and multiplied by the C kernel `gemm_f32w` (bf16 x and y, float32
  sums rounded once): the default model's 30 layers of weights at M = 16 / 64 / 128 / 256 on a 2-core AVX2
  machine, 35 / 84 / 163 / 310 ms against oneDNN's float32 kernel on its blocked layout 43 / 110 / 219 / 375
  (one process, alternating). Elsewhere x is converted to float32 for oneDNN's kernel.
- float32 x on the LM head (`linear_f32`, M >= 16, the same CPUs): the head's float32 panels keep its values
  unrounded (`prepack(exact=True)`) and the kernel returns float32 sums: the logits exact to float32 summation,
  with no bf16 logits to widen or refine (64 rows: 29-32 against 35-41 ms on the 2-core AVX2 machine).

Tensors here are duck-typed `QuantizedTensor`s (see kernels.quant); this module imports nothing of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import native_matmul
from kernels.cpu_features import native_bf16

if TYPE_CHECKING:
    from kernels.quant import QuantizedTensor

INT4PACK_MAX_M = 127  # int4 bf16: the int4pack kernel below M = 128, chunked dequant + matmul from there
INT8_SPLIT_MAX_M = 8  # grouped int8 bf16: two int4pack matmuls up to here
INT8PACK_MAX_M = 8  # per-channel int8 bf16: aten's int8pack kernel up to here
DENSE_MIN_M = 9  # with a dense bf16 copy held: the dense matmul from here on (the int8 kernels stop at 8)
DENSE_F32_MIN_M = 16  # with a dense float32 copy held (no native bf16): the dense matmul from here on
Q4_BF16_MAX_M = 4  # with native bf16: the AVX2 int4 kernel up to here (int4pack is ahead from 8 rows)
Q4B_MAX_M = 64  # with native bf16 and the AVX512-BF16 int4 kernel: it up to here (the dense copy above)
FUSED_DENSE_MAX_M = 4096  # the most tokens of a step the fused layers take with the dense bf16 kernel (their buffers)
CHUNK_ELEMS = 1 << 20  # weight elements dequantized per step: 4 MiB float32 + 2 MiB bf16, in L3 (32 MiB)
_INT4PACK_GROUPS = (256, 128, 64, 32)  # group sizes the aten int4pack kernel accepts


def dense_dtype() -> torch.dtype:
    """The dtype of the dense copy of a weight (and of the dequantizing path's matmul) for a bf16 model: bf16
    where the CPU multiplies it natively, float32 elsewhere."""
    return torch.bfloat16 if native_bf16() else torch.float32


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


def dequant_mm(x: Tensor, w: QuantizedTensor, compute: torch.dtype | None = None) -> Tensor:
    """x `[M, K]` @ W^T -> `[M, N]` in x.dtype, dequantizing W a chunk of rows at a time to `compute` (default:
    x.dtype, except a bf16 x on a CPU without native bf16: float32, see `dense_dtype`) and multiplying in it."""
    if compute is None:
        compute = dense_dtype() if x.dtype == torch.bfloat16 and x.device.type == "cpu" else x.dtype
    out_dtype = x.dtype

    def rows_of(r0: int, r1: int) -> Tensor:  # a bf16 x multiplies with the weight rounded to bf16 either way
        return dequantize_rows(w, r0, r1).to(out_dtype).to(compute)

    x = x.to(compute)
    n, k = w.shape
    rows = max(16, CHUNK_ELEMS // k)
    if n <= rows:
        return F.linear(x, rows_of(0, n)).to(out_dtype)
    # y^T [N, M]: each chunk of weight rows writes a contiguous block of rows of y^T.
    yt = torch.empty(n, x.shape[0], dtype=compute, device=x.device)
    xt = x.t()  # [K, M]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(rows_of(r0, r1), xt, out=yt[r0:r1])
    return yt.t().to(out_dtype).contiguous()


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
    if not native_matmul.gemv_available():
        return None
    return native_matmul.q8_gemv(x.contiguous(), w.qweight, w.scales, _q8_sums(w))


def _q8_avx2_ok(w: QuantizedTensor) -> bool:
    """Whether the AVX2 int8 kernel can take this weight: on this CPU, float32 scales, no code of -128 (checked
    once per weight)."""
    hit = w.packed.get("q8avx2")
    if hit is None:
        ok = native_matmul.quant_avx2_available() and w.scales.dtype == torch.float32 and int(w.qweight.min()) > -128
        hit = w.packed["q8avx2"] = (torch.tensor(ok),)
    return bool(hit[0])


def q4b_layout(w: QuantizedTensor) -> tuple[Tensor, Tensor] | None:
    """This weight in the layout of the AVX512-BF16 int4 kernel (`native_matmul.q4b_pack`, built once), or None where that
    kernel does not take it: not int4 with groups of 32 and zeros, or a CPU without native bf16 or the kernel."""
    hit = w.packed.get("q4b")
    if hit is None:
        ok = (w.kind == "int4" and w.group_size == 32 and w.zeros is not None and native_bf16()
              and native_matmul.q4b_available() and w.shape[1] <= native_matmul.QMAX_K)
        hit = w.packed["q4b"] = native_matmul.q4b_pack(w.qweight, w.scales, w.zeros) if ok else ()
    return (hit[0], hit[1]) if hit else None


def q8t_layout(w: QuantizedTensor) -> tuple[Tensor, Tensor] | None:
    """This weight in the layout of the tiled int8 kernel (`native_matmul.q8t_pack`, built once), or None where that
    kernel does not take it: not int8 with groups of 32, or a CPU without native bf16 or the kernel."""
    hit = w.packed.get("q8t")
    if hit is None:
        ok = (w.kind == "int8" and w.group_size == 32 and w.shape[1] <= native_matmul.QMAX_K and native_bf16()
              and native_matmul.q8t_available())
        hit = w.packed["q8t"] = native_matmul.q8t_pack(w.qweight, w.scales) if ok else ()
    return (hit[0], hit[1]) if hit else None


def dense_min_rows(w: QuantizedTensor) -> int:
    """The first M from which `linear` multiplies by the weight's dense copy, when one is held (float32 copy:
    DENSE_F32_MIN_M; bf16: DENSE_MIN_M, or past the rows of the AVX512-BF16 int4 kernel or of the tiled int8 one
    where that takes the weight)."""
    dense = w.packed.get("dense")
    if dense is not None and dense[0].dtype != torch.bfloat16:
        return DENSE_F32_MIN_M
    if w.kind == "int4" and _paired(w):
        return native_matmul.gemm_bf16w_min_rows()
    if w.kind == "int4" and q4b_layout(w) is not None:
        return Q4B_MAX_M + 1
    return native_matmul.Q8T_MAX_M + 1 if q8t_layout(w) is not None else DENSE_MIN_M


def q4_max_rows(w: QuantizedTensor) -> int:
    """The most rows of x `linear` gives one of the C int4 kernels for this weight (0: it never does): the
    AVX512-BF16 one (`q4b_layout`) where it runs, else the AVX2 one."""
    if w.kind != "int4":
        return 0
    if q4b_layout(w) is not None:
        return min(Q4B_MAX_M, dense_min_rows(w) - 1) if "dense" in w.packed else Q4B_MAX_M
    if not _q4_avx2_ok(w):
        return 0
    rows = Q4_BF16_MAX_M if native_bf16() else native_matmul.Q4_MAX_M
    dense = w.packed.get("dense")
    if dense is None:
        return rows
    return min(rows, dense_min_rows(w) - 1)


def fused_max_rows(w: QuantizedTensor) -> int:
    """The most rows of a step `native.decode_layers` takes for this weight (0: it never does): where the
    AVX512-BF16 int4 kernel takes it, FUSED_DENSE_MAX_M with a dense copy in the bf16 kernel's panels (which takes
    every M from `dense_min_rows`, prompt steps at every M, as `linear` gives them to it), else Q4B_MAX_M;
    otherwise `q4_max_rows`."""
    if w.kind == "int4" and q4b_layout(w) is not None:
        return FUSED_DENSE_MAX_M if _paired(w) else Q4B_MAX_M
    return q4_max_rows(w)


def _paired(w: QuantizedTensor) -> bool:
    """Whether the weight's dense copy is held in the bf16 paired panels of `native_matmul.gemm_bf16w`."""
    dense = w.packed.get("dense")
    return dense is not None and dense[0].dim() == 4


def _q4_avx2_ok(w: QuantizedTensor) -> bool:
    """Whether the AVX2 int4 kernel takes this weight: groups of 32, float32 scales and zeros, on a CPU with AVX2
    (checked once per weight; `q4_max_rows` says up to how many rows)."""
    hit = w.packed.get("q4avx2")
    if hit is None:
        ok = (native_matmul.quant_avx2_available() and w.group_size == 32
              and w.scales.dtype == torch.float32 and w.zeros is not None and w.zeros.dtype == torch.float32
              and w.qweight.is_contiguous() and w.scales.is_contiguous() and w.zeros.is_contiguous())
        hit = w.packed["q4avx2"] = (torch.tensor(ok),)
    return bool(hit[0])


def _int8pack_ok(w: QuantizedTensor) -> bool:
    # The kernel gives wrong results (or crashes) for K not a multiple of 16: keep to multiples of 32.
    return w.group_size == w.shape[1] and w.shape[1] % 32 == 0


def linear(x: Tensor, w: QuantizedTensor, prompt: bool = False) -> Tensor:
    """x `[M, K]` @ W^T -> `[M, N]` in x.dtype by the fastest exact-enough path for this dtype and M.

    `prompt`: the step computes prompt tokens. Where the AVX512-BF16 int4 kernel takes the weight and a dense copy
    is held, such a step then multiplies by the dense copy at every M, as a whole prompt's step does: the two
    differ by the rounding of the weights to bf16, enough to change the first token of a prompt whose two best
    candidates are within ~0.1 nats, and a prompt's K/V and first token must not depend on how much of it the
    prefix cache held. Decode steps and verify passes (single-token entries) take the kernel."""
    m = x.shape[0]
    if x.dtype == torch.bfloat16 and x.is_cpu and m > 0:
        dense = w.packed.get("dense")
        if prompt and w.kind == "int4" and dense is not None and q4b_layout(w) is not None:
            return dense_mm(x, dense[0])
        if dense is not None and m >= dense_min_rows(w):
            return dense_mm(x, dense[0])
        if w.kind == "int4" and m <= Q4B_MAX_M:
            q4b = q4b_layout(w)
            if q4b is not None:
                y = native_matmul.q4b_gemm(x.contiguous(), q4b[0], q4b[1], w.shape[0])
                if y is not None:
                    return y
        if w.kind == "int4":
            if m <= q4_max_rows(w):
                y = native_matmul.q4_gemm(x.contiguous(), w.qweight, w.scales, w.zeros, checked=True)
                if y is not None:
                    return y
            if m <= INT4PACK_MAX_M and _int4pack_group(w) == w.group_size:
                return int4pack_mm(x, w)
        elif w.group_size == w.shape[1]:
            if m <= INT8PACK_MAX_M and _int8pack_ok(w):
                return int8pack_mm(x, w)
        else:
            q8t = q8t_layout(w) if m <= native_matmul.Q8T_MAX_M else None
            y = native_matmul.q8t_gemm(x.contiguous(), q8t[0], q8t[1], w.shape[0]) if q8t is not None else None
            if y is not None:
                return y
            y = _q8_gemv(x, w) if m <= native_matmul.GEMV_MAX_M and w.group_size == 32 else None
            if y is None and m <= native_matmul.QUANT_MAX_M and w.group_size == 32 and _q8_avx2_ok(w):
                y = native_matmul.q8_gemm(x.contiguous(), w.qweight, w.scales)
            if y is not None:
                return y
            if m <= INT8_SPLIT_MAX_M and _int4pack_group(w) is not None:
                return int8_split_mm(x, w)
    return dequant_mm(x, w)


def linear_f32(x: Tensor, w: QuantizedTensor) -> Tensor | None:
    """float32 x `[M, K]` @ W^T in float32, nothing rounded to bf16, where the weight's float32 panels (the dense
    copy `prepack(exact=True)` holds on CPUs with AVX2 and without native bf16) make it the batched path's own
    speed: M >= DENSE_F32_MIN_M. The LM head's logits then need no float32 refinement of their leading candidates.
    None otherwise (the caller takes `linear`)."""
    dense = w.packed.get("dense")
    if dense is None or dense[0].dim() != 3 or x.dtype != torch.float32 or x.shape[0] < DENSE_F32_MIN_M:
        return None
    return native_matmul.gemm_f32w(x, dense[0])


def _onednn_pack(dense: Tensor) -> Tensor:
    """`dense` [N, K] (bf16 or float32) in oneDNN's blocked layout for its linear kernel, or `dense` itself where
    torch has no oneDNN (`dense_mm` takes either). Float32 too: 1.5-2x the plain `F.linear` (which repacks the
    weight in every call) at M = 8-128 on a 2-core AVX2 machine, twelve 3072x576 weights."""
    if not torch.backends.mkldnn.is_available():
        return dense
    try:
        return torch.ops.mkldnn._reorder_linear_weight(dense, 64)  # 64: the batch it is laid out for (a hint)
    except (AttributeError, RuntimeError):
        return dense


def dense_mm(x: Tensor, dense: Tensor) -> Tensor:
    """x `[M, K]` @ the dense copy^T (plain or oneDNN-blocked, see `_onednn_pack`, or float32 panels of
    `native_matmul.gemm_pack`; bf16 or float32, x converted to its dtype) -> `[M, N]` in x.dtype."""
    if dense.dim() == 4:  # bf16 paired panels: the AVX512-BF16 kernel takes bf16 x; anything else the plain weight
        n = dense.shape[0] * native_matmul.GEMM_PANEL
        y = native_matmul.gemm_bf16w(x, dense, n) if x.dtype == torch.bfloat16 else None
        if y is not None:
            return y
        return F.linear(x, native_matmul.gemm_unpack_bf16(dense, n).to(x.dtype))
    if dense.dim() == 3:  # float32 panels: the AVX2 kernel takes bf16 x; anything else multiplies the plain weight
        y = native_matmul.gemm_f32w(x, dense)
        if y is not None:
            return y
        return F.linear(x.float(), native_matmul.gemm_unpack(dense)).to(x.dtype)
    if dense.dtype != x.dtype:
        return dense_mm(x.to(dense.dtype), dense).to(x.dtype)
    if dense.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], "")
    return F.linear(x, dense)


def dense_bytes(w: QuantizedTensor, dtype: torch.dtype | None = None) -> int:
    """What a dense copy of `w` in `dtype` (default: `dense_dtype()`) takes."""
    return (dtype or dense_dtype()).itemsize * w.shape[0] * w.shape[1]


def prepack(w: QuantizedTensor, dense: bool = False, dtype: torch.dtype | None = None, exact: bool = False) -> None:
    """Build the cached layouts the bf16 fast paths of `linear` use for this weight (`dense`: also a dense
    copy in `dtype`, default `dense_dtype()`, for batched steps; `exact`: a float32 copy keeps the dequantized
    values unrounded, for `linear_f32`: the LM head)."""
    if dense and "dense" not in w.packed:
        # the values rounded to bf16 otherwise: a float32 copy multiplies with what a bf16 one holds (products
        # of bf16 values are exact in float32), so both kinds of CPU compute with the same weights
        values = dequantize_rows(w, 0, w.shape[0])
        if not (exact and (dtype or dense_dtype()) == torch.float32):
            values = values.to(torch.bfloat16)
        values = values.to(dtype or dense_dtype())
        if values.dtype == torch.float32 and w.shape[0] % native_matmul.GEMM_PANEL == 0 and native_matmul.gemm_available():
            w.packed["dense"] = (native_matmul.gemm_pack(values),)
        elif (values.dtype == torch.bfloat16 and w.shape[0] % native_matmul.GEMM_PANEL == 0 and w.shape[1] % 2 == 0
              and native_matmul.gemm_bf16w_available()):
            w.packed["dense"] = (native_matmul.gemm_pack_bf16(values),)
        else:
            w.packed["dense"] = (_onednn_pack(values),)
    held = w.packed.get("dense")
    if w.kind == "int4":
        q4b_layout(w)  # the AVX512-BF16 int4 kernel's layout where it takes the weight, built now
    below = dense_min_rows(w) - 1 if held else None
    if w.kind == "int4" and _int4pack_group(w) == w.group_size and not (held and q4_max_rows(w) >= below):
        _int4pack(w)  # with a dense copy and the AVX2 int4 kernel below it, int4pack would serve no batch size
    elif w.kind == "int8" and w.group_size == w.shape[1] and _int8pack_ok(w):
        int8pack_mm(torch.zeros(1, w.shape[1], dtype=torch.bfloat16), w)
    elif w.kind == "int8" and w.group_size == 32 and q8t_layout(w) is not None:
        pass  # the tiled int8 kernel's layout, built by the check
    elif w.kind == "int8" and w.group_size == 32 and native_matmul.gemv_available():
        _q8_sums(w)
    elif w.kind == "int8" and _int4pack_group(w) is not None:
        _int8_split(w)
