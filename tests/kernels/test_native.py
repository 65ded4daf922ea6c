"""The C decode kernels (kernels/cpu/decode.c through kernels.native) against float32 oracles, and their
fallback: every op gives the torch result when the kernels are off or a shape is beyond them. (The paged
attention kernel: tests/kernels/test_native_attention.py.)"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels import native, native_matmul
from kernels.attention import rope_write_kv_torch
from kernels.ops import TorchKernels

BF16 = torch.bfloat16
# bf16 outputs of float32 sums: one rounding of a value of magnitude <= ~4 (2^-8 relative) and the bf16 inputs
ATOL_BF16 = 3e-2


def test_the_kernels_build_here():
    """CI machines have a C compiler: the fast path must be what the tests exercise, not the fallback."""
    assert native.library() is not None, native.unavailable_reason()


def _rope_tables(d: int, max_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    emb = torch.cat([f, f], -1)
    return emb.cos().float(), emb.sin().float()


def test_rope_and_kv_write_match_the_fp32_oracle():
    g = torch.Generator().manual_seed(1)
    t, h, kvh, d, nb, bs = 5, 6, 2, 16, 8, 4
    cos, sin = _rope_tables(d)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g)
    positions = torch.tensor([0, 3, 17, 40, 63])
    slots = torch.tensor([9, 2, 30, 17, 0])
    kc, vc = torch.zeros(nb, bs, kvh, d, dtype=BF16), torch.zeros(nb, bs, kvh, d, dtype=BF16)
    q = native.rope_write_kv(qkv.to(BF16), positions, cos, sin, kc, vc, slots, h)
    assert q is not None and q.shape == (t, h, d) and q.dtype == BF16
    # oracle: the torch op in float32 on the same (bf16-rounded) inputs
    kc32, vc32 = torch.zeros(nb, bs, kvh, d), torch.zeros(nb, bs, kvh, d)
    q32 = rope_write_kv_torch(qkv.to(BF16).float(), positions, cos, sin, kc32, vc32, slots, h)
    torch.testing.assert_close(q.float(), q32, atol=ATOL_BF16, rtol=0)
    torch.testing.assert_close(kc.float(), kc32, atol=ATOL_BF16, rtol=0)
    assert torch.equal(vc.float(), vc32)  # v is copied, not computed
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots] = True
    assert (kc.view(nb * bs, -1)[~written] == 0).all() and (vc.view(nb * bs, -1)[~written] == 0).all()


def test_add_rms_norm_matches_torch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 96, generator=g) * 3
    delta = torch.randn(7, 96, generator=g).to(BF16)
    w = torch.rand(96, generator=g) + 0.5
    want_x = x + delta.float()
    want = F.rms_norm(want_x, (96,), w, 1e-5)
    got = native.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(x, want_x)  # the residual add is exact in float32
    torch.testing.assert_close(got.float(), want, atol=ATOL_BF16, rtol=0)
    # without a delta it is the norm alone
    torch.testing.assert_close(native.add_rms_norm(x, None, w, 1e-5).float(), want, atol=ATOL_BF16, rtol=0)


@pytest.mark.parametrize("tokens, inter", [(4, 40), (9, 1536), (1, 1100)])  # one chunk; split rows; a ragged chunk
def test_silu_mul_matches_torch(tokens, inter):
    gu = (torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(4)) * 8).to(BF16)  # large |a|
    want = F.silu(gu[:, :inter].float()) * gu[:, inter:].float()
    torch.testing.assert_close(native.silu_mul(gu).float(), want, atol=ATOL_BF16, rtol=1e-2)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 7), (3, 16), (64, 49152), (5, 1003)])
def test_argmax_rows_is_torchs_argmax(rows, vocab):
    """Greedy choice in one C pass: the same index as torch's argmax, ties to the first (each row holds its max
    twice), -inf masks, vocabularies not a multiple of the 16-wide vectors."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g)
    x[:, ::3] = float("-inf")  # masked tokens
    for r in range(rows):
        hi = torch.randperm(vocab, generator=g)[:2]
        x[r, hi] = 100.0 + r  # a tie: the lower index wins
    got = native.argmax_rows(x)
    assert got is not None and torch.equal(got, x.argmax(1))


