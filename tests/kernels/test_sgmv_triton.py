"""Triton SGMV (through the interpreter) against the fp32 oracle `sgmv_reference`."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.lora import LoraSegments, SlicedWeights, sgmv_reference, sgmv_torch_

pytestmark = pytest.mark.interpreter

# Tolerance per output dtype, as a fraction of the largest expected magnitude. The oracle computes in
# float32 from the same (already rounded) inputs, so what differs is the summation order and the one
# rounding of y to its dtype: float32 ~1e-7; float16 2^-11 relative; bfloat16 one step of 2^-7 relative
# (the interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LENGTHS = [1, 1, 2, 3, 5, 16, 17, 31, 40]  # request lengths: single tokens and lengths off the tile size


def requests(pattern: str, n_adapters: int, n_requests: int, rng: random.Random) -> list[tuple[int, int]]:
    """(slot, length) per request, in batch order, for an adapter-popularity pattern."""
    if pattern == "distinct":  # every request its own adapter
        slots = list(range(n_adapters))[:n_requests]
    elif pattern == "uniform":
        slots = [rng.randrange(n_adapters) for _ in range(n_requests)]
    elif pattern == "zipf":
        slots = rng.choices(range(n_adapters), weights=[1 / (i + 1) for i in range(n_adapters)], k=n_requests)
    elif pattern == "identical":
        slots = [1 % n_adapters] * n_requests
    elif pattern == "skewed":  # one hot adapter with long requests, the rest single tokens
        return [(0, 40) if i % 3 == 0 else (1 + i % (n_adapters - 1), 1) for i in range(n_requests)]
    elif pattern == "no-adapter-rows":
        slots = [rng.choice([-1, -1, *range(n_adapters)]) for _ in range(n_requests)]
    else:
        raise AssertionError(pattern)
    return [(s, rng.choice(LENGTHS)) for s in slots]


def adapters(ranks: list[int], d_in: int, d_out: int, seed: int = 0):
    """PEFT-layout A [r, in], B [out, r], scales, and the same as kernel weights (A^T, scale * B^T)."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, d_in, generator=g) / d_in**0.5 for r in ranks]
    b = [torch.randn(d_out, r, generator=g) for r in ranks]
    scales = [0.5 + i for i in range(len(ranks))]
    weights = [(ai.T.contiguous(), (bi * s).T.contiguous()) for ai, bi, s in zip(a, b, scales)]
    return a, b, scales, weights


def run(reqs, ranks, d_in, d_out, dtype=torch.float32, w_dtype=None, **kw):
    """Triton sgmv_ on a random batch; returns (y after, y before, expected y after, segments)."""
    from kernels.triton.sgmv import sgmv_

    w_dtype = w_dtype or dtype
    token_slots = [s for s, n in reqs for _ in range(n)]
    seg = LoraSegments.from_token_slots(token_slots)
    a, b, scales, weights = adapters(ranks, d_in, d_out)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(token_slots), d_in, generator=g).to(dtype)
    y0 = torch.randn(len(token_slots), d_out, generator=g).to(dtype)
    y = y0.clone()
    sgmv_(y, x, seg, [(at.to(w_dtype), bt.to(w_dtype)) for at, bt in weights], **kw)
    # the oracle sees the weights as the kernel does: rounded to w_dtype, the scale folded into B
    a_r = [at.to(w_dtype).float().T for at, _ in weights]
    b_r = [bt.to(w_dtype).float().T for _, bt in weights]
    want = y0.float() + sgmv_reference(x.float(), seg, a_r, b_r, [1.0] * len(ranks))
    return y, y0, want, token_slots


def check(y, y0, want, token_slots, dtype):
    assert y.dtype == dtype
    err = (y.float() - want).abs().max().item()
    assert err <= TOL[dtype] * want.abs().max().item(), (err, want.abs().max().item())
    rows = torch.tensor([s < 0 for s in token_slots])
    assert torch.equal(y[rows], y0[rows])  # rows without an adapter are left exactly as they were
    assert (want - y0.float()).abs().max() > 1  # the deltas are not negligible against the tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["distinct", "uniform", "zipf", "identical", "skewed", "no-adapter-rows"])
def test_popularity_and_dtypes(pattern, dtype):
    reqs = requests(pattern, 4, 8, random.Random(pattern))
    check(*run(reqs, [8, 16, 64, 16], 64, 48, dtype), dtype)


@pytest.mark.parametrize(("d_in", "d_out"), [(64, 64), (80, 112)])
@pytest.mark.parametrize("ranks", [[8] * 3, [16] * 3, [64] * 3, [64, 8, 16]], ids=["r8", "r16", "r64", "mixed"])
def test_ranks_and_hidden_sizes(ranks, d_in, d_out):
    reqs = requests("uniform", 3, 6, random.Random(len(ranks) + d_in))
    check(*run(reqs, ranks, d_in, d_out), torch.float32)


