"""The CPU's bf16 paths where the CPU has no bf16 dot-product instructions (kernels.cpu_features): the dense
weight copies are float32, attention's and LoRA's products run in float32, and int8 weights with groups of 32
go through the AVX2 kernel of kernels/cpu/quant.c. Each path runs here whatever this CPU has (`native` is
forced either way), against float32 oracles."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_features, native, native_matmul, quant_cpu
from kernels.attention import paged_attention_reference, paged_attention_torch
from kernels.quant import QuantizedTensor, quantize_int4, quantize_int8
from tests.kernels.test_attention import CASES, D, setup
from tests.kernels.test_native import _q8_bound

BF16 = torch.bfloat16


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native_bf16(request, monkeypatch):
    """Run the test as on a CPU with (True) or without (False) bf16 dot-product instructions."""
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", request.param)
    return request.param


def test_the_flags_decide_native_bf16(monkeypatch):
    for flags, want in (({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                        ({"asimd", "bf16"}, True), (set(), False)):
        monkeypatch.setattr(cpu_features, "_NATIVE_BF16", None)
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda f=flags: f)
        assert cpu_features.native_bf16() is want, flags
        assert quant_cpu.dense_dtype() == (BF16 if want else torch.float32)
        assert cpu_features.matmul_dtype(torch.zeros(1, dtype=BF16)) == (BF16 if want else torch.float32)
        assert cpu_features.matmul_dtype(torch.zeros(1)) == torch.float32


def test_a_float32_dense_copy_serves_batched_bf16_matmuls_with_one_rounding(native_bf16):
    """Without native bf16 the dense copy is float32 (twice a bf16 copy's bytes, in the AVX2 kernel's panels where
    the CPU has it; the weight's values rounded to bf16, what a bf16 copy holds) and takes over from DENSE_F32_MIN_M: the
    float32 product of the bf16 x and that weight, rounded once to bf16 (relative error <= 2^-8 of each output,
    against the float32 oracle on the same values). Below it the int4 kernel stays; the chunked dequant path
    multiplies the same values in float32 too."""
    w = quantize_int4(torch.randn(96, 128, generator=torch.Generator().manual_seed(3)), 32)
    w.prepack(dense=True)
    dense = w.packed["dense"][0]
    assert dense.dtype == (BF16 if native_bf16 else torch.float32)
    assert (dense.dim() == 3) == (not native_bf16 and native_matmul.gemm_available())  # [N/16, K, 16] panels
    paired = native_bf16 and native_matmul.gemm_bf16w_available()  # bf16 [N/16, K/2, 16, 2] (test_gemm_bf16w.py)
    assert (dense.dim() == 4) == paired
    assert quant_cpu.dense_bytes(w) == (2 if native_bf16 else 4) * 96 * 128
    first = quant_cpu.dense_min_rows(w)
    assert first == (quant_cpu.DENSE_F32_MIN_M if not native_bf16 else native_matmul.gemm_bf16w_min_rows() if paired
                     else quant_cpu.Q4B_MAX_M + 1 if native_matmul.q4b_available() else quant_cpu.DENSE_MIN_M)
    for m in (first, 2 * first, 200):
        x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(BF16)
        ref = x.float() @ w.dequantize().to(BF16).float().T
        y = quant_cpu.linear(x, w)
        assert y.dtype == BF16
        if not native_bf16 or paired:  # float32 sums of the bf16 values' exact products, rounded once
            torch.testing.assert_close(y.float(), ref, atol=1e-6, rtol=2**-8, msg=f"M={m}")
            torch.testing.assert_close(quant_cpu.dequant_mm(x, w).float(), ref, atol=1e-6, rtol=2**-8)
        else:  # the bf16 copy: what the chunked path computes in bf16, bit for bit (tests/kernels/test_quant.py)
            torch.testing.assert_close(y, quant_cpu.dequant_mm(x, w, compute=BF16), atol=0, rtol=0, msg=f"M={m}")
    below = torch.randn(first - 1, 128, generator=torch.Generator().manual_seed(1)).to(BF16)
    q4b = quant_cpu.q4b_layout(w)  # the AVX512-BF16 int4 kernel where it runs, the AVX2 one, int4pack
    small = (native_matmul.q4b_gemm(below, *q4b, w.shape[0]) if q4b is not None
             else native_matmul.q4_gemm(below, w.qweight, w.scales, w.zeros) if not native_bf16 else None)
    want = small if small is not None else quant_cpu.int4pack_mm(below, w)
    torch.testing.assert_close(quant_cpu.linear(below, w), want, atol=0, rtol=0)


def test_attention_in_bf16_is_within_one_rounding_of_the_oracle_without_native_bf16(native_bf16):
    """Every attention path (short extends, a long prefill through SDPA, decodes, a shared-prefix cascade) on
    bf16 q and caches: without native bf16 the products run in float32 and the result is the oracle's rounded
    once to bf16; with it the products are bf16 (the existing bound of 3e-2)."""
    for case in ("mixed", "long-prefill-and-extend", "decodes-partial-blocks"):
        q, kc, vc, tables, starts, lens, plan = setup(CASES[case], dtype=BF16)
        out = paged_attention_torch(q, kc, vc, plan, D**-0.5).float()
        ref = paged_attention_reference(q, kc, vc, tables, starts, lens)
        if native_bf16:
            torch.testing.assert_close(out, ref, atol=3e-2, rtol=0, msg=case)
        else:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=2**-8, msg=case)
    seqs = [(33, 1), (40, 1), (36, 1), (45, 1), (32, 1)]  # the cascade: 8 shared leading blocks
    q, kc, vc, tables, starts, lens, plan = setup(seqs, shared_prefix_blocks=12, dtype=BF16)
    out = paged_attention_torch(q, kc, vc, plan, D**-0.5).float()
    ref = paged_attention_reference(q, kc, vc, tables, starts, lens)
    torch.testing.assert_close(out, ref, atol=1e-5 if not native_bf16 else 3e-2, rtol=2**-8 if not native_bf16 else 0)


def test_a_long_lora_segment_with_bf16_weights_is_computed_in_float32_without_native_bf16(native_bf16):
    """A prefill-length segment (torch's path) with bf16 adapter weights: without native bf16 the two products
    run in float32 and only the final add rounds (2^-8 of y); with it, the bf16 products' bound."""
    from kernels.lora import _apply

    g = torch.Generator().manual_seed(4)
    x = torch.randn(80, 64, generator=g).to(BF16)
    a_t = (torch.randn(64, 8, generator=g) * 0.1).to(BF16)
    b_t = (torch.randn(8, 48, generator=g) * 0.1).to(BF16)
    y = torch.zeros(80, 48, dtype=BF16)
    _apply(y, x, [(0, 80, (a_t, b_t))])
    ref = (x.float() @ a_t.float()) @ b_t.float()
    if native_bf16:
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(y.float(), ref, atol=1e-6, rtol=2**-8)


def _avx2():
    if not native_matmul.quant_avx2_available():
        pytest.skip(f"this CPU (or its C build) lacks AVX2 and FMA: {native.unavailable_reason() or 'no AVX2'}")


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_q8_avx2_kernel_is_within_the_bound_of_its_activation_rounding(m):
    """The AVX2 int8 kernel quantizes x by groups of 32 like the VNNI one: the same error bound (half a step of
    x's codes times the group's |weights|, plus the output's bf16 rounding), every M up to QUANT_MAX_M."""
    _avx2()
    g = torch.Generator().manual_seed(m)
    w = quantize_int8(torch.randn(200, 576, generator=g) * 0.05, 32)
    x = torch.randn(m, 576, generator=g).to(BF16)
    y = native_matmul.q8_gemm(x, w.qweight, w.scales)
    assert y is not None and y.shape == (m, 200) and y.dtype == BF16
    ref = x.float() @ w.dequantize().T
    err = (y.float() - ref).abs()
    assert (err <= _q8_bound(x, w) + ref.abs() * 2**-8 + 1e-6).all(), err.max()
    assert err.max() > 0  # it does round: a kernel that silently did something else would be noticed


def test_q8_avx2_kernel_refuses_what_it_cannot_take():
    """Bad shapes: too many rows of x (17 > QUANT_MAX_M), K not a multiple of 32 (the kernel answers -1, the
    wrapper None); a weight holding a code of -128 (the sign flip would overflow) stays off it in `linear`."""
    _avx2()
    w = quantize_int8(torch.randn(64, 576, generator=torch.Generator().manual_seed(2)) * 0.05, 32)
    assert native_matmul.q8_gemm(torch.zeros(native_matmul.QUANT_MAX_M + 1, 576, dtype=BF16), w.qweight, w.scales) is None
    odd = torch.zeros(64, 40, dtype=torch.int8)
    assert native_matmul.q8_gemm(torch.zeros(1, 40, dtype=BF16), odd, torch.ones(64, 1)) is None
    low = quantize_int8(torch.randn(64, 576, generator=torch.Generator().manual_seed(3)) * 0.05, 32)
    low.qweight[0, 0] = -128
    assert not quant_cpu._q8_avx2_ok(low)
    assert quant_cpu._q8_avx2_ok(w)


def test_linear_takes_the_avx2_int8_kernel_without_vnni_up_to_its_rows(monkeypatch):
    """Without the VNNI kernels (the matrix-vector one and the tiled one), int8 groups of 32 with M <= QUANT_MAX_M
    go to the AVX2 kernel (its check is cached on the weight); above, the other paths; every answer within the
    kernel's bound of float32."""
    _avx2()
    monkeypatch.setattr(native_matmul, "gemv_available", lambda: False)
    monkeypatch.setattr(native_matmul, "q8t_available", lambda: False)
    called = []
    real = native_matmul.q8_gemm
    monkeypatch.setattr(native_matmul, "q8_gemm", lambda *a: called.append(a[0].shape[0]) or real(*a))
    g = torch.Generator().manual_seed(9)
    w = quantize_int8(torch.randn(64, 576, generator=g) * 0.05, 32)
    for m in (1, native_matmul.QUANT_MAX_M, native_matmul.QUANT_MAX_M + 1):
        x = torch.randn(m, 576, generator=g).to(BF16)
        ref = x.float() @ w.dequantize().T
        err = (quant_cpu.linear(x, w).float() - ref).abs()
        assert (err <= _q8_bound(x, w) + ref.abs() * 2**-7 + 1e-6).all(), (m, err.max())
    assert called == [1, native_matmul.QUANT_MAX_M] and "q8avx2" in w.packed


def _q4_bound(x: torch.Tensor, w) -> torch.Tensor:
    """What quantizing x to int16 per group of 32 may cost (per group, |error of x| <= amax / 2^15 per element,
    times the sum of the group's |weights|) plus the bf16 rounding of the output (2^-8 of it; float32 sums and
    the weight scales' products in float32 add far less: 1e-5 of the output's scale). [M, N]"""
    m, k = x.shape
    xg = x.float().view(m, k // 32, 32)
    wd = w.dequantize()
    wabs = wd.abs().view(w.shape[0], k // 32, 32).sum(-1)  # [N, G]
    ref = x.float() @ wd.T
    return (xg.abs().amax(-1) / 2**15) @ wabs.T + ref.abs() * 2**-8 + 1e-5 * ref.abs().max()


@pytest.mark.parametrize("k", [256, 576])  # 8 groups; 18 (the zeros' float32 sums take a tail of 2)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 15, 16])  # every tile: 4 weight rows x 1-2, 2 x 3-4, 1 x 4
def test_q4_avx2_kernel_is_within_the_bound_of_its_int16_activations(m, k):
    """The AVX2 int4 kernel (N = 70: weight-row tails of every tile) against the float32 product of x and the
    dequantized weight: within x's int16 rounding and the output's bf16 rounding, and on average within 1.5x of
    that rounding alone. x has an all-zero group and a group with an outlier 1000x the rest (per-group scales keep the other
    groups exact); the weight's zeros are negative and positive."""
    _avx2()
    g = torch.Generator().manual_seed(m * 1000 + k)
    w = quantize_int4(torch.randn(70, k, generator=g) * 0.05 + 0.01, 32)
    assert (w.zeros < 0).any() and w.scales.dtype == torch.float32
    w.zeros[0, :] = 0.02  # positive zeros too
    x = torch.randn(m, k, generator=g)
    x[:, 32:64] = 0.0
    x[0, 70] = 1000.0
    x = x.to(BF16)
    y = native_matmul.q4_gemm(x, w.qweight, w.scales, w.zeros)
    assert y is not None and y.shape == (m, 70) and y.dtype == BF16
    ref = x.float() @ w.dequantize().T
    err = (y.float() - ref).abs()
    bound = _q4_bound(x, w)
    assert (err <= bound).all(), (err - bound).max()
    rounding = (ref.to(BF16).float() - ref).abs()  # the output's own bf16 rounding: the error is mostly that
    assert err.mean() <= 1.5 * rounding.mean() + 1e-6, (err.mean(), rounding.mean())


def test_q4_avx2_kernel_takes_a_q4_0_weight_exactly_on_small_integers():
    """GGUF Q4_0 (zero = -8 * scale) with x of small integers: x's power-of-two int16 scale holds them exactly,
    every product and sum is exact in int32 and float32, so the kernel returns the exact sums rounded to bf16."""
    _avx2()
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    scales = torch.full((48, 2), 0.5)
    w = QuantizedTensor(
        "int4", (48, 64), 32, codes[:, 0::2] | (codes[:, 1::2] << 4), scales, -8 * scales)
    x = torch.randint(-3, 4, (3, 64), generator=torch.Generator().manual_seed(3)).to(BF16)
    y = native_matmul.q4_gemm(x, w.qweight, w.scales, w.zeros)
    want = (x.float() @ ((codes.float() - 8) * 0.5).T).to(BF16)
    assert y is not None and torch.equal(y, want)


def test_q4_avx2_kernel_refuses_what_it_cannot_take():
    """More rows of x than Q4_MAX_M, K not a multiple of 32, a non-contiguous scale table: None (the caller takes
    another path); a weight whose check fails is remembered as such."""
    _avx2()
    w = quantize_int4(torch.randn(64, 576) * 0.05, 32)
    assert native_matmul.q4_gemm(torch.zeros(native_matmul.Q4_MAX_M + 1, 576, dtype=BF16), w.qweight, w.scales, w.zeros) is None
    odd = quantize_int4(torch.randn(64, 48), 16)  # K = 48
    assert native_matmul.q4_gemm(torch.zeros(1, 48, dtype=BF16), odd.qweight, odd.scales, odd.zeros) is None
    wide = torch.zeros(64, 36)[:, ::2]  # a strided [64, 18] scale table
    assert native_matmul.q4_gemm(torch.zeros(1, 576, dtype=BF16), w.qweight, wide, w.zeros) is None
    g16 = quantize_int4(torch.randn(64, 576) * 0.05, 16)
    assert not quant_cpu._q4_avx2_ok(g16) and "q4avx2" in g16.packed


def _gemm():
    if not native_matmul.gemm_available():
        pytest.skip(f"the dense AVX2 kernel needs AVX2 and FMA and the C kernels ({native.unavailable_reason()})")


@pytest.mark.parametrize("k", [1, 100, 576])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 12, 13, 64])  # full tiles of 6 rows and every tail of 1-5
def test_dense_avx2_kernel_rounds_its_float32_sums_once(m, k):
    """The dense float32-weight kernel (N = 48: three panels) against the float64 product: within the output's
    bf16 rounding (2^-8 of it) plus float32 summation (k * 2^-23 of the sum of |products|), and on average no
    further than that rounding alone; x is a strided view (rows wider than K)."""
    _gemm()
    g = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(48, k, generator=g)
    x = torch.randn(m, k + 7, generator=g).to(BF16)[:, :k]
    y = native_matmul.gemm_f32w(x, native_matmul.gemm_pack(w))
    assert y is not None and y.shape == (m, 48) and y.dtype == BF16
    assert_rounded_once(y, x, w)


def assert_rounded_once(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y (bf16) against the float64 product x @ w^T: within the output's bf16 rounding (2^-8 of it) plus float32
    summation of exact products (K * 2^-23 of the sum of |products|), and on average no further than that rounding
    alone (a dense kernel's float32 sums rounded once)."""
    k = x.shape[1]
    ref = x.double() @ w.double().T
    err = (y.double() - ref).abs()
    bound = ref.abs() * 2**-8 + k * 2**-23 * (x.double().abs() @ w.double().abs().T)
    assert (err <= bound).all(), (err - bound).max()
    rounding = (ref.to(BF16).double() - ref).abs()
    assert err.mean() <= 1.01 * rounding.mean() + 1e-9, (err.mean(), rounding.mean())


def test_dense_avx2_kernel_is_exact_on_small_integers_and_rounds_ties_to_even():
    """Small-integer x and weights: every sum is exact in float32, so each output is the exact sum rounded to
    bf16, in its own column (the panels and the packed store keep the columns' order). Sums halfway between two
    bf16 values round to the even one, as torch rounds; NaN and infinity come through."""
    _gemm()
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-8, 8, (64, 40), generator=g).float()
    x = torch.randint(-3, 4, (9, 40), generator=g).to(BF16)
    want = (x.double() @ w.double().T).to(BF16)
    assert torch.equal(native_matmul.gemm_f32w(x, native_matmul.gemm_pack(w)), want)
    # 257 and 259 lie halfway between bf16 neighbours (256, 258 and 258, 260): they round to 256 and 260
    ties = torch.zeros(16, 2)
    ties[:2, 0] = torch.tensor([257.0, 259.0])
    y = native_matmul.gemm_f32w(torch.tensor([[1.0, 0.0]], dtype=BF16), native_matmul.gemm_pack(ties))
    assert y[0, :2].tolist() == [256.0, 260.0]
    odd = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0]], dtype=BF16)
    y = native_matmul.gemm_f32w(odd, native_matmul.gemm_pack(torch.ones(16, 2)))
    assert y[0].isnan().all() and (y[1] == float("inf")).all()