def test_argmax_rows_leaves_a_row_with_nan_to_torch():
    """A NaN in a row (a broken model): the kernel declines, so the caller's torch argmax decides as it always did."""
    x = torch.zeros(2, 40)
    x[1, 33] = float("nan")
    assert native.argmax_rows(x) is None
    assert native.argmax_rows(torch.zeros(2, 4, dtype=torch.float64)) is None  # not float32: declined


def test_torch_kernels_give_the_same_results_without_the_c_kernels(monkeypatch):
    """LORASERVE_NATIVE=0: the library is not loaded, the reason says why, and every fused op answers with torch
    ops within bf16 rounding of the C kernels' answer."""
    g = torch.Generator().manual_seed(5)
    kn = TorchKernels()
    x = torch.randn(3, 32, generator=g)
    delta = torch.randn(3, 32, generator=g).to(BF16)
    w = torch.rand(32, generator=g) + 0.5
    gu = torch.randn(3, 64, generator=g).to(BF16)
    with_c = (kn.add_rms_norm(x.clone(), delta, w, 1e-6, BF16), kn.silu_mul(gu))
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_lib", None)
    assert native.library() is None and native.unavailable_reason() == f"{native.NATIVE_ENV}=0"
    without = (kn.add_rms_norm(x.clone(), delta, w, 1e-6, BF16), kn.silu_mul(gu))
    for a, b in zip(with_c, without):
        torch.testing.assert_close(a.float(), b.float(), atol=ATOL_BF16, rtol=1e-2)


