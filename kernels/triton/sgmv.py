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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lora import LoraSegments, SlicedWeights, SlotWeights, check_segments
from kernels.triton.common import (
    FLOAT_DTYPES,
    MIN_DOT,
    block,
    check_device,
    check_launchable,
    dot_dtype,
    float_dtype,
)

SPLIT_K_TARGET = 64  # shrink programs wanted before splitting K stops paying
MIN_K_PER_SPLIT = 256
STATIC_BLOCK_M = MIN_DOT  # tile rows of fixed-shape (graph-replayed) launches: decode segments are short
_TORCH_DTYPES = {v: k for k, v in FLOAT_DTYPES.items()}


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
    # an empty tile (padding of a fixed-shape launch), a slot without weights here, or a smaller rank than the
    # launch's largest
    if (row1 <= row0) | (pid_r * BLOCK_R >= rank):
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
    if (row1 <= row0) | (r_n == 0) | (pid_n * BLOCK_N >= o_n):  # an empty tile, no LoRA here, or past its columns
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


def _slices(weights: Sequence[SlotWeights], used: list[int], default_outs: Sequence[int]
            ) -> tuple[tuple[int, ...], list[list[int]], list[list[int]]]:
    """(output slice sizes: the sliced slots' or else `default_outs`, per slot each slice's first rank row, per
    slot each slice's rank)."""
    outs = next((weights[s].outs for s in used if isinstance(weights[s], SlicedWeights)), tuple(default_outs))
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


@dataclass
class SlotTables:
    """One projection group's LoRA slots as the kernels read them: data pointers of each slot's A^T and B^T,
    its rank, each output slice's rank rows, and the output slices; all int64 views of device memory.

    The dynamic path (`sgmv_`) builds them per call beside the tiles, in one copy. The static path
    (`sgmv_static_`: fixed-shape steps replayed as CUDA graphs) keeps them in buffers of fixed addresses that
    `fill` rewrites when the slots change; its launch shape then comes from `rank_cap`, not from the slots.
    """

    flat: torch.Tensor  # every table below, one after the other
    a_ptrs: torch.Tensor  # [slots]
    b_ptrs: torch.Tensor  # [slots]
    ranks: torch.Tensor  # [slots]
    rank_offs: torch.Tensor  # [slots * slices]: each slice's first rank row
    slice_ranks: torch.Tensor  # [slots * slices]
    out_offs: torch.Tensor  # [slices]
    out_sizes: torch.Tensor  # [slices]
    outs: tuple[int, ...]  # output slice sizes
    rank_cap: int  # rank columns of the launch (the shrink's output width)
    block_r: int  # shrink rank tile
    block_r_expand: int  # expand rank tile
    w_dtype: tl.dtype

    @staticmethod
    def sizes(slots: int, slices: int) -> list[int]:
        """Lengths of the tables in `lists` order (their layout in one int64 buffer)."""
        return [slots, slots, slots, slots * slices, slots * slices, slices, slices]

    @staticmethod
    def lists(weights: Sequence[SlotWeights], outs: Sequence[int]) -> list[int]:
        """The tables' values for `weights` (None: an empty slot) over output slices `outs`, flattened in `sizes`
        order; ValueError when a slot slices the output otherwise."""
        used = [s for s, w in enumerate(weights) if w is not None]
        got, rank_offs, slice_ranks = _slices(weights, used, outs)
        if tuple(got) != tuple(outs):
            raise ValueError(f"LoRA slots slice the output as {tuple(got)}, the launch as {tuple(outs)}")
        vals = [0 if w is None else w[0].data_ptr() for w in weights]
        vals += [0 if w is None else w[1].data_ptr() for w in weights]
        vals += [0 if w is None else w[0].shape[1] for w in weights]
        vals += [v for rs in rank_offs for v in rs] + [v for rs in slice_ranks for v in rs]
        vals += [sum(outs[:i]) for i in range(len(outs))] + list(outs)
        return vals

    @staticmethod
    def views(flat: torch.Tensor, slots: int, outs: Sequence[int], rank_cap: int, block_r: int,
              block_r_expand: int, w_dtype: tl.dtype) -> SlotTables:
        """Tables over `flat` (int64, laid out as `lists`)."""
        parts = flat.split(SlotTables.sizes(slots, len(outs)))
        return SlotTables(flat, *parts, outs=tuple(outs), rank_cap=rank_cap, block_r=block_r,
                          block_r_expand=block_r_expand, w_dtype=w_dtype)

    def fill(self, weights: Sequence[SlotWeights]) -> None:
        """Rewrite the tables in place for `weights` (ranks must fit `rank_cap`). On a device the values go with
        one copy, ordered on the stream before the next launch that reads them."""
        if len(weights) != self.ranks.numel():
            raise ValueError(f"{len(weights)} LoRA slots for tables of {self.ranks.numel()}")
        ranks = [0 if w is None else w[0].shape[1] for w in weights]
        if max(ranks, default=0) > self.rank_cap:
            raise ValueError(f"a LoRA slot of rank {max(ranks)} exceeds the static launch's rank {self.rank_cap}")
        host = torch.tensor(self.lists(weights, self.outs), dtype=torch.int64)
        if self.flat.device.type == "cpu":
            self.flat.copy_(host)
        else:
            self.flat.copy_(host.pin_memory(), non_blocking=True)


