"""SGMV as two Triton kernels: the GPU path of `kernels.lora` (same math, same arguments).

Work is cut into row tiles: every segment with an adapter is split into tiles of BLOCK_M rows, so a tile
never spans two segments, a one-token segment costs one tile and skewed segment lengths launch no
idle programs. A tile carries its slot; a slot's weights are found through tables of data pointers, so
adapters of different ranks, each in its own allocation, run in one launch with neither stacking nor
padding of their weights.

- shrink: `t[rows, :r] = x[rows] @ A^T` into a float32 `t [T, R]` (R = the largest rank in the launch);
  grid (tiles, rank blocks, K splits). A decode-shaped batch has few tiles, so the long `in` dimension is
  split over several programs whose partial sums are added atomically.
- expand: `y[rows, slice] += t[rows, slice ranks] @ B^T[slice ranks, slice]` per output slice; grid (tiles,
  column blocks, slices). A fused q/k/v or gate/up weight (`SlicedWeights`) reads only its diagonal
  blocks of B^T; a plain pair is one slice over all columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.lora import LoraSegments, SlicedWeights, SlotWeights, check_segments
from kernels.triton.common import MIN_DOT, block, check_device, check_launchable, dot_dtype, float_dtype

SPLIT_K_TARGET = 64  # shrink programs wanted before splitting K stops paying
MIN_K_PER_SPLIT = 256


@triton.jit
def _shrink_kernel(x_ptr, t_ptr, tiles_ptr, a_ptrs, ranks_ptr,
                   K, stride_xm, stride_xk, stride_tm,
                   W_DTYPE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    tile, pid_r, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(tiles_ptr + 3 * tile)
    row1 = tl.load(tiles_ptr + 3 * tile + 1)
    slot = tl.load(tiles_ptr + 3 * tile + 2)
    rank = tl.load(ranks_ptr + slot)
    if pid_r * BLOCK_R >= rank:  # this slot has no weights here, or a smaller rank than the launch's largest
        return
    a_ptr = tl.load(a_ptrs + slot).to(tl.pointer_type(W_DTYPE))  # A^T [K, rank], contiguous
    rows = row0 + tl.arange(0, BLOCK_M)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < row1
    r_ok = r < rank
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + k[:, None] * rank + r[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.dot(x.to(DOT), a.to(DOT), input_precision=PRECISION)
    out = t_ptr + rows[:, None] * stride_tm + r[None, :]
    mask = row_ok[:, None] & r_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _expand_kernel(t_ptr, y_ptr, tiles_ptr, b_ptrs, slice_rank_off_ptr, slice_rank_ptr, out_off_ptr, out_size_ptr,
                   N, stride_tm, stride_ym, stride_yn, NUM_SLICES,
                   W_DTYPE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    tile, pid_n, sl = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row0 = tl.load(tiles_ptr + 3 * tile)
    row1 = tl.load(tiles_ptr + 3 * tile + 1)
    slot = tl.load(tiles_ptr + 3 * tile + 2)
    r_off = tl.load(slice_rank_off_ptr + slot * NUM_SLICES + sl)
    r_n = tl.load(slice_rank_ptr + slot * NUM_SLICES + sl)
    o_off = tl.load(out_off_ptr + sl)
    o_n = tl.load(out_size_ptr + sl)
    if (r_n == 0) | (pid_n * BLOCK_N >= o_n):  # no LoRA on this slice, or past its columns
        return
    b_ptr = tl.load(b_ptrs + slot).to(tl.pointer_type(W_DTYPE))  # B^T [rank, N], contiguous
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row1
    col_ok = cols < o_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, r_n, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        j_ok = j < r_n
        t = tl.load(t_ptr + rows[:, None] * stride_tm + (r_off + j)[None, :],
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (r_off + j)[:, None] * N + (o_off + cols)[None, :],
                    mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(t.to(DOT), b.to(DOT), input_precision=PRECISION)
    y_at = y_ptr + rows[:, None] * stride_ym + (o_off + cols)[None, :] * stride_yn
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_at, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _check(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, weights: Sequence[SlotWeights]
           ) -> tuple[list[int], torch.dtype | None]:
    """Validate every operand; returns the slots with weights and the weights' dtype."""
    float_dtype(y, "sgmv output y")
    float_dtype(x, "sgmv input x")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"sgmv needs x [T, in] and y [T, out], got x {list(x.shape)} and y {list(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sgmv x has {x.shape[0]} rows but y has {y.shape[0]}")
    check_device("sgmv output y", y, x.device)
    check_segments(seg, x.shape[0], len(weights))
    used: list[int] = []
    w_dtype = None
    for slot, w in enumerate(weights):
        if w is None:
            continue
        what = f"LoRA slot {slot}"
        if not isinstance(w, tuple) or len(w) != 2:
            raise TypeError(f"{what}: weights must be a pair (A^T, B^T) or None, got {type(w).__name__}")
        a_t, b_t = w
        float_dtype(a_t, f"{what} A^T")
        float_dtype(b_t, f"{what} B^T")
        if a_t.dtype != b_t.dtype or (w_dtype is not None and a_t.dtype != w_dtype):
            raise TypeError(f"{what}: the LoRA weights of one launch need one dtype, got A^T {a_t.dtype}, "
                            f"B^T {b_t.dtype}" + (f", earlier slots {w_dtype}" if w_dtype else ""))
        w_dtype = a_t.dtype
        if a_t.dim() != 2 or b_t.dim() != 2 or a_t.shape[0] != x.shape[1] or b_t.shape[1] != y.shape[1] \
                or a_t.shape[1] != b_t.shape[0]:
            raise ValueError(f"{what}: A^T {list(a_t.shape)} and B^T {list(b_t.shape)} do not fit x "
                             f"{list(x.shape)} -> y {list(y.shape)}: need A^T [in, r] and B^T [r, out]")
        if not (a_t.is_contiguous() and b_t.is_contiguous()):
            raise ValueError(f"{what}: A^T and B^T must be contiguous (the kernels address them by rank)")
        check_device(f"{what} A^T", a_t, x.device)
        check_device(f"{what} B^T", b_t, x.device)
        used.append(slot)
    return used, w_dtype


