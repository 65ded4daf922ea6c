"""Paged attention as one Triton kernel: the GPU path of `kernels.attention` (same arguments, same result).

A program takes one tile of a sequence's new tokens and one KV head: its rows are (token, query head)
pairs of the query heads sharing that KV head (GQA), so each K/V block is read once for all of them. It
walks the sequence's context a key tile at a time, finding each key's block through the block table
(`block_table[pos // block_size]`, row `pos % block_size`, so partial last blocks need nothing special),
masks keys past each row's own position (causal, over the cached prefix and the new tokens alike), and
keeps an online softmax in float32.

Two launches of the same kernel: decodes (one new token: a tile is one token, its rows are the query
heads) and extends/prefills (tiles of several tokens). Each is a list of (sequence, first token) tiles,
so a batch of very different lengths launches no idle programs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention import AttentionPlan
from kernels.triton.common import MIN_DOT, check_device, check_launchable, dot_dtype, float_dtype

EXTEND_ROWS = 64  # (token, head) rows per extend tile
BLOCK_N = 32  # keys per inner step
STATIC = "triton-attention:static"  # a plan's geometry held in fixed device buffers (`static_decodes`)


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, seqs_ptr, tables_ptr, tiles_ptr,
        scale_log2, table_width, page_size, head_dim,
        stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kr, stride_kh, stride_kd,
        stride_vb, stride_vr, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    tile, kvh = tl.program_id(0), tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    m0 = tl.load(tiles_ptr + 2 * tile + 1)
    q_start = tl.load(seqs_ptr + 3 * seq)  # first row of this sequence in q
    q_len = tl.load(seqs_ptr + 3 * seq + 1)
    ctx0 = tl.load(seqs_ptr + 3 * seq + 2)  # cached tokens before the new ones
    # rows: BLOCK_M tokens x BLOCK_G query heads of this KV head
    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    tok = m0 + rows // BLOCK_G
    head = kvh * G + rows % BLOCK_G
    row_ok = (tok < q_len) & (rows % BLOCK_G < G)
    q_pos = ctx0 + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(DOT)
    m_i = tl.full([BLOCK_M * BLOCK_G], -1.0e30, tl.float32)  # finite: fully masked rows give 0, not NaN
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)
    kv_end = tl.minimum(ctx0 + q_len, ctx0 + m0 + BLOCK_M)  # the tile's last token sees keys before this
    table = tables_ptr + seq * table_width
    for n0 in range(0, kv_end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < kv_end
        blk = tl.load(table + kpos // page_size, mask=k_ok, other=0)
        r = kpos % page_size
        k = tl.load(k_ptr + blk[None, :] * stride_kb + r[None, :] * stride_kr + kvh * stride_kh
                    + d[:, None] * stride_kd, mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
        s = tl.dot(q, k.to(DOT), input_precision=PRECISION) * scale_log2
        s = tl.where(k_ok[None, :] & (kpos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + r[:, None] * stride_vr + kvh * stride_vh
                    + d[None, :] * stride_vd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@dataclass
class _Geometry:
    """The plan's sequences as device tensors (built once per plan and tile shape)."""

    seqs: torch.Tensor  # int64 [S, 3]: first q row, new tokens, cached tokens
    tables: torch.Tensor  # int64 [S, width]: block ids, padded with 0
    decode_tiles: torch.Tensor  # int64 [nd, 2]: (sequence, first token)
    extend_tiles: torch.Tensor  # int64 [ne, 2]
    width: int
    max_block: int
    tokens: int