@pytest.mark.parametrize("n_adapters", [1, 2, 7])
def test_number_of_adapters(n_adapters):
    reqs = requests("uniform", n_adapters, 9, random.Random(n_adapters))
    check(*run(reqs, [8 * (1 + i % 3) for i in range(n_adapters)], 32, 40), torch.float32)


@pytest.mark.parametrize("lengths", [[1] * 12, [15, 16, 17, 33], [1, 40, 1, 2, 1]],
                         ids=["decode", "tile-edges", "mixed"])
def test_segment_lengths(lengths):
    reqs = [(i % 3, n) for i, n in enumerate(lengths)]
    check(*run(reqs, [8, 16, 8], 48, 32, block_m=16), torch.float32)


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_shrink_split_k(split_k):
    """The decode-shaped shrink splits K over programs that add atomically; every split gives the same sum."""
    reqs = [(0, 1), (1, 1), (-1, 1), (2, 3)]
    check(*run(reqs, [16, 8, 64], 256, 32, split_k=split_k), torch.float32)


def test_model_dtypes_bf16_activations_fp32_weights():
    """The model's mix: bf16 activations and output, float32 LoRA weights."""
    reqs = requests("zipf", 3, 6, random.Random(5))
    check(*run(reqs, [8, 16, 32], 64, 48, torch.bfloat16, w_dtype=torch.float32), torch.bfloat16)


