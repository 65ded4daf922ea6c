"""Paged attention over one preallocated KV arena: the torch implementation (CPU path and oracle).

The arena of one layer is `k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]`; a
sequence's token at position p lives in slot `block_table[p // block_size] * block_size + p % block_size`.
A step's query tokens are ordered decodes first (one token per sequence), then prefill/extend chunks
(several new tokens attending causally to their cached prefix and to each other).

`AttentionPlan` turns block tables into gather indices and masks once per step; all layers reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExtendChunk:
    q_start: int  # first row of this chunk in the step's query tokens
    q_len: int
    ctx_start: int  # position of the chunk's first token == tokens already cached
    gather: torch.Tensor  # [ctx_start + q_len] slot indices, int64
    mask: torch.Tensor | None  # [q_len, ctx_start + q_len] bool (True = attend); None = plain causal


@dataclass
class AttentionPlan:
    num_decodes: int  # rows [0, num_decodes) of q are single-token decodes
    decode_gather: torch.Tensor | None  # [num_decodes, max_len] slot indices (padded with 0)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_len] bool
    extends: list[ExtendChunk]
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written

    @staticmethod
    def build(
        block_tables: list[list[int]],
        starts: list[int],
        lens: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionPlan:
        """Sequences in step order; sequence i computes positions [starts[i], starts[i] + lens[i]).

        The leading run of single-token sequences takes the batched decode path; any other sequence
        (including a single token after the first multi-token one) takes the extend path.
        """
        num_decodes = 0
        while num_decodes < len(lens) and lens[num_decodes] == 1:
            num_decodes += 1
        bs = block_size
        slots: list[int] = []
        for table, start, n in zip(block_tables, starts, lens):
            for p in range(start, start + n):
                slots.append(table[p // bs] * bs + p % bs)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)

        decode_gather = decode_mask = None
        if num_decodes:
            ctx = torch.tensor([starts[i] + 1 for i in range(num_decodes)], dtype=torch.int64)
            max_len = int(ctx.max())
            nblk = (max_len + bs - 1) // bs
            tables = torch.zeros(num_decodes, nblk, dtype=torch.int64)
            for i in range(num_decodes):
                row = block_tables[i][:nblk]
                tables[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            pos = torch.arange(max_len, dtype=torch.int64)
            # [num_decodes, max_len]: slot of each context position (padding rows point at slot of block 0)
            decode_gather = (tables[:, pos // bs] * bs + pos % bs).to(device)
            decode_mask = (pos.unsqueeze(0) < ctx.unsqueeze(1)).view(num_decodes, 1, 1, max_len).to(device)

        extends: list[ExtendChunk] = []
        q_start = num_decodes
        for i in range(num_decodes, len(lens)):
            start, n = starts[i], lens[i]
            total = start + n
            pos = torch.arange(total, dtype=torch.int64)
            table = torch.tensor(block_tables[i][: (total + bs - 1) // bs], dtype=torch.int64)
            gather = (table[pos // bs] * bs + pos % bs).to(device)
            mask = None
            if start:
                q_pos = torch.arange(start, total, dtype=torch.int64)
                mask = (pos.unsqueeze(0) <= q_pos.unsqueeze(1)).to(device)
            extends.append(ExtendChunk(q_start, n, start, gather, mask))
            q_start += n
        return AttentionPlan(num_decodes, decode_gather, decode_mask, extends, slot_mapping)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V rows `[num_tokens, num_kv_heads, head_dim]` at their slots."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim].

    K/V of the new tokens must already be written to the cache (see `write_kv`).
    """
    t, h, d = q.shape
    kvh = k_cache.shape[-2]
    group = h // kvh
    k_flat = k_cache.view(-1, kvh, d)
    v_flat = v_cache.view(-1, kvh, d)
    out = torch.empty_like(q)
    nd = plan.num_decodes
    if nd:
        # The G query heads sharing a KV head act as G query rows: [nd, kvh, G, d] x [nd, kvh, L, d].
        qd = q[:nd].view(nd, kvh, group, d)
        kd = k_flat[plan.decode_gather].transpose(1, 2)  # [nd, kvh, L, d]
        vd = v_flat[plan.decode_gather].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=plan.decode_mask,
                                            scale=scale)
        out[:nd] = od.reshape(nd, h, d)
    for c in plan.extends:
        qe = q[c.q_start : c.q_start + c.q_len].transpose(0, 1).unsqueeze(0)  # [1, h, n, d]
        ke = k_flat[c.gather].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, kvh, L, d]
        ve = v_flat[c.gather].transpose(0, 1).unsqueeze(0).to(q.dtype)
        oe = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=c.mask, is_causal=c.mask is None,
                                            scale=scale, enable_gqa=group > 1)
        out[c.q_start : c.q_start + c.q_len] = oe[0].transpose(0, 1)
    return out