def _slices(weights: Sequence[SlotWeights], used: list[int], out: int
            ) -> tuple[tuple[int, ...], list[list[int]], list[list[int]]]:
    """(output slice sizes, per slot each slice's first rank row, per slot each slice's rank)."""
    outs = next((weights[s].outs for s in used if isinstance(weights[s], SlicedWeights)), (out,))
    n = len(outs)
    offs, ranks = [[0] * n for _ in weights], [[0] * n for _ in weights]
    for s in used:
        w = weights[s]
        if isinstance(w, SlicedWeights):
            if w.outs != outs:
                raise ValueError(f"LoRA slot {s} slices the output as {w.outs}, another slot as {outs}")
            ranks[s] = list(w.ranks)
            offs[s] = [sum(w.ranks[:i]) for i in range(n)]
        else:  # a plain pair: every slice reads all its rank rows
            ranks[s] = [w[0].shape[1]] * n
    return outs, offs, ranks


def sgmv_(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, weights: Sequence[SlotWeights], *,
          block_m: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """In place: y [T, out] += each segment's LoRA delta of x [T, in]; returns y (see `kernels.lora`).

    block_m, split_k: tile rows and shrink K splits (None: chosen from the batch); tests force them.
    """
    used, w_dtype = _check(y, x, seg, weights)
    with_weights = set(used)
    active = [(s0, s1, s) for s0, s1, s in zip(seg.starts, seg.ends, seg.slots) if s in with_weights and s1 > s0]
    if not active:
        return y
    check_launchable(_shrink_kernel, x.device)
    if block_m is not None and (block_m < MIN_DOT or block_m & (block_m - 1)):
        raise ValueError(f"block_m={block_m} must be a power of two >= {MIN_DOT}")
    block_m = block_m or block(max(s1 - s0 for s0, s1, _ in active))
    tiles = [(r0, min(r0 + block_m, s1), s) for s0, s1, s in active for r0 in range(s0, s1, block_m)]
    outs, rank_offs, slice_ranks = _slices(weights, used, y.shape[1])
    ns, nsl = len(weights), len(outs)
    ranks = [0 if w is None else w[0].shape[1] for w in weights]
    in_batch = {s for _, _, s in active}  # slots this batch reads: they size t and the tiles
    max_rank = max(ranks[s] for s in in_batch)
    if max_rank == 0:  # rank-0 weights: nothing to add
        return y
    # One int64 table, one host-to-device copy: tiles, A/B pointers, ranks, slice ranks, output slices.
    meta = [v for tile in tiles for v in tile]
    meta += [0 if w is None else w[0].data_ptr() for w in weights]
    meta += [0 if w is None else w[1].data_ptr() for w in weights]
    meta += ranks + [v for rs in rank_offs for v in rs] + [v for rs in slice_ranks for v in rs]
    meta += [sum(outs[:i]) for i in range(nsl)] + list(outs)
    sizes = [3 * len(tiles), ns, ns, ns, ns * nsl, ns * nsl, nsl, nsl]
    tiles_t, a_ptrs, b_ptrs, ranks_t, rank_off_t, slice_rank_t, out_off_t, out_size_t = \
        torch.tensor(meta, dtype=torch.int64).to(x.device).split(sizes)

    w_tl = float_dtype(weights[used[0]][0], "LoRA A^T")
    dot, precision = dot_dtype(x.dtype, w_dtype)
    k = x.shape[1]
    # Tiles as narrow as the smallest rank: a rank-8 slot beside a rank-64 one computes 16 columns, not 64
    # (larger ranks take several rank blocks, or loop in the expand).
    block_r = block(min(ranks[s] for s in in_batch))
    if split_k is None:  # few programs (decode-shaped batches): split the long K dimension too
        programs = len(tiles) * triton.cdiv(max_rank, block_r)
        split_k = 1
        while programs * split_k < SPLIT_K_TARGET and k // (2 * split_k) >= MIN_K_PER_SPLIT:
            split_k *= 2
    # t [T, max_rank] float32: the shrink's output, the expand's input
    t = (torch.zeros if split_k > 1 else torch.empty)(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(len(tiles), triton.cdiv(max_rank, block_r), split_k)](
        x, t, tiles_t, a_ptrs, ranks_t, k, x.stride(0), x.stride(1), t.stride(0),
        W_DTYPE=w_tl, DOT=dot, PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block(k),
        SPLIT_K=split_k)
    block_n = block(max(outs))
    _expand_kernel[(len(tiles), triton.cdiv(max(outs), block_n), nsl)](
        t, y, tiles_t, b_ptrs, rank_off_t, slice_rank_t, out_off_t, out_size_t,
        y.shape[1], t.stride(0), y.stride(0), y.stride(1), nsl,
        W_DTYPE=w_tl, DOT=dot, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=block(min((r for s in in_batch for r in slice_ranks[s] if r > 0), default=1)))
    return y
