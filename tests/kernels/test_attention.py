"""Paged attention (torch CPU path) against a one-token-at-a-time fp32 oracle."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import AttentionPlan, paged_attention_reference, paged_attention_torch, write_kv

BS, KVH, H, D, NB = 4, 2, 6, 16, 96


def setup(seqs: list[tuple[int, int]], shared_prefix_blocks: int = 0, seed: int = 0, dtype=torch.float32):
    """seqs: (cached tokens, new tokens). Random distinct blocks; optionally a common leading run."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NB, BS, KVH, D, generator=g).to(dtype)
    v_cache = torch.randn(NB, BS, KVH, D, generator=g).to(dtype)
    free = list(range(NB))
    rng.shuffle(free)
    shared = [free.pop() for _ in range(shared_prefix_blocks)]
    tables = []
    for start, n in seqs:
        need = -(-(start + n) // BS)
        tables.append(shared[:need] + [free.pop() for _ in range(max(0, need - len(shared)))])
    total = sum(n for _, n in seqs)
    q = torch.randn(total, H, D, generator=g).to(dtype)
    k_new = torch.randn(total, KVH, D, generator=g).to(dtype)
    v_new = torch.randn(total, KVH, D, generator=g).to(dtype)
    starts, lens = [s for s, _ in seqs], [n for _, n in seqs]
    plan = AttentionPlan.build(tables, starts, lens, BS)
    write_kv(k_cache, v_cache, k_new, v_new, plan.slot_mapping)
    return q, k_cache, v_cache, tables, starts, lens, plan


CASES = {
    "decodes-partial-blocks": [(5, 1), (0, 1), (13, 1), (7, 1)],
    "short-extends": [(0, 5), (6, 3), (9, 12)],
    "long-prefill-and-extend": [(0, 70), (3, 66), (0, 2)],
    "mixed": [(10, 1), (0, 9), (4, 1), (0, 80), (11, 4)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    q, kc, vc, tables, starts, lens, plan = setup(CASES[case])
    out = paged_attention_torch(q, kc, vc, plan, D**-0.5)
    ref = paged_attention_reference(q, kc, vc, tables, starts, lens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_cascade_shared_prefix_matches_reference():
    seqs = [(33, 1), (40, 1), (36, 1), (45, 1), (32, 1)]  # all share 8 leading blocks (32 tokens)
    q, kc, vc, tables, starts, lens, plan = setup(seqs, shared_prefix_blocks=12)
    assert plan.torch_view().cascade is not None and plan.torch_view().cascade.shared.numel() == 8
    out = paged_attention_torch(q, kc, vc, plan, D**-0.5)
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, tables, starts, lens), atol=2e-5, rtol=0)


def test_no_cascade_when_prefixes_differ():
    q, kc, vc, tables, starts, lens, plan = setup([(33, 1), (40, 1), (36, 1), (45, 1)])
    assert plan.torch_view().cascade is None and plan.torch_view().decodes is not None


def test_bf16_close_to_reference():
    q, kc, vc, tables, starts, lens, plan = setup(CASES["mixed"], dtype=torch.bfloat16)
    out = paged_attention_torch(q, kc, vc, plan, D**-0.5).float()
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, tables, starts, lens), atol=3e-2, rtol=0)

