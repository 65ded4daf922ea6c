"""Paged attention over one preallocated KV arena: the torch implementation (CPU path and oracle).

The arena of one layer is `k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]`; a
sequence's token at position p lives in block `block_table[p // block_size]`, row `p % block_size`.
K/V are fetched a whole block at a time (`index_select` on the block axis: one contiguous copy per
block, several times faster on the CPU than gathering token rows).

A step's sequences are split three ways, each computed batched:
- decodes (one new token): one padded batch; when every decode shares leading blocks (a common system
  prompt, shared through the prefix cache), that shared prefix is attended once for all of them as one
  matrix product and merged with each sequence's own suffix by log-sum-exp ("cascade" attention);
- short extends (new tokens attending causally to a cached prefix and to each other): one padded batch;
- long prefills: one call each (padding them to a common length would waste more than it saves).
With bf16 K/V on the CPU the C kernel takes the decodes, and the extends and the prefills of up to
NATIVE_PREFILL_MAX new tokens in runs of up to MAX_NATIVE_NEW new tokens (`AttentionPlan.native_extends`); the
sequences it is given that share a prefix's blocks attend to them together inside it, with the results each has
alone (the torch cascade's products and merge cost more than they save there: 64 decodes over a 1,024-token
shared prefix, a whole decode step 78.8 ms with the cascade, 52.8 ms with the kernel alone).

`AttentionPlan` is built once per step and holds the step's geometry and slot mapping; each implementation
derives what it reads from the geometry on first use (this one: `TorchAttention`, the Triton one its tile
tables) and every layer reuses it, so a step builds metadata only for the backend in use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels import native
from kernels.cpu_features import matmul_dtype

SHORT_EXTEND = 64  # extends of at most this many new tokens are batched together
MIN_SHARED_BLOCKS = 2  # cascade only when the shared prefix is at least this long ...
MIN_CASCADE_DECODES = 4  # ... and shared by at least this many decodes
MAX_NATIVE_NEW = 32  # new tokens of one sequence the C kernel takes at once (its MAX_NEW)
NATIVE_EXTENDS = True  # the short extends through the C kernel where it takes them (bf16 K/V on the CPU) ...
# ... and the prompts of up to this many new tokens too: no bound in practice (its runs of MAX_NATIVE_NEW read the
# context once each; a lone fresh prompt of 1,000 / 2,000 / 4,000 tokens in the engine, first token after 0.33 /
# 0.75 / 1.9 s against 0.58 / 1.66 / 5.15 s with torch's attention for its chunks of more than 512 tokens)
NATIVE_PREFILL_MAX = 1 << 20


@dataclass
class Batch:
    """Sequences attended as one padded batch."""

    q_index: torch.Tensor  # [n, max_q] rows of the step's q (padding points at row 0; masked)
    q_valid: torch.Tensor  # [n, max_q] bool: real query rows
    tables: torch.Tensor  # [n, nblk] block ids (padding 0; masked)
    mask: torch.Tensor  # [n, 1, max_q, nblk * block_size] bool, True = attend
    # Built once per step for every layer (boolean indexing and the mask's negation cost a nonzero or a pass
    # each time): the real rows' positions in the flattened [n * max_q] layout, their rows of q, ~mask.
    valid_at: torch.Tensor = field(default=None)  # type: ignore[assignment]
    rows: torch.Tensor = field(default=None)  # type: ignore[assignment]
    blocked: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.valid_at is None:
            self.valid_at = self.q_valid.reshape(-1).nonzero().squeeze(1)
            self.rows = self.q_index.reshape(-1)[self.valid_at]
            self.blocked = ~self.mask


@dataclass
class Cascade:
    shared: torch.Tensor  # [ns] block ids every decode starts with
    suffix: Batch  # the decodes over their own blocks past the shared prefix


@dataclass
class LongChunk:
    q_start: int
    q_len: int
    table: torch.Tensor  # [nblk] block ids
    mask: torch.Tensor | None  # [q_len, ctx] bool; None = plain causal (no cached prefix)
    ctx: int  # context length including the new tokens


@dataclass
class TorchAttention:
    """The torch implementation's view of a step: its sequences split into the batches above."""

    decodes: Batch | None
    cascade: Cascade | None  # set instead of `decodes` when the decodes share a prefix
    extends: Batch | None
    longs: list[LongChunk]