def test_the_build_is_cached_by_content(tmp_path, monkeypatch):
    """A second start finds the library built by the first (no compiler run), under a name keyed by the source."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    cc = native._compiler()
    first = native._build(cc)
    mtime = os.stat(first).st_mtime_ns
    assert native._build(cc) == first and os.stat(first).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def _q8_bound(x: torch.Tensor, w) -> torch.Tensor:
    """What quantizing x to int8 per group of 32 may cost: per group, |error of x| <= amax / 254 per element,
    times the sum of the group's |weights|; plus the bf16 rounding of the output. [M, N]"""
    m, k = x.shape
    xg = x.float().view(m, k // 32, 32)
    half_step = xg.abs().amax(-1) / 254  # [M, G]
    wabs = w.dequantize().abs().view(w.shape[0], k // 32, 32).sum(-1)  # [N, G]
    return half_step @ wabs.T


@pytest.mark.parametrize("m", [1, 3, 8])
def test_q8_gemv_within_the_bound_of_its_activation_rounding(m):
    from kernels.quant import quantize_int8
    from kernels.quant_cpu import _q8_sums

    if not native_matmul.gemv_available():
        pytest.skip("this CPU lacks AVX512-VNNI: the VNNI int8 kernel cannot run here (its AVX2 counterpart: "
                    "tests/kernels/test_cpu_without_bf16.py)")
    g = torch.Generator().manual_seed(m)
    w = quantize_int8(torch.randn(200, 576, generator=g) * 0.05, 32)
    x = torch.randn(m, 576, generator=g).to(BF16)
    y = native_matmul.q8_gemv(x, w.qweight, w.scales, _q8_sums(w))
    assert y is not None and y.shape == (m, 200) and y.dtype == BF16
    ref = x.float() @ w.dequantize().T
    err = (y.float() - ref).abs()
    assert (err <= _q8_bound(x, w) + ref.abs() * 2**-8 + 1e-6).all(), err.max()
    assert err.max() > 0  # it does round: the test would notice a kernel that silently did something else


def test_linear_takes_the_int8_kernel_for_decode_rows_only(monkeypatch):
    """bf16, groups of 32, M <= 8, without the tiled int8 kernel (taken away here where the CPU has it; its own
    tests: tests/kernels/test_tiled_quant.py): the C kernel (its prepacked sums appear); M = 9 and K not a multiple
    of 64 go to the other paths; every answer stays close to float32."""
    from kernels.quant import quantize_int8
    from kernels.quant_cpu import linear

    monkeypatch.setattr(native_matmul, "q8t_available", lambda: False)
    if not native_matmul.gemv_available():
        pytest.skip("this CPU lacks AVX512-VNNI: linear cannot take the VNNI int8 kernel here (the AVX2 one's "
                    "dispatch: tests/kernels/test_cpu_without_bf16.py)")
    g = torch.Generator().manual_seed(9)
    w = quantize_int8(torch.randn(64, 576, generator=g) * 0.05, 32)
    for m in (9, 1):  # 9 first: the kernel's sums are built on its first use
        x = torch.randn(m, 576, generator=g).to(BF16)
        ref = x.float() @ w.dequantize().T
        torch.testing.assert_close(linear(x, w).float(), ref, atol=0.02, rtol=0.02)
        assert ("q8sums" in w.packed) == (m == 1)
    odd = quantize_int8(torch.randn(64, 96, generator=g) * 0.05, 32)  # K = 96: not a multiple of 64
    assert native_matmul.q8_gemv(torch.zeros(1, 96, dtype=BF16), odd.qweight, odd.scales, odd.scales) is None


def _sliced_lora(g: torch.Generator, in_dim: int, ranks: tuple[int, ...], outs: tuple[int, ...], wdtype: torch.dtype,
                 scale: float = 1.0):
    """Random fused-group LoRA weights as the CPU path holds them (`SlicedWeights`: A^T and a block-diagonal B^T
    whose slice j has ranks[j] rows, 0 = no LoRA there) and, for the float32 oracle, the same (rounded) weights in
    PEFT's layout: A [r, in], B [out, r]."""
    from kernels.lora import SlicedWeights

    a_t = (torch.randn(in_dim, sum(ranks), generator=g) * scale).to(wdtype)
    b_t = torch.block_diag(*[torch.randn(r, o, generator=g) * scale for r, o in zip(ranks, outs)]).to(wdtype)
    return SlicedWeights(a_t, b_t, ranks, outs), a_t.float().T, b_t.float().T


def _recording_sgmv(monkeypatch) -> list:
    """The segment lists `native.sgmv_` is called with, one entry per call (("long", segments) for the kernel of
    prompt-sized segments)."""
    calls: list = []
    kernel = native.sgmv_
    monkeypatch.setattr(native, "sgmv_", lambda *a, **k: calls.append(("long", a[2]) if k.get("long") else a[2])
                        or kernel(*a, **k))
    return calls


def _on_two_threads(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "no-bf16-cpu"])
@pytest.mark.parametrize("wdtype", [torch.float32, BF16], ids=["float32-weights", "bfloat16-weights"])
def test_sgmv_decode_segments_match_the_reference_with_fused_slices(monkeypatch, wdtype, native_bf16):
    """A fused q/k/v-like group (outputs 32 + 8 + 8) over four slots of different ranks, one projection left
    out by one adapter (rank 0), a slot without weights, a no-adapter segment, a 37-row segment and a long
    (prefill, 70 rows) segment beside the short ones: the C kernel takes the segments of up to 64 rows and, on a
    CPU without bf16 products or with the C kernel for prompt-sized segments, the long one too (else torch takes
    it); all match the float32 per-token oracle on the same weights. With weights held in bfloat16
    (what the CPU path holds) the oracle reads those rounded weights: the short segments' products are exact and
    their sums float32, their intermediate rounded to bf16 where the CPU has AVX512-BF16 (pair dot products; within
    the same tolerance here); segments of more than 24 rows round their intermediate to bf16 where the C build has
    the kernel for prompt-sized segments."""
    import kernels.lora
    from kernels.lora import LoraSegments, sgmv_cpu_, sgmv_reference

    monkeypatch.setattr(kernels.lora, "native_bf16", lambda: native_bf16)

    g = torch.Generator().manual_seed(11)
    in_dim, outs = 24, (32, 8, 8)
    slot_ranks = [(4, 4, 4), (8, 0, 2), (16, 16, 16), None]
    weights, a_list, b_list, scales = [], [], [], []
    for rs in slot_ranks:
        if rs is None:
            weights.append(None)
            a_list.append(None)
            b_list.append(None)
            scales.append(1.0)
            continue
        w, a, b = _sliced_lora(g, in_dim, rs, outs, wdtype)
        weights.append(w)
        a_list.append(a)
        b_list.append(b)
        scales.append(1.0)
    # a 37-row segment (blocks of 8 rows and a last one of 5 on two threads) and a prefill-long one (rows 46..115)
    slots = [0, 0, 1, -1, 2, 2, 2, 3] + [1] * 37 + [0] + [2] * 70
    seg = LoraSegments.from_token_slots(slots)
    x = torch.randn(len(slots), in_dim, generator=g).to(BF16)
    y0 = torch.randn(len(slots), sum(outs), generator=g).to(BF16)
    want = y0.float() + sgmv_reference(x.float(), seg, a_list, b_list, scales)
    calls = _recording_sgmv(monkeypatch)
    got = sgmv_cpu_(y0.clone(), x, seg, weights)
    short = [(0, 2), (2, 3), (4, 7), (8, 45), (45, 46)]  # the segments with weights up to 64 rows
    # the long one too where the kernel has vector tiles (not its plain-C loops) and bf16 is not native or the build
    # has the kernel for prompt-sized segments (AVX512-BF16, which the C entry gives it); else torch takes it
    long_to_c = native.sgmv_path() != "portable" and (not native_bf16 or native.sgmv_long_available())
    assert calls == ([[*short, (46, 116)]] if long_to_c else [short])
    # the C kernel's rows: one bf16 rounding of y (values ~10)
    torch.testing.assert_close(got[:8].float(), want[:8], atol=0.1, rtol=2e-2)
    # segments of more than 24 rows with bf16 weights: the C build's kernel for prompt-sized segments where it has
    # one (AVX512-BF16), and torch where bf16 is native and the segment is past 64 rows: each runs the product in
    # bf16 pairs and rounds the rank-sized intermediate (values up to ~15, 16 ranks summed into each output) once
    # more; else one rounding as above
    mid_atol = 0.3 if wdtype == BF16 and native.sgmv_long_available() else 0.1
    torch.testing.assert_close(got[8:46].float(), want[8:46], atol=mid_atol, rtol=2e-2)
    long_atol = 0.3 if wdtype == BF16 and (native.sgmv_long_available() or not long_to_c) else 0.1
    torch.testing.assert_close(got[46:].float(), want[46:], atol=long_atol, rtol=2e-2)
    assert torch.equal(got[3], y0[3])  # the no-adapter row is untouched
    assert torch.equal(got[7], y0[7])  # so is the row of the slot that holds nothing


@pytest.mark.parametrize("wdtype", [torch.float32, BF16], ids=["float32-weights", "bfloat16-weights"])
def test_sgmv_one_adapters_decode_batch_is_split_over_threads(monkeypatch, wdtype):
    """64 decode rows of one adapter (the default model's q/k/v shapes, rank 16 per slice): one segment, large
    enough that the kernel's threads split its rows; each row matches the float32 oracle (on the weights as
    held) within one bf16 rounding of y."""
    from kernels.lora import LoraSegments, sgmv_cpu_, sgmv_reference

    g = torch.Generator().manual_seed(12)
    in_dim, outs = 576, (576, 192, 192)
    w, a, b = _sliced_lora(g, in_dim, (16, 16, 16), outs, wdtype, 0.05)
    seg = LoraSegments.from_token_slots([0] * 64)
    x = torch.randn(64, in_dim, generator=g).to(BF16)
    y0 = torch.randn(64, sum(outs), generator=g).to(BF16)
    want = y0.float() + sgmv_reference(x.float(), seg, [a], [b], [1.0])
    calls = _recording_sgmv(monkeypatch)
    got = _on_two_threads(lambda: sgmv_cpu_(y0.clone(), x, seg, [w]))
    assert calls == [[(0, 64)]]  # the C kernel took it
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=2e-2)  # one bf16 rounding of y (values ~3)


