"""The C paged-attention kernel (kernels/cpu/decode.c through kernels.native) against the float32 oracle: decodes,
verify passes and extends/prefills in runs of new tokens, sequences attending to a shared prefix together (bit for
bit their results alone), the builds for other CPUs, and the fallback to torch where the kernel declines."""

from __future__ import annotations

import pytest
import torch

from kernels import native
from kernels.attention import AttentionPlan, paged_attention_reference, paged_attention_torch
from kernels.cpu_features import cpu_flags
from tests.kernels.test_attention import setup
from tests.kernels.test_native import ATOL_BF16, BF16

ATTN_CASES = {
    "one-decode-one-token": [(0, 1)],
    "ragged-decodes-across-blocks": [(5, 1), (0, 1), (13, 1), (7, 1), (30, 1)],
    "decodes-beside-extends-and-a-long-prefill": [(10, 1), (0, 9), (4, 1), (0, 80), (11, 4)],
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_decode_attention_matches_the_fp32_oracle(case):
    q, kc, vc, tables, starts, lens, plan = setup(ATTN_CASES[case], dtype=BF16)
    nd = plan.native_decodes()
    assert nd is not None
    out = torch.full_like(q, float("nan"))
    assert native.paged_decode_attention(q, kc, vc, out, nd.q_rows, nd.ctx, nd.tables, 16**-0.5)
    ref = paged_attention_reference(q, kc, vc, tables, starts, lens)
    rows = nd.q_rows
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=ATOL_BF16, rtol=0)
    # rows of the other sequences (extends, prefills) are not touched
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert out[others].isnan().all()


def test_paged_attention_uses_the_kernel_for_decodes_and_torch_for_the_rest():
    q, kc, vc, tables, starts, lens, plan = setup(ATTN_CASES["decodes-beside-extends-and-a-long-prefill"], dtype=BF16)
    out = paged_attention_torch(q, kc, vc, plan, 16**-0.5).float()
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, tables, starts, lens), atol=ATOL_BF16, rtol=0)
    # the decodes, the short extends and the 80-token prefill (within NATIVE_PREFILL_MAX) went to the kernel
    assert "native" in plan.derived and "torch-no-decodes-no-extends" in plan.derived
    view = plan.torch_view(decodes=False, extends=False)
    assert view.decodes is None and view.extends is None and view.longs == []


def test_prefills_beyond_the_kernels_bound_stay_with_torch(monkeypatch):
    """A prefill of more new tokens than NATIVE_PREFILL_MAX (here lowered to 64) is attended by torch, the
    extends beside it by the kernel, with the oracle's answer."""
    from kernels import attention

    monkeypatch.setattr(attention, "NATIVE_PREFILL_MAX", 64)
    q, kc, vc, tables, starts, lens, plan = setup(ATTN_CASES["decodes-beside-extends-and-a-long-prefill"], dtype=BF16)
    out = paged_attention_torch(q, kc, vc, plan, 16**-0.5).float()
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, tables, starts, lens), atol=ATOL_BF16, rtol=0)
    assert plan.native_extends().nq.tolist() == [9, 4]
    assert [c.q_len for c in plan.torch_view(decodes=False, extends=False).longs] == [80]


EXTENDS = [(7, 2), (0, 5), (9, 32), (3, 33), (20, 64), (10, 1), (0, 70)]  # (cached tokens, new tokens)


