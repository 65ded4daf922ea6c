"""The C matrix products (kernels/cpu/quant.c, kernels/cpu/gemm.c and the int8 kernels of kernels/cpu/decode.c)
through ctypes: the int8 and int4 kernels for a few rows of bf16 activations, the tiled layouts of the AVX512
ones, the float32-weight panels of the AVX2 dense kernel and the exact refinement of the LM head's leading logits.
`kernels.quant_cpu` decides which one a product takes; the library itself is `kernels.native`'s (built, cached and
loaded there). Each wrapper returns None (or False) when the kernel cannot take its arguments."""

from __future__ import annotations

import functools

import torch

from kernels.native import library, usable

GEMV_MAX_M = 8  # rows of x the int8 matrix-vector kernel takes


def gemv_available() -> bool:
    """Whether the int8 matrix-vector kernel exists on this CPU (it needs AVX512-VNNI)."""
    lib = library()
    return lib is not None and bool(lib.q8_gemv_available())


def q8_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, scaled_sums: torch.Tensor
            ) -> torch.Tensor | None:
    """bf16 x `[M, K]` (M <= GEMV_MAX_M) @ an int8 weight with groups of 32 (codes int8 `[N, K]`, scales float32
    `[N, K//32]`, scaled_sums = scales * the sum of each group's codes) -> bf16 `[M, N]`. None when the kernel
    cannot take it."""
    if not gemv_available() or not usable(x, codes, scales, scaled_sums):
        return None
    m, k = x.shape
    y = torch.empty(m, codes.shape[0], dtype=torch.bfloat16)
    rc = library().q8_gemv_bf16(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), scaled_sums.data_ptr(),
                                y.data_ptr(), m, codes.shape[0], k, torch.get_num_threads())
    return y if rc == 0 else None


Q8T_MAX_M = 64  # rows of x the tiled AVX512-VNNI int8 kernel takes (on the default model's head ~2x the dense copy at 64)


def q8t_available() -> bool:
    """Whether the tiled int8 kernel (`q8t_gemm`: AVX512-VNNI and AVX512-BF16) exists on this CPU."""
    lib = library()
    return lib is not None and bool(lib.q8t_available())