@dataclass
class AttentionPlan:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    # The step's geometry, per sequence in step order: blocks in context, first new position, new tokens.
    block_tables: list[list[int]]
    starts: list[int]
    lens: list[int]
    block_size: int
    # What each implementation derives from the geometry, built on first use and reused by every layer.
    derived: dict[str, object] = field(default_factory=dict, repr=False)

    @staticmethod
    def build(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
              device: torch.device | str = "cpu", slot_mapping: torch.Tensor | None = None) -> AttentionPlan:
        """Sequence i computes positions [starts[i], starts[i] + lens[i]), in step order. `slot_mapping`:
        already computed (and on `device`), e.g. copied with the rest of the step's metadata."""
        bs = block_size
        if slot_mapping is None:
            slots: list[int] = []
            for table, start, n in zip(block_tables, starts, lens):
                for p in range(start, start + n):
                    slots.append(table[p // bs] * bs + p % bs)
            slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        used_tables = [t[: -(-(s + n) // bs)] for t, s, n in zip(block_tables, starts, lens)]  # blocks in context
        return AttentionPlan(slot_mapping, used_tables, list(starts), list(lens), bs)

    def torch_view(self, decodes: bool = True, extends: bool = True) -> TorchAttention:
        """`decodes` False: the single-token sequences are left out (the C decode kernel computes them);
        `extends` False: the sequences of 2..NATIVE_PREFILL_MAX new tokens too (`native_extends`)."""
        key = "torch" + ("" if decodes else "-no-decodes") + ("" if extends else "-no-extends")
        hit = self.derived.get(key)
        if not isinstance(hit, TorchAttention):
            hit = self.derived[key] = _torch_attention(self.block_tables, self.starts, self.lens,
                                                       self.block_size, self.slot_mapping.device, decodes, extends)
        return hit

    def native_decodes(self) -> NativeDecodes | None:
        """The single-token sequences as the C decode kernel reads them; None when there are none. (Those that
        share a prefix's blocks attend to it together inside the kernel.)"""
        hit = self.derived.get("native")
        if hit is None:
            hit = self.derived["native"] = _native_decodes(self.block_tables, self.starts, self.lens)
        return hit if isinstance(hit, NativeDecodes) else None

    def native_extends(self) -> NativeDecodes | None:
        """The sequences of 2..NATIVE_PREFILL_MAX new tokens (extends of a cached prefix and prompts from their
        start) as the C decode kernel reads them: each one's new tokens
        in runs of up to MAX_NATIVE_NEW, every run a sequence of its own over the same blocks (causal within it,
        as the kernel computes a verify pass). None when there are none."""
        hit = self.derived.get("native-extends")
        if hit is None:
            hit = self.derived["native-extends"] = _native_extends(self.block_tables, self.starts, self.lens)
        return hit if isinstance(hit, NativeDecodes) else None

    def native_all(self) -> NativeDecodes | None:
        """Every new token of the step as one call of the C kernel reads them: the single-token sequences of
        `native_decodes` and the runs of `native_extends` together. None when an entry is not the kernel's (a
        prompt chunk of more than NATIVE_PREFILL_MAX tokens, or extends kept off it)."""
        hit = self.derived.get("native-all")
        if hit is None:
            hit = self.derived["native-all"] = _native_all(self)
        return hit if isinstance(hit, NativeDecodes) else None


@dataclass
class NativeDecodes:
    """The single-token sequences as the C kernel reads them. Consecutive ones that continue each other (the
    positions of one request's verify pass: the same blocks, the next position, the next query row) are one
    sequence of several new tokens, so its context is read once for all of them."""

    q_rows: torch.Tensor  # [n] int64: each sequence's first query row
    nq: torch.Tensor | None  # [n] int64: its new tokens (rows q_rows[i] ...); None: one each
    ctx: torch.Tensor  # [n] int64: tokens in context the kernel reads, its last new one included
    tables: torch.Tensor  # [n, max_blocks] int64 block ids (padding 0, never read)
    rows: torch.Tensor  # [sum(nq)] int64: every new token's query row, in the kernel's output order


def _native_decodes(block_tables: list[list[int]], starts: list[int], lens: list[int]) -> NativeDecodes | bool:
    first_rows, nq, ctx, tables, rows, q = [], [], [], [], [], 0
    prev = None  # (row, start, table) of the last single-token sequence
    for table, start, n in zip(block_tables, starts, lens):
        if n == 1:
            if prev is not None and prev[0] + 1 == q and prev[1] + 1 == start and nq[-1] < MAX_NATIVE_NEW \
                    and table[: len(prev[2])] == prev[2]:
                nq[-1] += 1  # the next position of the same sequence
                ctx[-1] = start + 1
                tables[-1] = table
            else:
                first_rows.append(q)
                nq.append(1)
                ctx.append(start + 1)
                tables.append(table)
            rows.append(q)
            prev = (q, start, table)
        q += n
    if not rows:
        return False
    multi = max(nq) > 1
    return NativeDecodes(torch.tensor(first_rows, dtype=torch.int64),
                         torch.tensor(nq, dtype=torch.int64) if multi else None,
                         torch.tensor(ctx, dtype=torch.int64), _padded(tables), torch.tensor(rows, dtype=torch.int64))


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one int64 tensor `[n, longest]`, short rows padded with block 0 (never read)."""
    padded = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.int64)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
    return padded


def _native_all(plan: AttentionPlan) -> NativeDecodes | bool:
    if any(n > (NATIVE_PREFILL_MAX if NATIVE_EXTENDS else 1) for n in plan.lens):
        return False
    parts = [p for p in (plan.native_decodes(), plan.native_extends() if NATIVE_EXTENDS else None) if p is not None]
    if len(parts) < 2:
        return parts[0] if parts else False
    width = max(p.tables.shape[1] for p in parts)
    return NativeDecodes(
        torch.cat([p.q_rows for p in parts]),
        torch.cat([p.nq if p.nq is not None else torch.ones_like(p.q_rows) for p in parts]),
        torch.cat([p.ctx for p in parts]),
        torch.cat([F.pad(p.tables, (0, width - p.tables.shape[1])) for p in parts]),
        torch.cat([p.rows for p in parts]))


def _native_extends(block_tables: list[list[int]], starts: list[int], lens: list[int]) -> NativeDecodes | bool:
    first_rows, nq, ctx, tables, rows, q = [], [], [], [], [], 0
    for table, start, n in zip(block_tables, starts, lens):
        if 1 < n <= NATIVE_PREFILL_MAX:
            for j in range(0, n, MAX_NATIVE_NEW):
                k = min(MAX_NATIVE_NEW, n - j)
                first_rows.append(q + j)
                nq.append(k)
                ctx.append(start + j + k)
                tables.append(table)
            rows.extend(range(q, q + n))
        q += n
    if not rows:
        return False
    return NativeDecodes(torch.tensor(first_rows, dtype=torch.int64), torch.tensor(nq, dtype=torch.int64),
                         torch.tensor(ctx, dtype=torch.int64), _padded(tables), torch.tensor(rows, dtype=torch.int64))


def _torch_attention(block_tables: list[list[int]], starts: list[int], lens: list[int], bs: int,
                     device: torch.device, decodes: bool = True, extends: bool = True) -> TorchAttention:
    q_starts, acc = [], 0
    for n in lens:
        q_starts.append(acc)
        acc += n
    dec = [i for i, n in enumerate(lens) if n == 1] if decodes else []
    ext = [i for i, n in enumerate(lens) if 1 < n <= SHORT_EXTEND] if extends else []
    longs = [i for i, n in enumerate(lens) if n > (SHORT_EXTEND if extends else NATIVE_PREFILL_MAX)]

    cascade = decodes = None
    if dec:
        shared = _common_prefix_blocks([block_tables[i] for i in dec], [starts[i] for i in dec], bs)
        if shared >= MIN_SHARED_BLOCKS and len(dec) >= MIN_CASCADE_DECODES:
            suffix = _batch([block_tables[i][shared:] for i in dec], [starts[i] - shared * bs for i in dec],
                            [1] * len(dec), [q_starts[i] for i in dec], bs, device)
            cascade = Cascade(torch.tensor(block_tables[dec[0]][:shared], dtype=torch.int64, device=device), suffix)
        else:
            decodes = _batch([block_tables[i] for i in dec], [starts[i] for i in dec], [1] * len(dec),
                             [q_starts[i] for i in dec], bs, device)
    extends = None
    if ext:
        extends = _batch([block_tables[i] for i in ext], [starts[i] for i in ext], [lens[i] for i in ext],
                         [q_starts[i] for i in ext], bs, device)
    long_chunks = []
    for i in longs:
        start, n = starts[i], lens[i]
        ctx = start + n
        table = torch.tensor(block_tables[i][: -(-ctx // bs)], dtype=torch.int64, device=device)
        mask = None
        if start:
            pos = torch.arange(ctx, device=device)
            mask = pos.unsqueeze(0) <= torch.arange(start, ctx, device=device).unsqueeze(1)
        long_chunks.append(LongChunk(q_starts[i], n, table, mask, ctx))
    return TorchAttention(decodes, cascade, extends, long_chunks)


def _common_prefix_blocks(tables: list[list[int]], starts: list[int], bs: int) -> int:
    """Leading blocks identical in every table and fully before every sequence's new token."""
    limit = min(starts) // bs  # blocks entirely in the cached context of every sequence
    first = tables[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in tables):
        n += 1
    return n


def _batch(tables: list[list[int]], starts: list[int], lens: list[int], q_starts: list[int], bs: int,
           device: torch.device | str) -> Batch:
    n = len(tables)
    ctx = [s + q for s, q in zip(starts, lens)]
    nblk = -(-max(ctx) // bs)
    max_q = max(lens)
    t = torch.zeros(n, nblk, dtype=torch.int64)
    q_index = torch.zeros(n, max_q, dtype=torch.int64)
    q_valid = torch.zeros(n, max_q, dtype=torch.bool)
    for i in range(n):
        row = tables[i][: -(-ctx[i] // bs)]
        t[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        q_index[i, : lens[i]] = torch.arange(q_starts[i], q_starts[i] + lens[i])
        q_valid[i, : lens[i]] = True
    kpos = torch.arange(nblk * bs)
    # query j of sequence i sits at position starts[i] + j and sees keys at positions <= it
    qpos = torch.tensor(starts).unsqueeze(1) + torch.arange(max_q).unsqueeze(0)  # [n, max_q]
    mask = (kpos.view(1, 1, -1) <= qpos.unsqueeze(-1)) & q_valid.unsqueeze(-1)
    mask |= ~q_valid.unsqueeze(-1) & (kpos.view(1, 1, -1) == 0)  # padded rows see one key: no NaN
    return Batch(q_index.to(device), q_valid.to(device), t.to(device), mask.unsqueeze(1).to(device))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V rows `[num_tokens, num_kv_heads, head_dim]` at their slots."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def rope_write_kv_torch(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int
                        ) -> torch.Tensor:
    """Rotary embedding of q and k in the fused projection output (HF rotate-half layout), k and v written at
    their slots: `[T, (heads + 2 kv_heads) * d]` -> rotated q `[T, heads, d]`. The tables are read at the
    positions and rounded to the activations' dtype, in which the rotation is computed."""
    t = qkv.shape[0]
    kvh, d = k_cache.shape[-2:]
    q_size, kv_size = num_heads * d, kvh * d
    c = cos[positions].to(qkv.dtype).unsqueeze(1)  # [T, 1, d]
    s = sin[positions].to(qkv.dtype).unsqueeze(1)
    q = qkv[:, :q_size].view(t, num_heads, d)
    k = qkv[:, q_size : q_size + kv_size].view(t, kvh, d)
    v = qkv[:, q_size + kv_size :].view(t, kvh, d)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    return q


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _fetch(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cache [NB, bs, kvh, d], tables [..., nblk] -> [..., kvh, nblk * bs, d] (whole blocks copied)."""
    nb, bs, kvh, d = cache.shape
    rows = cache.view(nb, -1).index_select(0, tables.reshape(-1))
    return rows.view(*tables.shape[:-1], tables.shape[-1] * bs, kvh, d).transpose(-3, -2)


def _attend_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: Batch, scale: float,
                  out: torch.Tensor) -> None:
    n, max_q = b.q_index.shape
    h, d = q.shape[1:]
    kvh = k_cache.shape[2]
    g = h // kvh
    # The g query heads sharing one KV head are stacked as rows of one product:
    # [n, kvh, g * max_q, d] @ [n, kvh, d, L]. (Measured on the CPU: several times faster than SDPA with a
    # mask for these short query blocks.)
    mm = matmul_dtype(q)
    qb = q[b.q_index.view(-1)].view(n, max_q, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(n, kvh, g * max_q, d)
    qb = qb.to(mm)
    k = _fetch(k_cache, b.tables).to(mm)  # [n, kvh, L, d]
    v = _fetch(v_cache, b.tables).to(mm)
    s = torch.matmul(qb, k.transpose(-1, -2)).float() * scale  # [n, kvh, g * max_q, L]
    s = s.view(n, kvh, g, max_q, -1).masked_fill(b.blocked.unsqueeze(1), float("-inf"))
    p = torch.softmax(s, -1).to(v.dtype).view(n, kvh, g * max_q, -1)
    o = torch.matmul(p, v).view(n, kvh, g, max_q, d).permute(0, 3, 1, 2, 4).reshape(n, max_q, h, d)
    out[b.rows] = o.reshape(n * max_q, h, d)[b.valid_at].to(out.dtype)


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor | None, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised attention and its log-sum-exp: q [..., m, d], k/v [..., L, d] -> ([..., m, d], [..., m, 1]);
    `blocked`: True where a query must not attend (a Batch's ~mask), or None."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if blocked is not None:
        s = s.masked_fill(blocked, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)
    o = torch.matmul(e.to(v.dtype), v).float()
    return o / e.sum(-1, keepdim=True), m + e.sum(-1, keepdim=True).log()


def _shared_prefix(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, shared: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of decodes' queries qd `[n, kvh, g, d]` over the prefix blocks they share: every decode's query
    heads of one KV head form the rows of one matrix product. Returns ([n, kvh, g, d], log-sum-exp [n, kvh, g, 1])."""
    n, kvh, g, d = qd.shape
    mm = matmul_dtype(qd)
    ks = _fetch(k_cache, shared).to(mm)  # [kvh, S, d]
    vs = _fetch(v_cache, shared).to(mm)
    o1, l1 = _partial(qd.permute(1, 0, 2, 3).reshape(kvh, n * g, d).to(mm), ks, vs, None, scale)
    return o1.view(kvh, n, g, d).transpose(0, 1), l1.view(kvh, n, g, 1).transpose(0, 1)


def _attend_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, nd: NativeDecodes, scale: float,
                   out: torch.Tensor) -> bool:
    """The runs of new tokens through the C kernel; False when it cannot take them."""
    return native.paged_decode_attention(q.contiguous(), k_cache, v_cache, out, nd.q_rows, nd.ctx, nd.tables, scale,
                                         nd.nq)


def _attend_cascade(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, c: Cascade, scale: float,
                    out: torch.Tensor) -> None:
    rows = c.suffix.q_index[:, 0]  # one query row per decode
    n = rows.shape[0]
    h, d = q.shape[1:]
    kvh = k_cache.shape[2]
    g = h // kvh
    qd = q[rows].view(n, kvh, g, d)  # [n, kvh, g, d]
    o1, l1 = _shared_prefix(qd, k_cache, v_cache, c.shared, scale)
    # own suffix of each decode (padded; its mask row is [n, 1, 1, L])
    mm = matmul_dtype(q)
    k2 = _fetch(k_cache, c.suffix.tables).to(mm)  # [n, kvh, L, d]
    v2 = _fetch(v_cache, c.suffix.tables).to(mm)
    o2, l2 = _partial(qd.to(mm), k2, v2, c.suffix.blocked, scale)
    w = torch.sigmoid(l1 - l2)  # share of the prefix in the merged softmax: e^l1 / (e^l1 + e^l2)
    out[rows] = (o2 + (o1 - o2) * w).to(out.dtype).view(n, h, d)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].

    K/V of the new tokens must already be written to the cache (see `write_kv`).
    """
    out = torch.empty_like(q)
    h = q.shape[1]
    kvh = k_cache.shape[2]
    native_done = native_ext = False
    if q.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16 and q.is_cpu:
        nd = plan.native_decodes()
        native_done = nd is not None and _attend_native(q, k_cache, v_cache, nd, scale, out)
        ne = plan.native_extends() if NATIVE_EXTENDS else None
        native_ext = ne is not None and _attend_native(q, k_cache, v_cache, ne, scale, out)
    view = plan.torch_view(decodes=not native_done, extends=not native_ext)
    if view.cascade is not None:
        _attend_cascade(q, k_cache, v_cache, view.cascade, scale, out)
    if view.decodes is not None:
        _attend_batch(q, k_cache, v_cache, view.decodes, scale, out)
    if view.extends is not None:
        _attend_batch(q, k_cache, v_cache, view.extends, scale, out)
    mm = matmul_dtype(q)
    for c in view.longs:
        qe = q[c.q_start : c.q_start + c.q_len].transpose(0, 1).unsqueeze(0).to(mm)  # [1, h, n, d]
        ke = _fetch(k_cache, c.table)[:, : c.ctx].unsqueeze(0).to(mm)  # [1, kvh, ctx, d]
        ve = _fetch(v_cache, c.table)[:, : c.ctx].unsqueeze(0).to(mm)
        oe = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=c.mask, is_causal=c.mask is None, scale=scale,
                                            enable_gqa=h != kvh)
        out[c.q_start : c.q_start + c.q_len] = oe[0].transpose(0, 1)
    return out


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: list[list[int]], starts: list[int], lens: list[int]) -> torch.Tensor:
    """Plain fp32 oracle, one query token at a time."""
    bs, kvh, d = k_cache.shape[1:]
    h = q.shape[1]
    g = h // kvh
    out = torch.zeros(q.shape, dtype=torch.float32)
    row = 0
    for table, start, n in zip(block_tables, starts, lens):
        for j in range(n):
            pos = start + j
            idx = [table[p // bs] * bs + p % bs for p in range(pos + 1)]
            k = k_cache.reshape(-1, kvh, d)[idx].float()  # [pos+1, kvh, d]
            v = v_cache.reshape(-1, kvh, d)[idx].float()
            for head in range(h):
                s = (k[:, head // g] @ q[row, head].float()) * d**-0.5
                out[row, head] = torch.softmax(s, 0) @ v[:, head // g]
            row += 1
    return out