def _split_k(programs: int, k: int) -> int:
    """Shrink K splits for a launch of `programs` programs: few programs (decode-shaped batches) split the long
    K dimension too, while each split keeps at least MIN_K_PER_SPLIT of it."""
    split_k = 1
    while programs * split_k < SPLIT_K_TARGET and k // (2 * split_k) >= MIN_K_PER_SPLIT:
        split_k *= 2
    return split_k


def _launch(y: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, num_tiles: int, block_m: int,
            tables: SlotTables, split_k: int) -> torch.Tensor:
    """Shrink into a float32 `t [T, rank_cap]`, then expand into y: the launches both paths share."""
    dot, precision = dot_dtype(x.dtype, _TORCH_DTYPES[tables.w_dtype])
    k = x.shape[1]
    t = (torch.zeros if split_k > 1 else torch.empty)(x.shape[0], tables.rank_cap, dtype=torch.float32,
                                                       device=x.device)
    _shrink_kernel[(num_tiles, triton.cdiv(tables.rank_cap, tables.block_r), split_k)](
        x, t, tiles, tables.a_ptrs, tables.ranks, k, x.stride(0), x.stride(1), t.stride(0),
        W_DTYPE=tables.w_dtype, DOT=dot, PRECISION=precision, BLOCK_M=block_m, BLOCK_R=tables.block_r,
        BLOCK_K=block(k), SPLIT_K=split_k)
    block_n = block(max(tables.outs))
    nsl = len(tables.outs)
    _expand_kernel[(num_tiles, triton.cdiv(max(tables.outs), block_n), nsl)](
        t, y, tiles, tables.b_ptrs, tables.rank_offs, tables.slice_ranks, tables.out_offs, tables.out_sizes,
        y.shape[1], t.stride(0), y.stride(0), y.stride(1), nsl,
        W_DTYPE=tables.w_dtype, DOT=dot, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=tables.block_r_expand)
    return y


