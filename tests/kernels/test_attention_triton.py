"""Triton paged attention (through the interpreter) against the one-token-at-a-time fp32 oracle."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import AttentionPlan, paged_attention_reference, paged_attention_torch, write_kv

pytestmark = pytest.mark.interpreter

# Fraction of the largest output magnitude. float32: summation order only. float16/bfloat16: q, K and V
# are already rounded for both sides; the kernel rounds the probabilities to the dot dtype on a GPU
# (float16: 2^-11) and its output once (bfloat16: one step of 2^-7 -- the interpreter truncates where
# the GPU rounds).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
NB = 64


def make(seqs: list[tuple[int, int]], heads: int, kv_heads: int, bs: int = 4, d: int = 16,
         dtype: torch.dtype = torch.float32, shared_blocks: int = 0, seed: int = 0):
    """seqs: (cached tokens, new tokens) each. Random distinct blocks (optionally a shared leading run);
    the new tokens' K/V are written to the arena first, as the model does."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NB, bs, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(NB, bs, kv_heads, d, generator=g).to(dtype)
    free = list(range(NB))
    rng.shuffle(free)
    shared = [free.pop() for _ in range(shared_blocks)]
    tables = []
    for start, n in seqs:
        need = -(-(start + n) // bs)
        # one spare block past the context: tables are longer than what is in use, as in the engine
        tables.append(shared[:need] + [free.pop() for _ in range(max(0, need - len(shared)) + 1)])
    total = sum(n for _, n in seqs)
    q = torch.randn(total, heads, d, generator=g).to(dtype)
    k_new = torch.randn(total, kv_heads, d, generator=g).to(dtype)
    v_new = torch.randn(total, kv_heads, d, generator=g).to(dtype)
    starts, lens = [s for s, _ in seqs], [n for _, n in seqs]
    plan = AttentionPlan.build(tables, starts, lens, bs)
    write_kv(k_cache, v_cache, k_new, v_new, plan.slot_mapping)
    return q, k_cache, v_cache, tables, starts, lens, plan


CASES = {
    "decode-partial-blocks": [(5, 1), (0, 1), (13, 1), (7, 1), (31, 1)],
    "extend-over-prefix": [(0, 5), (6, 3), (9, 12), (4, 17)],
    "mixed-with-long-prefill": [(10, 1), (0, 9), (4, 1), (0, 70), (11, 4)],
}
GQA = {"mha-4/4": (4, 4), "gqa-6/2": (6, 2), "mqa-8/1": (8, 1)}


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, gqa):
    from kernels.triton.attention import paged_attention

    h, kvh = GQA[gqa]
    q, kc, vc, tables, starts, lens, plan = make(CASES[case], h, kvh)
    out = paged_attention(q, kc, vc, plan, 16**-0.5)
    check(out, paged_attention_reference(q, kc, vc, tables, starts, lens), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes(dtype):
    from kernels.triton.attention import paged_attention

    q, kc, vc, tables, starts, lens, plan = make(CASES["mixed-with-long-prefill"], 6, 2, dtype=dtype)
    out = paged_attention(q, kc, vc, plan, 16**-0.5)
    check(out, paged_attention_reference(q, kc, vc, tables, starts, lens), dtype)


def test_large_pages_head_dim_and_small_tiles():
    """Pages of 16 with partial last pages, head_dim 32 (scale 32**-0.5, as the oracle uses), and tiles
    forced small: several query tiles per sequence and several key steps per page."""
    from kernels.triton.attention import paged_attention

    q, kc, vc, tables, starts, lens, plan = make([(21, 1), (3, 30), (40, 7), (0, 1)], 4, 2, bs=16, d=32)
    out = paged_attention(q, kc, vc, plan, 32**-0.5, extend_m=8, block_n=16)
    check(out, paged_attention_reference(q, kc, vc, tables, starts, lens), torch.float32)


def test_shared_prefix_plan_matches_torch_cascade():
    """A plan the torch path runs as cascade attention (decodes sharing a prefix): same result."""
    from kernels.triton.attention import paged_attention

    q, kc, vc, tables, starts, lens, plan = make([(33, 1), (40, 1), (36, 1), (45, 1), (32, 1)], 6, 2,
                                                 shared_blocks=12)
    assert plan.torch_view().cascade is not None
    out = paged_attention(q, kc, vc, plan, 16**-0.5)
    torch.testing.assert_close(out, paged_attention_torch(q, kc, vc, plan, 16**-0.5), atol=2e-5, rtol=0)
    check(out, paged_attention_reference(q, kc, vc, tables, starts, lens), torch.float32)


def test_strided_query_and_plan_reuse():
    """q as a view into a fused qkv tensor (the row stride is the fused width); the plan's derived tables
    are built once and reused by the next call (every layer of a step)."""
    from kernels.triton.attention import paged_attention

    seqs = [(6, 1), (0, 7), (9, 3)]
    _, kc, vc, tables, starts, lens, plan = make(seqs, 4, 2)
    t = sum(lens)
    qkv = torch.randn(t, 4 * 16 + 2 * 2 * 16, generator=torch.Generator().manual_seed(9))
    q = qkv[:, : 4 * 16].view(t, 4, 16)
    assert not q.is_contiguous()
    out = paged_attention(q, kc, vc, plan, 16**-0.5)
    cached = dict(plan.derived)
    again = paged_attention(q, kc, vc, plan, 16**-0.5)
    assert len(cached) == 1 and plan.derived == cached
    assert torch.equal(out, again)
    check(out, paged_attention_reference(q.contiguous(), kc, vc, tables, starts, lens), torch.float32)