def test_long_prompts_go_to_the_kernel_with_the_oracles_answer():
    """A fresh prompt of 1,100 tokens and a chunk of 700 new tokens after 600 cached ones (the second chunk of a long
    prompt), beside a decode: the C kernel takes all of them (in runs of its new-token limit over the same blocks;
    prompts of any length go to it: `NATIVE_PREFILL_MAX`), against the float32 oracle. Block size 16, the default
    model's heads (9 query heads on 3 KV heads of 64)."""
    g = torch.Generator().manual_seed(11)
    bs, h, kvh, d = 16, 9, 3, 64
    seqs = [(0, 1100), (600, 700), (40, 1)]  # (cached tokens, new tokens)
    need = [-(-(s + n) // bs) for s, n in seqs]
    ids = iter(torch.randperm(sum(need) + 1, generator=g).tolist())
    tables = [[next(ids) for _ in range(k)] for k in need]
    kc = torch.randn(sum(need) + 1, bs, kvh, d, generator=g).to(BF16)
    vc = torch.randn(sum(need) + 1, bs, kvh, d, generator=g).to(BF16)
    starts, lens = [s for s, _ in seqs], [n for _, n in seqs]
    q = torch.randn(sum(lens), h, d, generator=g).to(BF16)
    plan = AttentionPlan.build(tables, starts, lens, bs)
    out = paged_attention_torch(q, kc, vc, plan, d**-0.5)
    assert plan.torch_view(decodes=False, extends=False).longs == []  # nothing left to torch's attention
    assert plan.native_extends().nq.tolist() == [32] * 34 + [12] + [32] * 21 + [28]
    torch.testing.assert_close(out.float(), paged_attention_reference(q, kc, vc, tables, starts, lens),
                               atol=ATOL_BF16, rtol=0)


def test_short_extends_go_to_the_kernel_in_runs_of_its_new_token_limit(monkeypatch):
    """Extends of 2-64 new tokens over cached prefixes (and from position 0) and a 70-token prompt are split into
    runs of at most MAX_NATIVE_NEW, each run a sequence over the same blocks whose context ends at its last token;
    the kernel's answer is the float32 oracle's within bf16 rounding, and torch's (the switch off)."""
    from kernels import attention

    q, kc, vc, tables, starts, lens, plan = setup(EXTENDS, dtype=BF16)
    ne = plan.native_extends()
    assert ne is not None
    assert ne.nq.tolist() == [2, 5, 32, 32, 1, 32, 32, 32, 32, 6]
    assert ne.ctx.tolist() == [9, 5, 41, 35, 36, 52, 84, 32, 64, 70]
    assert ne.q_rows.tolist() == [0, 2, 7, 39, 71, 72, 104, 137, 169, 201]
    assert ne.rows.tolist() == list(range(136)) + list(range(137, 207))  # every row but the decode's (136)
    out = paged_attention_torch(q, kc, vc, plan, 16**-0.5)
    ref = paged_attention_reference(q, kc, vc, tables, starts, lens)
    torch.testing.assert_close(out.float(), ref, atol=ATOL_BF16, rtol=0)
    monkeypatch.setattr(attention, "NATIVE_EXTENDS", False)
    plan = AttentionPlan.build(tables, starts, lens, 4)
    torch_out = paged_attention_torch(q, kc, vc, plan, 16**-0.5)
    assert "native-extends" not in plan.derived and plan.torch_view(decodes=False).extends is not None
    assert [c.q_len for c in plan.torch_view(decodes=False).longs] == [70]
    torch.testing.assert_close(out.float(), torch_out.float(), atol=ATOL_BF16, rtol=0)


def test_extends_the_kernel_refuses_are_computed_by_torch(monkeypatch):
    """When the C kernel refuses (here: made to), the decodes and the extends both go to torch's batches, with
    the same answer."""
    q, kc, vc, tables, starts, lens, plan = setup(EXTENDS, dtype=BF16)
    monkeypatch.setattr(native, "paged_decode_attention", lambda *a, **k: False)
    out = paged_attention_torch(q, kc, vc, plan, 16**-0.5)
    assert "torch" in plan.derived and "torch-no-decodes" not in plan.derived
    torch.testing.assert_close(out.float(), paged_attention_reference(q, kc, vc, tables, starts, lens),
                               atol=ATOL_BF16, rtol=0)


def test_decode_attention_with_grouped_heads_and_a_shared_prefix():
    """9 query heads over 3 KV heads (the default model's grouping), 64-token blocks, a prefix shared by all."""
    g = torch.Generator().manual_seed(7)
    nb, bs, kvh, h, d = 40, 64, 3, 9, 64
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(BF16)
    vc = torch.randn(nb, bs, kvh, d, generator=g).to(BF16)
    tables = [[5, 6, 7], [5, 6, 9], [5, 11], [5, 6, 12, 13]]
    starts = [150, 130, 70, 200]
    plan = AttentionPlan.build(tables, starts, [1] * 4, bs)
    q = torch.randn(4, h, d, generator=g).to(BF16)
    out = paged_attention_torch(q, kc, vc, plan, d**-0.5).float()
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, tables, starts, [1] * 4), atol=ATOL_BF16,
                               rtol=0)