def test_strided_input_and_output():
    from kernels.triton.sgmv import sgmv_

    seg = LoraSegments.from_token_slots([0, 0, 1, -1, 1, 1, 1])
    a, b, scales, weights = adapters([8, 16], 32, 24)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 50, generator=g)[:, 5:37]  # a column window: row stride 50
    big = torch.randn(7, 40, generator=g)
    before = big.clone()
    y = big[:, 8:32]  # the output is a slice of a wider tensor (like q/k/v of a fused projection)
    want = y.clone() + sgmv_reference(x, seg, a, b, scales)
    sgmv_(y, x, seg, weights)
    torch.testing.assert_close(y, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(big[:, 32:], before[:, 32:])


def fused_qkv(targets: dict[str, int], d_in: int, outs: dict[str, int], seed: int) -> SlicedWeights:
    """A fused q/k/v adapter targeting `targets` {module: rank}: the model's block-diagonal layout."""
    g = torch.Generator().manual_seed(seed)
    ranks = [targets.get(m, 0) for m in outs]
    a_t = torch.randn(d_in, sum(ranks), generator=g) / d_in**0.5
    b_t = torch.zeros(sum(ranks), sum(outs.values()))
    r0 = o0 = 0
    for r, o in zip(ranks, outs.values()):
        b_t[r0 : r0 + r, o0 : o0 + o] = torch.randn(r, o, generator=g)
        r0, o0 = r0 + r, o0 + o
    return SlicedWeights(a_t, b_t, ranks, list(outs.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_slices_write_parts_of_one_output(dtype):
    """q/k/v in one launch: slots targeting different modules (q+v, all three, k only) each write only
    their slices of the fused output; a plain (A^T, B^T) pair beside them reads all its rank rows."""
    from kernels.triton.sgmv import sgmv_

    outs = {"q": 48, "k": 16, "v": 16}
    fused = [fused_qkv({"q": 8, "v": 8}, 32, outs, 0), fused_qkv({"q": 16, "k": 8, "v": 64}, 32, outs, 1),
             fused_qkv({"k": 16}, 32, outs, 2), fused_qkv({"q": 8, "k": 8, "v": 8}, 32, outs, 3)]
    slots = [SlicedWeights(w[0].to(dtype), w[1].to(dtype), w.ranks, w.outs) for w in fused[:3]]
    slots.append((fused[3][0].to(dtype), fused[3][1].to(dtype)))  # plain pair: no slice information
    token_slots = [0, 0, 0, 1, -1, 2, 2, 3, 3, 3, 1] + [1] * 20
    seg = LoraSegments.from_token_slots(token_slots)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(len(token_slots), 32, generator=g).to(dtype)
    y0 = torch.randn(len(token_slots), 80, generator=g).to(dtype)
    y = y0.clone()
    sgmv_(y, x, seg, slots)
    a, b = [w[0].float().T for w in slots], [w[1].float().T for w in slots]
    want = y0.float() + sgmv_reference(x.float(), seg, a, b, [1.0] * 4)
    check(y, y0, want, token_slots, dtype)
    # slot 2 targets k only: its rows keep q and v exactly
    rows = torch.tensor([s == 2 for s in token_slots])
    assert torch.equal(y[rows][:, :48], y0[rows][:, :48]) and torch.equal(y[rows][:, 64:], y0[rows][:, 64:])


def test_matches_torch_path_on_random_batches():
    """Both implementations of ops.sgmv_ agree on a few random batches (same inputs, same weights)."""
    from kernels.triton.sgmv import sgmv_

    rng = random.Random(7)
    for trial in range(3):
        reqs = requests(rng.choice(["uniform", "zipf", "no-adapter-rows"]), 5, 7, rng)
        token_slots = [s for s, n in reqs for _ in range(n)]
        seg = LoraSegments.from_token_slots(token_slots)
        _, _, _, weights = adapters([8, 16, 64, 8, 32], 48, 40, seed=trial)
        weights[3] = None  # an adapter that does not target this projection
        x = torch.randn(len(token_slots), 48, generator=torch.Generator().manual_seed(trial))
        y0 = torch.randn(len(token_slots), 40)
        y_torch, y_triton = sgmv_torch_(y0.clone(), x, seg, weights), sgmv_(y0.clone(), x, seg, weights)
        torch.testing.assert_close(y_triton, y_torch, atol=1e-5 * y_torch.abs().max().item(), rtol=0)


@pytest.mark.parametrize("with_sliced", [False, True], ids=["pairs", "sliced"])
def test_fixed_shape_sgmv_from_tables_matches_the_oracle(with_sliced):
    """The graph-replay form: tiles and slot tables in fixed buffers, padded with empty tiles, the launch shaped
    by the tables' rank capacity rather than by the slots; decode-sized segments of mixed ranks beside base rows."""
    from kernels.triton.common import MIN_DOT
    from kernels.triton.sgmv import SlotTables, sgmv_static_, static_tile_capacity, static_tiles

    d_in, outs = 64, (48, 16, 16)
    ranks = [8, 16, 4, 0]  # slot 3 holds an adapter of rank 0; slot 2 is filled then emptied below
    slot_of_row = [0, 0, 0, -1, 1, 1, -1, 2, 3] + [0] * 18  # 18 rows of slot 0: two tiles
    n = len(slot_of_row)
    a, b, scales, pairs = adapters(ranks, d_in, sum(outs), seed=3)
    if with_sliced:  # B^T zero off the slices: slot i's rank rows feed slice i % 3 only
        pairs = [(at, torch.zeros_like(bt)) for at, bt in pairs]
        for i, (_, bt) in enumerate(pairs):
            lo = sum(outs[: i % 3])
            bt[:, lo : lo + outs[i % 3]] = (b[i] * scales[i]).T[:, lo : lo + outs[i % 3]]
        weights = [SlicedWeights(at, bt, [r if j == i % 3 else 0 for j in range(3)], outs)
                   for i, ((at, bt), r) in enumerate(zip(pairs, ranks))]
    else:
        weights = list(pairs)
    cap = static_tile_capacity(64, len(weights))  # a bucket of 64 rows: room for padding tiles
    flat = torch.zeros(sum(SlotTables.sizes(len(weights), 3)), dtype=torch.int64)
    tables = SlotTables.views(flat, len(weights), outs, 16, MIN_DOT, MIN_DOT, float_dtype_of(torch.float32))
    tables.fill([*weights[:2], None, weights[3]])  # a slot emptied: its rows get nothing
    segments = [(0, 3, 0), (3, 4, -1), (4, 6, 1), (6, 7, -1), (7, 8, 2), (8, 9, 3), (9, n, 0)]
    tiles = torch.tensor(static_tiles(segments, cap), dtype=torch.int64).view(cap, 3)
    assert (tiles[:, 1] <= tiles[:, 0]).sum() > 0  # padding tiles are launched too
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=g)
    y0 = torch.randn(n, sum(outs), generator=g)
    y = sgmv_static_(y0.clone(), x, tiles, tables)
    seg = LoraSegments.from_token_slots([s if s != 2 else -1 for s in slot_of_row])
    want = y0 + sgmv_reference(x, seg, [w[0].T for w in weights], [w[1].T for w in weights], [1.0] * 4)
    assert (want - y0).abs().max() > 1
    assert (y - want).abs().max() <= TOL[torch.float32] * want.abs().max()
    untouched = torch.tensor([s in (-1, 2, 3) for s in slot_of_row])
    assert torch.equal(y[untouched], y0[untouched])


def test_fixed_shape_sgmv_refuses_what_it_cannot_launch():
    """Bad input: more tiles than the launch holds, a slot over the rank capacity, tiles of the wrong shape."""
    from kernels.triton.common import MIN_DOT
    from kernels.triton.sgmv import SlotTables, sgmv_static_, static_tiles

    _, _, _, weights = adapters([32], 16, 16)
    flat = torch.zeros(sum(SlotTables.sizes(1, 1)), dtype=torch.int64)
    tables = SlotTables.views(flat, 1, (16,), 16, MIN_DOT, MIN_DOT, float_dtype_of(torch.float32))
    with pytest.raises(ValueError, match="rank 32 exceeds the static launch's rank 16"):
        tables.fill(weights)
    with pytest.raises(ValueError, match="LoRA tiles exceed the static launch's 1"):
        static_tiles([(0, 40, 0)], 1)
    with pytest.raises(ValueError, match=r"int64 \[capacity, 3\]"):
        sgmv_static_(torch.zeros(2, 16), torch.zeros(2, 16), torch.zeros(2, 2, dtype=torch.int64), tables)


def float_dtype_of(dtype: torch.dtype):
    from kernels.triton.common import float_dtype

    return float_dtype(torch.empty(0, dtype=dtype), "weights")