@pytest.mark.parametrize("m", [1, 5, 6, 13, 64])
def test_dense_avx2_kernel_on_float32_x_gives_float32_sums(m):
    """float32 x (a strided view) -> float32 y, nothing rounded to bf16: within float32 summation of the float64
    product (k * 2^-23 of the sum of |products|; the LM head's exact logits rest on it), every column in place."""
    _gemm()
    g = torch.Generator().manual_seed(m)
    k = 576
    w = torch.randn(64, k, generator=g)
    x = torch.randn(m, k + 3, generator=g)[:, :k]
    y = native_matmul.gemm_f32w(x, native_matmul.gemm_pack(w))
    assert y is not None and y.shape == (m, 64) and y.dtype == torch.float32
    ref = x.double() @ w.double().T
    bound = k * 2**-23 * (x.double().abs() @ w.double().abs().T)
    assert ((y.double() - ref).abs() <= bound).all()
    # far inside bf16's rounding: the kernel did not round (bf16 would be off by up to 2^-9 of each value)
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-12 + 1e-4).all()


def test_dense_avx2_kernel_refuses_what_it_cannot_take():
    """x neither bf16 nor float32, K not the weight's, panels not 16 wide or misaligned in memory: None (the caller
    multiplies the plain weight); `dense_mm` on panels then still gives the product."""
    _gemm()
    w = torch.randn(32, 64)
    wp = native_matmul.gemm_pack(w)
    x = torch.randn(3, 64).to(BF16)
    assert native_matmul.gemm_f32w(x.half(), wp) is None
    assert native_matmul.gemm_f32w(torch.zeros(3, 60, dtype=BF16), wp) is None
    assert native_matmul.gemm_f32w(x, w.reshape(4, 64, 8).contiguous()) is None
    off = torch.empty(wp.numel() + 1)[1:].view(wp.shape)  # 4 bytes off the 32-byte alignment the loads need
    off.copy_(wp)
    assert native_matmul.gemm_f32w(x, off) is None
    ref = x.float() @ w.T
    torch.testing.assert_close(quant_cpu.dense_mm(x, off).float(), ref, atol=1e-6, rtol=2**-8)
    torch.testing.assert_close(quant_cpu.dense_mm(x.float(), wp), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(native_matmul.gemm_unpack(wp), w)


def test_a_weight_whose_rows_do_not_fill_panels_keeps_onednns_layout(monkeypatch):
    """Without native bf16, a weight of 40 rows (not a multiple of 16) keeps the 2-D dense copy and its answer."""
    _gemm()
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", False)
    w = quantize_int4(torch.randn(40, 64, generator=torch.Generator().manual_seed(6)), 32)
    w.prepack(dense=True)
    dense = w.packed["dense"][0]
    assert dense.dim() == 2 and dense.dtype == torch.float32
    x = torch.randn(quant_cpu.DENSE_F32_MIN_M, 64).to(BF16)
    torch.testing.assert_close(quant_cpu.linear(x, w).float(), x.float() @ w.dequantize().to(BF16).float().T,
                               atol=1e-6, rtol=2**-8)


@pytest.mark.parametrize("dense", [False, True], ids=["no-dense-copy", "dense-copy"])
def test_linear_takes_the_avx2_int4_kernel_up_to_its_rows(monkeypatch, native_bf16, dense):
    """int4 groups of 32 go to the AVX2 kernel: without native bf16 with M <= Q4_MAX_M (below the dense copy's
    first M when one is held, which then also needs no int4pack layout); with native bf16 but without the
    AVX512-BF16 int4 kernel (taken away here where the CPU has it) with M <= Q4_BF16_MAX_M (int4pack above it, up
    to the dense copy). Every answer within the kernel's bound of float32 where it ran, close to float32
    elsewhere."""
    _avx2()
    monkeypatch.setattr(native_matmul, "q4b_available", lambda: False)
    called = []
    real = native_matmul.q4_gemm
    monkeypatch.setattr(native_matmul, "q4_gemm", lambda *a, **kw: called.append(a[0].shape[0]) or real(*a, **kw))
    g = torch.Generator().manual_seed(11)
    w = quantize_int4(torch.randn(64, 576, generator=g) * 0.05, 32)
    w.prepack(dense=dense)
    assert ("int4pack" in w.packed) == (native_bf16 or not dense)
    ms = (1, quant_cpu.Q4_BF16_MAX_M, quant_cpu.Q4_BF16_MAX_M + 1, 8, quant_cpu.DENSE_F32_MIN_M - 1,
          native_matmul.Q4_MAX_M, native_matmul.Q4_MAX_M + 1)
    if native_bf16:
        last = quant_cpu.Q4_BF16_MAX_M
    else:
        last = quant_cpu.DENSE_F32_MIN_M - 1 if dense else native_matmul.Q4_MAX_M
    assert quant_cpu.q4_max_rows(w) == last
    for m in ms:
        x = torch.randn(m, 576, generator=g).to(BF16)
        ref = x.float() @ w.dequantize().T
        y = quant_cpu.linear(x, w).float()
        if m > last:  # int4pack (bf16 scales and zeros) or the dense copy (bf16 weights)
            torch.testing.assert_close(y, ref, atol=0.02, rtol=0.02, msg=f"M={m}")
        else:
            err = (y - ref).abs()
            assert (err <= _q4_bound(x, w)).all(), (m, err.max())
    assert called == [m for m in ms if m <= last]