def _verify_pass(block_size: int, shared_blocks: int = 0):
    """A step as the runner builds it around a speculative verify pass: request B's 6 positions are 6
    single-token entries over one block table (next position, next query row), beside plain decodes."""
    g = torch.Generator().manual_seed(11)
    nb, kvh, h, d = 96, 3, 9, 64
    kc = torch.randn(nb, block_size, kvh, d, generator=g).to(BF16)
    vc = torch.randn(nb, block_size, kvh, d, generator=g).to(BF16)
    ids = iter(torch.randperm(nb, generator=g).tolist())
    shared = [next(ids) for _ in range(shared_blocks)]
    requests = [(37, 1), (50, 6), (shared_blocks * block_size + 3, 1), (41, 1)]  # (first position, positions)
    tables, starts = [], []
    for first, n in requests:
        blocks = shared + [next(ids) for _ in range(-(-(first + n) // block_size) - len(shared))]
        tables += [blocks] * n
        starts += range(first, first + n)
    q = torch.randn(len(starts), h, d, generator=g).to(BF16)
    plan = AttentionPlan.build(tables, starts, [1] * len(starts), block_size)
    ref = paged_attention_reference(q, kc, vc, tables, starts, [1] * len(starts))
    return q, kc, vc, plan, ref


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"),
                         [(64, 9, 3), (64, 8, 1), (64, 10, 2), (64, 4, 4), (128, 6, 2), (128, 8, 2), (96, 4, 2)])
def test_the_tiled_kernel_adds_v_to_every_grouping_of_rows(head_dim, heads, kv_heads):
    """The tiled path adds each tile's weighted V rows to up to 4 rows at a time (head_dim 64) or 2 (128) in
    registers, the rest of a task's rows in further groups; other head sizes (96) widen V into a buffer. Groups of
    1-8 query heads per KV head, verify passes of 6 and 3 positions whose first rows see fewer keys than a tile holds
    (a row's keys end inside or before a tile), decodes of 1 and 41 tokens, against the float32 oracle."""
    g = torch.Generator().manual_seed(head_dim + heads)
    block = 16
    requests = [(27, 6), (0, 1), (40, 1), (14, 3)]  # (first position, positions)
    nb = sum(-(-(first + n) // block) for first, n in requests) + 1
    kc = torch.randn(nb, block, kv_heads, head_dim, generator=g).to(BF16)
    vc = torch.randn(nb, block, kv_heads, head_dim, generator=g).to(BF16)
    ids = iter(torch.randperm(nb - 1, generator=g).add(1).tolist())
    tables, starts = [], []
    for first, n in requests:
        blocks = [next(ids) for _ in range(-(-(first + n) // block))]
        tables += [blocks] * n
        starts += range(first, first + n)
    q = torch.randn(len(starts), heads, head_dim, generator=g).to(BF16)
    plan = AttentionPlan.build(tables, starts, [1] * len(starts), block)
    nd = plan.native_decodes()
    assert nd.nq.tolist() == [6, 1, 1, 3]
    out = torch.full_like(q, float("nan"))
    assert native.paged_decode_attention(q, kc, vc, out, nd.q_rows, nd.ctx, nd.tables, head_dim**-0.5, nd.nq)
    ref = paged_attention_reference(q, kc, vc, tables, starts, [1] * len(starts))
    torch.testing.assert_close(out.float(), ref, atol=ATOL_BF16, rtol=0)


@pytest.mark.parametrize("block_size", [4, 16])
def test_a_verify_pass_is_one_sequence_whose_context_is_read_once(block_size):
    """The verify positions go to the kernel as one sequence of 6 new tokens (causal among themselves); block size
    4 puts several blocks in one tile of keys."""
    q, kc, vc, plan, ref = _verify_pass(block_size)
    nd = plan.native_decodes()
    assert nd.nq.tolist() == [1, 6, 1, 1] and nd.q_rows.tolist() == [0, 1, 7, 8]
    out = torch.full_like(q, float("nan"))
    assert native.paged_decode_attention(q, kc, vc, out, nd.q_rows, nd.ctx, nd.tables, 64**-0.5, nd.nq)
    torch.testing.assert_close(out.float(), ref, atol=ATOL_BF16, rtol=0)


def test_a_verify_pass_beside_decodes_sharing_a_prefix_attends_to_it_with_them():
    """Four sequences over 2 shared blocks, one of them a verify pass of 6 positions: they attend to the prefix
    together (one group in the kernel), each row with the oracle's answer and bit for bit its answer alone."""
    q, kc, vc, plan, ref = _verify_pass(16, shared_blocks=2)
    nd = plan.native_decodes()
    assert nd.nq.tolist() == [1, 6, 1, 1]
    assert native.decode_attention_groups(nd.tables, nd.ctx, 16, nd.nq) == [([0, 1, 2, 3], 32)]
    out = paged_attention_torch(q, kc, vc, plan, 64**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=ATOL_BF16, rtol=0)
    assert torch.equal(out, _each_alone(q, kc, vc, nd, 64**-0.5))


def _each_alone(q, kc, vc, nd, scale) -> torch.Tensor:
    """The kernel's answer for each sequence of `nd` called alone (no other sequence to share a prefix with)."""
    out = torch.full_like(q, float("nan"))
    nq = nd.nq.tolist() if nd.nq is not None else [1] * nd.q_rows.shape[0]
    for i in range(nd.q_rows.shape[0]):
        assert native.paged_decode_attention(q, kc, vc, out, nd.q_rows[i : i + 1], nd.ctx[i : i + 1],
                                             nd.tables[i : i + 1], scale, torch.tensor([nq[i]]))
    return out


# Builds of the kernels for CPUs other than this one's best: (extra compiler flags, the attention path expected
# where this CPU has AVX2 and FMA). Without AVX512-BF16 the tiled AVX2 path; without AVX2 the plain C path.
OTHER_BUILDS = {"without-avx512-bf16": (("-mno-avx512bf16",), "avx2"), "without-avx2": (("-mno-avx2",), "portable")}


@pytest.mark.parametrize("build", list(OTHER_BUILDS))
def test_the_kernels_built_for_other_cpus_give_the_same_attention(build, tmp_path, monkeypatch):
    """The code paths of CPUs without AVX512-BF16 (tiled on AVX2) and without AVX2 (one row at a time): the
    kernels built for such a CPU, run here: decodes, verify passes (several new tokens of one sequence), the
    cascade over a shared prefix, head_dims of 128, 40 (not a multiple of 32, the AVX512-BF16 path's vectors of bf16
    pairs; an odd number of 8-lane vectors) and 36 (not a multiple of 8: the plain C rows in every build)."""
    flags, path = OTHER_BUILDS[build]
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    lib = native.build_library(native._compiler(), (*native.FLAGS, *flags))
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_loaded", True)  # a first library() call must not load the default build over it
    assert native.library() is lib
    if {"avx2", "fma"} <= cpu_flags():
        assert native.attention_path() == path
    for shared_blocks in (0, 2):
        q, kc, vc, plan, ref = _verify_pass(4 if shared_blocks == 0 else 16, shared_blocks)
        out = paged_attention_torch(q, kc, vc, plan, 64**-0.5)
        torch.testing.assert_close(out.float(), ref, atol=ATOL_BF16, rtol=0)
        nd = plan.native_decodes()
        if path == "avx2":  # grouped over the shared prefix, bit for bit each sequence alone
            assert native.decode_attention_groups(nd.tables, nd.ctx, 16, nd.nq) == ([([0, 1, 2, 3], 32)]
                                                                                    if shared_blocks else [])
            assert torch.equal(out, _each_alone(q, kc, vc, nd, 64**-0.5))
    for case, seqs in ATTN_CASES.items():
        q, kc, vc, tables, starts, lens, plan = setup(seqs, dtype=BF16)
        nd = plan.native_decodes()
        out = torch.full_like(q, float("nan"))
        assert native.paged_decode_attention(q, kc, vc, out, nd.q_rows, nd.ctx, nd.tables, 16**-0.5), case
        ref = paged_attention_reference(q, kc, vc, tables, starts, lens)
        torch.testing.assert_close(out[nd.q_rows].float(), ref[nd.q_rows], atol=ATOL_BF16, rtol=0, msg=case)
    for head_dim in (128, 40, 36):
        _decodes_of_head_dim(head_dim)


def _decodes_of_head_dim(head_dim: int) -> None:
    """Six decodes of contexts 1..70 with 4 query heads on 2 KV heads of `head_dim`, through the kernel, against
    the float32 oracle."""
    g = torch.Generator().manual_seed(head_dim)
    block, ctxs = 16, [1, 7, 16, 17, 40, 70]
    nblocks = [(c + block - 1) // block for c in ctxs]
    kc = torch.randn(sum(nblocks) + 1, block, 2, head_dim, generator=g).to(BF16)
    vc = torch.randn(sum(nblocks) + 1, block, 2, head_dim, generator=g).to(BF16)
    q = torch.randn(len(ctxs), 4, head_dim, generator=g).to(BF16)
    tables, at = [], 1
    for n in nblocks:
        tables.append(list(range(at, at + n)))
        at += n
    width = max(nblocks)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    ctx = torch.tensor(ctxs, dtype=torch.int64)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    assert native.paged_decode_attention(q, kc, vc, out, torch.arange(len(ctxs)), ctx, table_t, scale)
    for i, c in enumerate(ctxs):
        pos = torch.arange(c)
        k = kc[table_t[i, pos // block], pos % block].float().repeat_interleave(2, dim=1)  # [c, 4, head_dim]
        v = vc[table_t[i, pos // block], pos % block].float().repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,chd->hc", q[i].float(), k) * scale, dim=-1)
        torch.testing.assert_close(out[i].float(), torch.einsum("hc,chd->hd", p, v), atol=ATOL_BF16, rtol=0,
                                   msg=f"head_dim {head_dim}, context {c}")


def test_a_head_dim_beyond_the_kernel_falls_back_to_torch():
    """head_dim 512 exceeds the kernel's bound: it declines, and paged attention still answers (torch)."""
    g = torch.Generator().manual_seed(3)
    kc = torch.randn(4, 4, 1, 512, generator=g).to(BF16)
    vc = torch.randn(4, 4, 1, 512, generator=g).to(BF16)
    plan = AttentionPlan.build([[2, 1]], [5], [1], 4)
    q = torch.randn(1, 2, 512, generator=g).to(BF16)
    nd = plan.native_decodes()
    assert not native.paged_decode_attention(q, kc, vc, torch.empty_like(q), nd.q_rows, nd.ctx, nd.tables, 0.1)
    out = paged_attention_torch(q, kc, vc, plan, 512**-0.5).float()
    torch.testing.assert_close(out, paged_attention_reference(q, kc, vc, [[2, 1]], [5], [1]), atol=ATOL_BF16, rtol=0)


# (tokens of the shared prefix, [own tokens past it of each sequence], block size, the keys the kernel shares among
# them: None, each alone): groups of one prefix, of more rows than one task takes (CHUNK_ROWS 24: 3 query heads a
# KV head, 9 sequences), blocks smaller than a tile of keys (4), a prefix of one tile (too short to share: each
# alone), a sequence whose own first token is still inside the prefix's last block (the group shares the whole
# blocks it sees), and own contexts of several of the kernel's chunks of keys (CHUNK_KEYS 128: the grouped rows'
# chunks start at the prefix's end, a row alone's at 0) with scores 8x sharper (their max moves by many powers of
# two from chunk to chunk).
SHARED_CASES = {
    "five-decodes-8-blocks": (32, [1, 8, 4, 13, 0], 4, 32),
    "twelve-decodes-several-tasks": (96, [3, 17, 40, 1, 9, 25, 2, 33, 12, 7, 60, 5], 16, 96),
    "one-tile-each-alone": (16, [5, 9, 2], 16, None),
    "ends-inside-the-prefix": (64, [30, -9, 2], 16, 48),
    "long-own-contexts-sharp-scores": (48, [200, 310, 5], 16, 48),
}
SHARP = {"long-own-contexts-sharp-scores": 8.0}  # the queries' scale in these cases (1 elsewhere)


@pytest.mark.parametrize(("case", "heads"), [*((c, (9, 3, 64)) for c in SHARED_CASES),
                                             ("twelve-decodes-several-tasks", (8, 2, 128)),
                                             ("five-decodes-8-blocks", (4, 4, 96))])
def test_decodes_sharing_a_prefix_attend_to_it_together_with_their_own_results(case, heads):
    """Decodes whose tables start with the same blocks attend to those keys together in the kernel (each tile's K
    and V unpacked once for all their rows), then each to its own keys: against the float32 oracle, and bit for
    bit what each gets alone; with a second group of another prefix and an unrelated sequence in the same call.
    `heads`: (query heads, KV heads, head_dim): the default model's grouping, 4 query heads a KV head at 128, and
    one query head a KV head at 96 (V widened through a buffer)."""
    prefix, own, bs, keys = SHARED_CASES[case]
    g = torch.Generator().manual_seed(len(own) * 31 + bs)
    nb, (h, kvh, d) = 160, heads
    kc = torch.randn(nb, bs, kvh, d, generator=g).to(BF16)
    vc = torch.randn(nb, bs, kvh, d, generator=g).to(BF16)
    ids = iter(torch.randperm(nb, generator=g).tolist())
    tables, starts = [], []
    for pre in (prefix, 2 * bs):  # this case's group, then a second prefix of 2 blocks shared by two sequences
        shared = [next(ids) for _ in range(-(-prefix // bs) if pre == prefix else 2)]
        for extra in (own if pre == prefix else [3, 11]):
            start = pre + extra
            need = -(-(start + 1) // bs)
            tables.append(shared[:need] + [next(ids) for _ in range(need - len(shared))])
            starts.append(start)
    starts.append(2 * bs + 5)  # alone
    tables.append([next(ids) for _ in range(-(-(starts[-1] + 1) // bs))])
    n = len(starts)
    q = (torch.randn(n, h, d, generator=g) * SHARP.get(case, 1.0)).to(BF16)
    plan = AttentionPlan.build(tables, starts, [1] * n, bs)
    nd = plan.native_decodes()
    groups = native.decode_attention_groups(nd.tables, nd.ctx, bs, nd.nq)
    want = ([(list(range(len(own))), keys)] if keys else []) + ([([len(own), len(own) + 1], 32)] if bs == 16 else [])
    assert sorted(groups) == sorted(want)  # the second prefix (2 blocks) is long enough to share at blocks of 16
    out = torch.full_like(q, float("nan"))
    assert native.paged_decode_attention(q, kc, vc, out, nd.q_rows, nd.ctx, nd.tables, d**-0.5, nd.nq)
    torch.testing.assert_close(out.float(), paged_attention_reference(q, kc, vc, tables, starts, [1] * n),
                               atol=ATOL_BF16, rtol=0)
    assert torch.equal(out, _each_alone(q, kc, vc, nd, d**-0.5))