def q8t_pack(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight with groups of 32 (codes int8 `[N, K]`, scales float32 `[N, K//32]`) in the tiled layout
    `q8t_gemm` reads (kernels/cpu/decode.c): codes int8 `[tiles, groups, 8, 16, 4]` (16 weight rows a tile; chunk c
    of a group holds each row's codes at k = 4 c .. 4 c + 3 of the group) and float32 `[tiles, groups, 2, 16]` (the
    scales, then 128 * scale * the group's sum of codes). Rows past N are zero."""
    n, k = codes.shape
    groups, tiles = k // 32, (n + 15) // 16
    c = torch.zeros(tiles * 16, k, dtype=torch.int8)
    c[:n] = codes
    packed = c.view(tiles, 16, groups, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    d = torch.zeros(tiles * 16, groups, dtype=torch.float32)
    s128 = torch.zeros(tiles * 16, groups, dtype=torch.float32)
    d[:n] = scales.float()
    s128[:n] = 128 * scales.float() * codes.view(n, groups, 32).sum(-1, dtype=torch.int32).float()
    dss = torch.stack((d.view(tiles, 16, groups), s128.view(tiles, 16, groups)), dim=2)  # [tile, 16, 2, group]
    return packed, dss.permute(0, 3, 2, 1).contiguous()


def q8t_gemm(x: torch.Tensor, codes: torch.Tensor, dss: torch.Tensor, n: int) -> torch.Tensor | None:
    """bf16 x `[M, K]` (M <= Q8T_MAX_M, contiguous) @ an int8 weight of N rows in `q8t_pack`'s layout -> bf16
    `[M, N]`, x quantized to int8 by groups of 32 as `q8_gemv` does. None when the kernel cannot take it."""
    lib = library()
    if lib is None:
        return None
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.q8t_gemm_bf16(x.data_ptr(), codes.data_ptr(), dss.data_ptr(), y.data_ptr(), m, n, k,
                           torch.get_num_threads())
    return y if rc == 0 else None


REFINE_MAX_K = 64  # the most leading candidates `refine_top_q8` recomputes a row


def _refine_fits(logits: torch.Tensor, logits_dtype: torch.dtype, hidden: torch.Tensor, codes: torch.Tensor,
                 scales: torch.Tensor) -> bool:
    """Whether the refine kernels take these: logits `[S, V]` of `logits_dtype`, hidden float32 `[S, H]`, an int8
    head `[V, H]` with float32 scales, all contiguous on the CPU with the C kernels loaded."""
    return (library() is not None and logits.dtype == logits_dtype and hidden.dtype == torch.float32
            and codes.dtype == torch.int8 and scales.dtype == torch.float32 and usable(logits, hidden, codes, scales)
            and logits.shape[0] == hidden.shape[0] and logits.shape[1] == codes.shape[0]
            and hidden.shape[1] == codes.shape[1])


def refine_top_q8(logits: torch.Tensor, hidden: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  k: int) -> bool:
    """In place: each row of logits (float32 `[S, V]`) gets, at its k largest entries (ties: the lower index), the
    float32 dot product of its row of hidden (float32 `[S, H]`) with that row of an int8 head with groups of 32
    (codes int8 `[V, H]`, scales float32 `[V, H//32]`), each weight dequantized to float32 first. False when the
    kernel cannot take it (nothing changed then)."""
    if not _refine_fits(logits, torch.float32, hidden, codes, scales):
        return False
    return library().refine_top_q8(logits.data_ptr(), hidden.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                                   logits.shape[0], logits.shape[1], hidden.shape[1], k, torch.get_num_threads()) == 0


def refine_top_q8_bf16(logits: torch.Tensor, hidden: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       k: int) -> torch.Tensor | None:
    """`refine_top_q8` from the head's bf16 logits `[S, V]`: a new float32 `[S, V]`, each row widened and refined in
    one pass (the same values as `logits.float()` then `refine_top_q8`). None when the kernel cannot take it."""
    if not _refine_fits(logits, torch.bfloat16, hidden, codes, scales):
        return None
    out = torch.empty(logits.shape, dtype=torch.float32)
    rc = library().refine_top_q8_bf16(out.data_ptr(), logits.data_ptr(), hidden.data_ptr(), codes.data_ptr(),
                                      scales.data_ptr(), logits.shape[0], logits.shape[1], hidden.shape[1], k,
                                      torch.get_num_threads())
    return out if rc == 0 else None


QUANT_MAX_M = 16  # rows of x the AVX2 int8 kernel takes


def quant_avx2_available() -> bool:
    """Whether the AVX2 int8 matrix-product kernel exists on this CPU (it needs AVX2 and FMA)."""
    lib = library()
    return lib is not None and bool(lib.quant_avx2_available())


def q8_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """bf16 x `[M, K]` (M <= QUANT_MAX_M) @ an int8 weight with groups of 32 (codes int8 `[N, K]` in -127..127,
    scales float32 `[N, K//32]`) -> bf16 `[M, N]`, x quantized to int8 by groups of 32. None when the kernel
    cannot take it."""
    if not quant_avx2_available() or not usable(x, codes, scales):
        return None
    m, k = x.shape
    y = torch.empty(m, codes.shape[0], dtype=torch.bfloat16)
    rc = library().q8_gemm_bf16(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), y.data_ptr(), m,
                                codes.shape[0], k, torch.get_num_threads())
    return y if rc == 0 else None


Q4_MAX_M = 16  # rows of x the AVX2 int4 kernel takes


def q4_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, checked: bool = False
            ) -> torch.Tensor | None:
    """bf16 x `[M, K]` (M <= Q4_MAX_M) @ an int4 weight with groups of 32 (codes nibble-packed uint8 `[N, K//2]`,
    even k in the low nibble; w = code * scale + zero, scales and zeros float32 `[N, K//32]`) -> bf16 `[M, N]`,
    x quantized to int16 by groups of 32. None when the kernel cannot take it. `checked`: the caller knows the CPU
    has the kernel, the weight's tensors are contiguous on the CPU and x is too (a decode step's 120 calls skip
    the checks: kernels.quant_cpu caches them per weight)."""
    lib = library()
    if lib is None or not checked and (not lib.quant_avx2_available() or not usable(x, codes, scales, zeros)):
        return None
    m, k = x.shape
    y = torch.empty(m, codes.shape[0], dtype=torch.bfloat16)
    rc = lib.q4_gemm_bf16(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), y.data_ptr(), m,
                          codes.shape[0], k, torch.get_num_threads())
    return y if rc == 0 else None