@pytest.mark.parametrize("in_dim", [40, 41])
@pytest.mark.parametrize("wdtype", [torch.float32, BF16], ids=["float32-weights", "bfloat16-weights"])
def test_sgmv_odd_ranks_and_widths_match_the_reference_in_every_block_kind(monkeypatch, wdtype, in_dim):
    """Ranks and output widths that are not multiples of 8 or 16 (the kernels' vector tails: slices of 21 and 13
    columns, ranks 5 + 11, 3 + 0 and 24 + 9; an odd in_dim, 41, leaves the pair dot products' last input alone)
    over segments of 1, 3, 4, 6, 13 and 70 rows (every block kind: two, four and the long segments' rows), all
    through the C kernel (told to take every length, whatever its build would choose): each row within one bf16
    rounding of the float32 oracle."""
    import sys

    import kernels.lora
    from kernels.lora import LoraSegments, sgmv_cpu_, sgmv_reference

    monkeypatch.setattr(kernels.lora, "native_segment_rows", lambda: sys.maxsize)
    g = torch.Generator().manual_seed(13)
    outs = (21, 13)
    weights, a_list, b_list = zip(*[_sliced_lora(g, in_dim, rs, outs, wdtype, 0.2)
                                    for rs in [(5, 11), (3, 0), (24, 9)]])
    slots = [0] + [1] * 3 + [2] * 4 + [0] * 6 + [1] * 13 + [2] * 70
    seg = LoraSegments.from_token_slots(slots)
    x = torch.randn(len(slots), in_dim, generator=g).to(BF16)
    y0 = torch.randn(len(slots), sum(outs), generator=g).to(BF16)
    want = y0.float() + sgmv_reference(x.float(), seg, a_list, b_list, [1.0] * 3)
    calls = _recording_sgmv(monkeypatch)
    got = _on_two_threads(lambda: sgmv_cpu_(y0.clone(), x, seg, weights))
    assert calls == [list(zip(seg.starts, seg.ends))]  # the C kernel took every segment
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=2e-2)  # one bf16 rounding of y (values ~4)