def sgmv_(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, weights: Sequence[SlotWeights], *,
          block_m: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """In place: y [T, out] += each segment's LoRA delta of x [T, in]; returns y (see `kernels.lora`).

    block_m, split_k: tile rows and shrink K splits (None: chosen from the batch); tests force them.
    """
    used, _ = _check(y, x, seg, weights)
    with_weights = set(used)
    active = [(s0, s1, s) for s0, s1, s in zip(seg.starts, seg.ends, seg.slots) if s in with_weights and s1 > s0]
    if not active:
        return y
    check_launchable(_shrink_kernel, x.device)
    if block_m is not None and (block_m < MIN_DOT or block_m & (block_m - 1)):
        raise ValueError(f"block_m={block_m} must be a power of two >= {MIN_DOT}")
    block_m = block_m or block(max(s1 - s0 for s0, s1, _ in active))
    tiles = [(r0, min(r0 + block_m, s1), s) for s0, s1, s in active for r0 in range(s0, s1, block_m)]
    outs, _, slice_ranks = _slices(weights, used, (y.shape[1],))
    ranks = [0 if w is None else w[0].shape[1] for w in weights]
    in_batch = {s for _, _, s in active}  # slots this batch reads: they size t and the tiles
    max_rank = max(ranks[s] for s in in_batch)
    if max_rank == 0:  # rank-0 weights: nothing to add
        return y
    # One int64 table, one host-to-device copy: the tiles, then the slot tables.
    meta = [v for tile in tiles for v in tile] + SlotTables.lists(weights, outs)
    flat = torch.tensor(meta, dtype=torch.int64).to(x.device)
    # Tiles as narrow as the smallest rank: a rank-8 slot beside a rank-64 one computes 16 columns, not 64
    # (larger ranks take several rank blocks, or loop in the expand).
    block_r = block(min(ranks[s] for s in in_batch))
    tables = SlotTables.views(flat[3 * len(tiles):], len(weights), outs, max_rank, block_r,
                              block(min((r for s in in_batch for r in slice_ranks[s] if r > 0), default=1)),
                              float_dtype(weights[used[0]][0], "LoRA A^T"))
    if split_k is None:
        split_k = _split_k(len(tiles) * triton.cdiv(max_rank, block_r), x.shape[1])
    return _launch(y, x, flat[: 3 * len(tiles)], len(tiles), block_m, tables, split_k)


def static_tiles(segments: Sequence[tuple[int, int, int]], capacity: int) -> list[int]:
    """`(start, end, slot)` segments (slot -1: no adapter) cut into tiles of STATIC_BLOCK_M rows, flattened as the
    kernels read them and padded with empty tiles to `capacity`; ValueError when they need more tiles."""
    vals = [v for s0, s1, s in segments if s >= 0
            for r0 in range(s0, s1, STATIC_BLOCK_M) for v in (r0, min(r0 + STATIC_BLOCK_M, s1), s)]
    if len(vals) > 3 * capacity:
        raise ValueError(f"{len(vals) // 3} LoRA tiles exceed the static launch's {capacity}")
    return vals + [0] * (3 * capacity - len(vals))


def static_tile_capacity(rows: int, slots: int) -> int:
    """The most tiles `rows` rows in segments of at most `slots` adapters can need."""
    return min(rows, triton.cdiv(rows, STATIC_BLOCK_M) + min(rows, slots))


def sgmv_static_(y: torch.Tensor, x: torch.Tensor, tiles: torch.Tensor, tables: SlotTables) -> torch.Tensor:
    """In place: y += the LoRA delta of every tile of `tiles` ([capacity, 3] int64 (first row, end row, slot) on
    x's device, empty tiles (0, 0, 0) doing nothing) under the slots of `tables`. Nothing here depends on the
    values of the tiles or tables, only on shapes: the launches can be captured once and replayed."""
    float_dtype(y, "sgmv output y")
    float_dtype(x, "sgmv input x")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or y.shape[1] != sum(tables.outs):
        raise ValueError(f"sgmv needs x [T, in] and y [T, {sum(tables.outs)}], got x {list(x.shape)} and y "
                         f"{list(y.shape)}")
    if tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.dtype != torch.int64:
        raise ValueError(f"static LoRA tiles must be int64 [capacity, 3], got {tiles.dtype} {list(tiles.shape)}")
    check_device("sgmv output y", y, x.device)
    check_device("static LoRA tiles", tiles, x.device)
    check_launchable(_shrink_kernel, x.device)
    programs = tiles.shape[0] * triton.cdiv(tables.rank_cap, tables.block_r)
    return _launch(y, x, tiles, tiles.shape[0], STATIC_BLOCK_M, tables, _split_k(programs, x.shape[1]))