Q4B_MAX_M = 64  # rows of x the AVX512-BF16 int4 kernel takes
QMAX_K = 16384  # the most columns (K) the int4 and int8 kernels of quant.c take


def q4b_available() -> bool:
    """Whether the AVX512-BF16 int4 matrix-product kernel (`q4b_gemm`) exists on this CPU."""
    lib = library()
    return lib is not None and bool(lib.q4b_available())


def q4b_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 weight with groups of 32 (codes nibble-packed uint8 `[N, K//2]`, even k in the low nibble; scales
    and zeros float32 `[N, K//32]`) in the tiled layout `q4b_gemm` reads (kernels/cpu/quant.c): codes uint8
    `[tiles, groups, 4, 64]` (16 weight rows a tile; in each 64-byte chunk, nibble j of 16-bit word w is the code
    of row w // 2 at k = 8 c + 2 j + w % 2 of the group) and float32 `[tiles, groups, 2, 16]` (the scales, then
    zero - 16 * scale), or, where every scale and zero is exact in fp16 (GGUF stores them so), fp16 `[tiles,
    groups, 2, 16]` (the scales, then the zeros: the kernel forms zero - 16 * scale). Rows past N are zero."""
    n, half = codes.shape
    k = 2 * half
    groups, tiles = k // 32, (n + 15) // 16
    c = torch.zeros(tiles * 16, k, dtype=torch.uint8)
    c[:n, 0::2] = codes & 15
    c[:n, 1::2] = codes >> 4
    # [tile, row i, group, chunk, j, e] -> [tile, group, chunk, word (i, e), j]
    c = c.view(tiles, 16, groups, 4, 4, 2).permute(0, 2, 3, 1, 5, 4).reshape(tiles, groups, 4, 32, 4)
    packed = (c[..., 0::2] | (c[..., 1::2] << 4)).reshape(tiles, groups, 4, 64).contiguous()
    sf, zf = scales.float(), zeros.float()
    exact16 = all(torch.equal(v.half().float(), v) for v in (sf, zf))  # no rounding, no overflow to inf
    d = torch.zeros(tiles * 16, groups, dtype=torch.float32)
    mz = torch.zeros(tiles * 16, groups, dtype=torch.float32)
    d[:n] = sf
    mz[:n] = zf if exact16 else zf - 16 * sf
    dm = torch.stack((d.view(tiles, 16, groups), mz.view(tiles, 16, groups)), dim=2)  # [tile, 16, 2, group]
    dm = dm.permute(0, 3, 2, 1).contiguous()
    return packed, dm.half() if exact16 else dm


def q4b_gemm(x: torch.Tensor, codes: torch.Tensor, dm: torch.Tensor, n: int) -> torch.Tensor | None:
    """bf16 x `[M, K]` (M <= Q4B_MAX_M, contiguous) @ an int4 weight of N rows in `q4b_pack`'s layout -> bf16
    `[M, N]`. None when the kernel cannot take it."""
    lib = library()
    if lib is None:
        return None
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.q4b_gemm_bf16(x.data_ptr(), codes.data_ptr(), dm.data_ptr(), int(dm.dtype == torch.float16),
                           y.data_ptr(), m, n, k, torch.get_num_threads())
    return y if rc == 0 else None


GEMM_PANEL = 16  # output columns of one panel of `gemm_pack`'s layout (kernels/cpu/gemm.c)


def gemm_available() -> bool:
    """Whether the AVX2 dense float32-weight kernel (`gemm_f32w`) exists on this CPU (it needs AVX2 and FMA)."""
    lib = library()
    return lib is not None and bool(lib.gemm_f32w_available())


def gemm_pack(w: torch.Tensor) -> torch.Tensor:
    """A float32 weight `[N, K]` (N a multiple of GEMM_PANEL) in the panels `gemm_f32w` reads: `[N/16, K, 16]`,
    panel p's row k holding W[16p .. 16p + 15, k]."""
    n, k = w.shape
    return w.float().reshape(n // GEMM_PANEL, GEMM_PANEL, k).transpose(1, 2).contiguous()


def gemm_unpack(wp: torch.Tensor) -> torch.Tensor:
    """`gemm_pack`'s panels back to the weight `[N, K]` (a copy)."""
    panels, k, width = wp.shape
    return wp.transpose(1, 2).reshape(panels * width, k)


def gemm_f32w(x: torch.Tensor, wp: torch.Tensor) -> torch.Tensor | None:
    """x `[M, K]` (rows may be strided) @ W^T for a float32 weight in `gemm_pack`'s panels -> `[M, N]` in x's
    dtype: for bf16 x the float32 sum of the products rounded once, for float32 x the float32 sum (no rounding:
    the LM head's exact logits). None when the kernel cannot take it (no AVX2 and FMA, x neither bf16 nor float32
    on the CPU with unit column stride, shapes that do not match)."""
    lib = library()
    if (lib is None or x.dtype not in (torch.bfloat16, torch.float32) or wp.dtype != torch.float32 or x.dim() != 2
            or wp.dim() != 3 or not x.is_cpu or x.stride(1) != 1 or not wp.is_contiguous()
            or wp.shape[2] != GEMM_PANEL or wp.shape[1] != x.shape[1]):
        return None
    m, k = x.shape
    n = wp.shape[0] * GEMM_PANEL
    y = torch.empty(m, n, dtype=x.dtype)
    fn = lib.gemm_f32w_f32 if x.dtype == torch.float32 else lib.gemm_f32w_bf16
    rc = fn(x.data_ptr(), x.stride(0), wp.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
    return y if rc == 0 else None


def gemm_bf16w_available() -> bool:
    """Whether the dense bf16-weight kernel (`gemm_bf16w`) exists on this CPU (it needs AVX512-BF16)."""
    lib = library()
    return lib is not None and bool(lib.gemm_bf16w_available())


@functools.cache
def gemm_bf16w_min_rows() -> int:
    """From how many rows of x `linear` (and the fused decode layers) take `gemm_bf16w` over the int4 kernel where
    the weight's dense copy is held in its panels (kernels/cpu/gemm.c: GEMM_BF16W_MIN_ROWS)."""
    lib = library()
    return int(lib.gemm_bf16w_min_rows()) if lib is not None else 1 << 62


def gemm_pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """A weight `[N, K]` (K even) as bf16 in the paired panels `gemm_bf16w` reads: `[ceil(N/16), K/2, 16, 2]`,
    panel p's pair j, lane c holding W[16p + c, 2j] and W[16p + c, 2j + 1] (rows past N zero)."""
    n, k = w.shape
    panels = -(-n // GEMM_PANEL)
    w = w.to(torch.bfloat16)
    if panels * GEMM_PANEL != n:
        w = torch.cat([w, w.new_zeros(panels * GEMM_PANEL - n, k)])
    return w.reshape(panels, GEMM_PANEL, k // 2, 2).transpose(1, 2).contiguous()


def gemm_unpack_bf16(wp: torch.Tensor, n: int) -> torch.Tensor:
    """`gemm_pack_bf16`'s panels back to the weight `[n, K]` (a copy)."""
    panels, pairs, width, _ = wp.shape
    return wp.transpose(1, 2).reshape(panels * width, pairs * 2)[:n].clone()


def gemm_bf16w(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor | None:
    """bf16 x `[M, K]` (rows may be strided) @ W^T for a weight `[n, K]` in `gemm_pack_bf16`'s panels -> bf16 `[M,
    n]`: the float32 sum of exact products rounded once. None when the kernel cannot take it (no AVX512-BF16, x
    not bf16 on the CPU with unit column stride, shapes that do not match)."""
    lib = library()
    if (lib is None or x.dtype != torch.bfloat16 or wp.dtype != torch.bfloat16 or x.dim() != 2 or wp.dim() != 4
            or not x.is_cpu or x.stride(1) != 1 or not wp.is_contiguous() or wp.shape[2] != GEMM_PANEL
            or wp.shape[1] * 2 != x.shape[1] or not 0 < n <= wp.shape[0] * GEMM_PANEL):
        return None
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    rc = lib.gemm_bf16w_bf16(x.data_ptr(), x.stride(0), wp.data_ptr(), y.data_ptr(), n, m, n, k,
                             torch.get_num_threads())
    return y if rc == 0 else None