@pytest.mark.parametrize("without", [("-mno-avx512bf16",), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
                         ids=["avx512-without-bf16", "avx2", "plain-c"])
@pytest.mark.parametrize("wdtype", [torch.float32, BF16], ids=["float32-weights", "bfloat16-weights"])
def test_the_sgmv_built_for_a_smaller_instruction_set_gives_the_same_deltas(tmp_path, monkeypatch, wdtype, without):
    """The SGMV kernel's AVX-512 path on float32 sums (CPUs without AVX512-BF16's pair dot products), its AVX2 path
    (CPUs without AVX-512) and its plain-C path (neither): the kernels built for such a CPU, run here, on the cases
    above (the fused slices on both CPU policies, the 64-row batch, the odd ranks, widths and in_dim). On a CPU
    without AVX-512 the first build is the second; without AVX2, each is the plain-C one."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    lib = native.build_library(native._compiler(), (*native.FLAGS, *without))
    monkeypatch.setattr(native, "_lib", lib)
    monkeypatch.setattr(native, "_loaded", True)  # a first library() call must not load the default build over it
    assert native.library() is lib
    for bf16_cpu in (True, False):
        test_sgmv_decode_segments_match_the_reference_with_fused_slices(monkeypatch, wdtype, bf16_cpu)
    test_sgmv_one_adapters_decode_batch_is_split_over_threads(monkeypatch, wdtype)
    for in_dim in (40, 41):
        test_sgmv_odd_ranks_and_widths_match_the_reference_in_every_block_kind(monkeypatch, wdtype, in_dim)
    test_sgmv_of_many_one_row_adapters_matches_the_reference(monkeypatch, wdtype)


def test_lora_group_refuses_a_table_that_does_not_fit_and_changes_nothing():
    """`native.lora_group_` on bad input: a segment past the batch's rows, a group index past the four groups, a
    layer past the table, activations in float32: each answers False with y untouched (the caller then runs
    `sgmv_`); the same table on a fitting batch applies the delta."""
    from kernels.lora import LoraSegments, fused_lora, sgmv_cpu_

    g = torch.Generator().manual_seed(3)
    groups = {"qkv": (16, (8, 4, 4)), "o": (8, (16,)), "gate_up": (16, (12, 12)), "down": (12, (16,))}
    layer = {name: [_sliced_lora(g, ind, (4,) * len(outs), outs, BF16)[0]] for name, (ind, outs) in groups.items()}
    seg = LoraSegments.from_token_slots([0] * 6)
    table = fused_lora(seg, [layer])
    assert table is not None and table.nseg == 1
    x = torch.randn(6, 16, generator=g).to(BF16)
    y = torch.randn(6, 16, generator=g).to(BF16)
    before = y.clone()
    assert not native.lora_group_(y[:4], x[:4], table, 0, 0)  # the segment ends at row 6 of a 4-row batch
    assert not native.lora_group_(y, x, table, 0, 4)  # group 4: there are four, 0-3
    assert not native.lora_group_(y, x, table, 1, 0)  # layer 1 of a one-layer table
    assert not native.lora_group_(y.float(), x.float(), table, 0, 0)  # float32 activations
    assert torch.equal(y, before)
    assert native.lora_group_(y, x, table, 0, 0) and not torch.equal(y, before)
    assert torch.equal(y, sgmv_cpu_(before.clone(), x, seg, layer["qkv"]))  # the delta sgmv_ adds, to the bit


@pytest.mark.parametrize("wdtype", [torch.float32, BF16], ids=["float32-weights", "bfloat16-weights"])
def test_sgmv_of_many_one_row_adapters_matches_the_reference(monkeypatch, wdtype):
    """A decode step of 32 requests under 32 adapters (one row each, ranks 8 and 16, the default model's gate/up
    shapes): few rows but megabytes of weights, so the kernel's threads split the segments; every row within one
    bf16 rounding of the float32 oracle."""
    import kernels.lora
    from kernels.lora import LoraSegments, sgmv_cpu_, sgmv_reference

    monkeypatch.setattr(kernels.lora, "native_bf16", lambda: False)
    g = torch.Generator().manual_seed(14)
    in_dim, outs = 576, (1536, 1536)
    weights, a_list, b_list = zip(*[_sliced_lora(g, in_dim, (r, r), outs, wdtype, 0.05)
                                    for r in [8 if i % 2 else 16 for i in range(32)]])
    seg = LoraSegments.from_token_slots(list(range(32)))
    x = torch.randn(32, in_dim, generator=g).to(BF16)
    y0 = torch.randn(32, sum(outs), generator=g).to(BF16)
    want = y0.float() + sgmv_reference(x.float(), seg, a_list, b_list, [1.0] * 32)
    got = _on_two_threads(lambda: sgmv_cpu_(y0.clone(), x, seg, weights))
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=2e-2)  # one bf16 rounding of y (values ~3)


@pytest.mark.parametrize("outs", [(32, 8, 8), (20, 36), (40,)], ids=["qkv-like", "two-odd-widths", "one-slice"])
def test_sgmv_long_segments_match_the_reference_with_the_intermediate_in_bf16(outs):
    """The kernel for prompt-sized segments (`native.sgmv_(..., long=True)`, AVX512-BF16): segments of 1, 9, 65,
    100 and 130 rows (blocks of 8 and every remainder) over four slots, with slices of odd rank (whose last pair
    reads the next slice's row of B^T, a block-diagonal zero), a slice of rank 0, ranks past 16 and 32 (several
    passes of lanes) and output widths not a multiple of 16; the last segment ends at the batch's last row. Against
    the float32 oracle with the rank-sized intermediate rounded to bf16 (as the kernel and torch's bf16 products
    round it): one bf16 rounding of y, plus one of the intermediate where the sums' order tips it. Float32 weights
    and an odd input width are refused with nothing changed."""
    if not native.sgmv_long_available():
        pytest.skip(f"this CPU (or its C build) lacks AVX512-BF16: {native.unavailable_reason() or 'no AVX512-BF16'}")
    g = torch.Generator().manual_seed(len(outs))
    in_dim = 96
    slot_ranks = [(5, 0, 3)[:len(outs)], (24, 7, 40)[:len(outs)], (1, 1, 1)[:len(outs)], (48, 33, 2)[:len(outs)]]
    ws = [_sliced_lora(g, in_dim, rs, outs, BF16, 0.3) for rs in slot_ranks]
    lengths = [1, 9, 65, 100, 130]
    segs, t = [], 0
    for n in lengths:
        segs.append((t, t + n))
        t += n
    slots = [i % len(ws) for i in range(len(segs))]
    x = torch.randn(t, in_dim, generator=g).to(BF16)
    y0 = torch.randn(t, sum(outs), generator=g).to(BF16)
    want = y0.float().clone()
    for (s0, s1), slot in zip(segs, slots):
        w = ws[slot][0]
        mid = (x[s0:s1].float() @ w[0].float()).to(BF16).float()
        want[s0:s1] += mid @ w[1].float()
    y = y0.clone()
    assert native.sgmv_(y, x, segs, [ws[s][0][0] for s in slots], [ws[s][0][1] for s in slots],
                        [ws[s][0].ranks for s in slots], outs, long=True)
    torch.testing.assert_close(y.float(), want, atol=0.05, rtol=2e-2)  # values ~5
    assert (y != y0).any(dim=1).all()  # every row got its delta
    w32 = [(a.float(), b.float()) for a, b in (ws[s][0] for s in slots)]
    y = y0.clone()
    assert not native.sgmv_(y, x, segs, [a for a, _ in w32], [b for _, b in w32], [ws[s][0].ranks for s in slots],
                            outs, long=True)  # float32 weights
    odd = torch.randn(t, in_dim - 1, generator=g).to(BF16)
    assert not native.sgmv_(y, odd, segs, [ws[s][0][0][:-1].contiguous() for s in slots],
                            [ws[s][0][1] for s in slots], [ws[s][0].ranks for s in slots], outs, long=True)
    assert torch.equal(y, y0)


def test_the_sgmv_path_of_each_build_and_where_prefill_segments_go(tmp_path, monkeypatch):
    """The SGMV kernel's path in builds for smaller instruction sets (`native.sgmv_path`), and the segment length
    `sgmv_cpu_` gives it: every length with vector tiles where bf16 is not native, 64 rows where bf16 is native
    or where only its plain-C loops exist (prefill chunks then stay with torch's matmuls); every length in a build
    with the kernel for prompt-sized segments (AVX512-BF16), which its entry gives the segments past 24 rows."""
    import sys

    import kernels.lora
    from kernels.lora import NATIVE_SEGMENT_ROWS, native_segment_rows

    default = native.sgmv_path()  # this CPU's own build: AVX2 can be built here only where it runs
    if native.sgmv_long_available():  # its kernel for prompt-sized segments: every segment to C, bf16 CPU or not
        for bf16_cpu in (True, False):
            monkeypatch.setattr(kernels.lora, "native_bf16", lambda b=bf16_cpu: b)
            assert native_segment_rows() == sys.maxsize
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "_loaded", True)  # library() must not load the default build over the ones below
    builds = {"portable": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}
    if default in ("avx2", "avx512"):
        builds["avx2"] = ("-mno-avx512f",)
    for want, without in builds.items():
        monkeypatch.setattr(native, "_lib", native.build_library(native._compiler(), (*native.FLAGS, *without)))
        assert native.sgmv_path() == want
        assert not native.sgmv_long_available()  # the prompt-sized segments' kernel needs AVX512-BF16
        for bf16_cpu in (True, False):
            monkeypatch.setattr(kernels.lora, "native_bf16", lambda b=bf16_cpu: b)
            long_to_c = want != "portable" and not bf16_cpu
            assert native_segment_rows() == (sys.maxsize if long_to_c else NATIVE_SEGMENT_ROWS)