def _geometry(plan: AttentionPlan, device: torch.device, page_size: int, extend_m: int) -> _Geometry:
    key = f"triton-attention:{device}:{page_size}:{extend_m}"
    hit = plan.derived.get(key)
    if isinstance(hit, _Geometry):
        return hit
    tables, starts, lens = plan.block_tables, plan.starts, plan.lens
    if not (len(tables) == len(starts) == len(lens)):
        raise ValueError("attention plan: block_tables, starts and lens must have one entry per sequence "
                         "(build the plan with AttentionPlan.build)")
    seqs, row = [], 0
    for i, (table, start, n) in enumerate(zip(tables, starts, lens)):
        if start < 0 or n < 0:
            raise ValueError(f"attention plan: sequence {i} has start {start} and {n} new tokens")
        need = -(-(start + n) // page_size)
        if len(table) < need:
            raise ValueError(f"attention plan: sequence {i} needs {need} blocks of {page_size} for {start + n} "
                             f"tokens, its block table has {len(table)}")
        seqs += [row, n, start]
        row += n
    width = max((len(t) for t in tables), default=0) or 1
    flat = [b for t in tables for b in t]
    if flat and min(flat) < 0:
        raise ValueError(f"attention plan: block id {min(flat)} is negative")
    padded = [b for t in tables for b in list(t) + [0] * (width - len(t))]
    dec = [v for i, n in enumerate(lens) if n == 1 for v in (i, 0)]
    ext = [v for i, n in enumerate(lens) if n > 1 for m0 in range(0, n, extend_m) for v in (i, m0)]
    # one int64 table, one host-to-device copy
    sizes = [len(seqs), len(padded), len(dec), len(ext)]
    parts = torch.tensor(seqs + padded + dec + ext, dtype=torch.int64).to(device).split(sizes)
    geo = _Geometry(parts[0].view(-1, 3), parts[1].view(-1, width), parts[2].view(-1, 2), parts[3].view(-1, 2),
                    width, max(flat, default=-1), row)
    plan.derived[key] = geo
    return geo


def static_decodes(plan: AttentionPlan, seqs: torch.Tensor, tables: torch.Tensor, tiles: torch.Tensor,
                   max_block: int) -> None:
    """Make `plan` a decode step of fixed shape, for launches captured once and replayed with new values: its
    sequences are the rows of `seqs` (int64 [B, 3]: first q row, new tokens (1), cached tokens) over `tables`
    (int64 [B, width] block ids), each attended by the decode tile of `tiles` (int64 [B, 2]: (row, 0)), all on
    the device. What is launched depends on their shapes only; `max_block` bounds the block ids they hold."""
    if seqs.dim() != 2 or seqs.shape[1] != 3 or tables.dim() != 2 or tables.shape[0] != seqs.shape[0] \
            or tuple(tiles.shape) != (seqs.shape[0], 2):
        raise ValueError(f"static decodes need seqs [B, 3], tables [B, width] and tiles [B, 2], got "
                         f"{list(seqs.shape)}, {list(tables.shape)} and {list(tiles.shape)}")
    empty = torch.empty(0, 2, dtype=torch.int64, device=seqs.device)
    plan.derived[STATIC] = _Geometry(seqs, tables, tiles, empty, tables.shape[1], max_block, seqs.shape[0])


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    float_dtype(q, "attention q")
    float_dtype(k_cache, "k_cache")
    float_dtype(v_cache, "v_cache")
    if q.dim() != 3:
        raise ValueError(f"attention q must be [tokens, heads, head_dim], got shape {list(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    h, d = q.shape[1:]
    kvh = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"q has head_dim {d}, the cache {k_cache.shape[3]}")
    if kvh == 0 or h % kvh:
        raise ValueError(f"{h} query heads cannot share {kvh} KV heads evenly")
    check_device("k_cache", k_cache, q.device)
    check_device("v_cache", v_cache, q.device)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                    scale: float, *, extend_m: int | None = None, block_n: int = BLOCK_N) -> torch.Tensor:
    """q [T, heads, head_dim] -> [T, heads, head_dim]; K/V of the new tokens must already be in the cache.

    extend_m (tokens per extend tile) and block_n (keys per step): None/default chosen here; tests force them.
    """
    _check(q, k_cache, v_cache)
    num_blocks, page_size, kvh, d = k_cache.shape
    h = q.shape[1]
    g = h // kvh
    block_g = triton.next_power_of_2(g)
    extend_m = extend_m or max(1, EXTEND_ROWS // block_g)
    decode_m = max(1, MIN_DOT // block_g)  # tl.dot needs >= 16 rows
    if extend_m * block_g < MIN_DOT or extend_m & (extend_m - 1) or block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"extend_m={extend_m} x {block_g} heads must give >= {MIN_DOT} rows and "
                         f"block_n={block_n} must be a power of two >= {MIN_DOT}")
    static = plan.derived.get(STATIC)
    geo = static if isinstance(static, _Geometry) else _geometry(plan, q.device, page_size, extend_m)
    if geo.tokens != q.shape[0]:
        raise ValueError(f"the attention plan covers {geo.tokens} new tokens, q has {q.shape[0]}")
    if geo.max_block >= num_blocks:
        raise ValueError(f"attention plan: block id {geo.max_block} is out of range for a cache of {num_blocks} "
                         "blocks")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    check_launchable(_paged_attention_kernel, q.device)
    dot, precision = dot_dtype(q.dtype, k_cache.dtype, v_cache.dtype)
    block_d = max(MIN_DOT, triton.next_power_of_2(d))
    for tiles, block_m in ((geo.decode_tiles, decode_m), (geo.extend_tiles, extend_m)):
        if tiles.shape[0] == 0:
            continue
        _paged_attention_kernel[(tiles.shape[0], kvh)](
            q, k_cache, v_cache, out, geo.seqs, geo.tables, tiles,
            scale * math.log2(math.e), geo.width, page_size, d,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            G=g, BLOCK_G=block_g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT=dot, PRECISION=precision)
    return out
