"""The dense bf16-weight kernel of kernels/cpu/gemm.c (`native_matmul.gemm_bf16w`, AVX512-BF16): the weight in
paired panels, exact bf16 products, float32 sums rounded once; and how `linear` and the fused decode layers route
to it."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_features, native, native_matmul, quant_cpu
from kernels.quant import quantize_int4
from tests.kernels.test_cpu_without_bf16 import assert_rounded_once

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _kernel():
    if not native_matmul.gemm_bf16w_available():
        pytest.skip(f"the dense bf16 kernel needs AVX512-BF16 and the C kernels ({native.unavailable_reason()})")


def _bf16w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = native_matmul.gemm_bf16w(x, native_matmul.gemm_pack_bf16(w), w.shape[0])
    assert y is not None and y.shape == (x.shape[0], w.shape[0]) and y.dtype == BF16
    return y


@pytest.mark.parametrize("n", [16, 48, 64, 80, 272])  # 1-17 panels: groups of 3 and both tails, split in two
@pytest.mark.parametrize("k", [2, 34, 576])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 17, 20, 64, 100])  # blocks of 8 and every tail
def test_bf16w_kernel_rounds_its_float32_sums_once(m, k, n):
    """Against the float64 product of the same bf16 values: within the output's bf16 rounding (2^-8 of it) plus
    float32 summation (k * 2^-23 of the sum of |products|: the products are exact), and on average no further than
    that rounding alone; x is a strided view (rows wider than K)."""
    g = torch.Generator().manual_seed(m * 100000 + k * 100 + n)
    w = torch.randn(n, k, generator=g).to(BF16)
    x = torch.randn(m, k + 6, generator=g).to(BF16)[:, :k]
    assert_rounded_once(_bf16w(x, w), x, w)


def test_bf16w_kernel_is_exact_on_small_integers_and_rounds_ties_to_even():
    """Small-integer x and weights: every sum is exact in float32, so each output is the exact sum rounded to
    bf16, in its own column (the panels keep the columns' order). Sums halfway between two bf16 values round to
    the even one, as torch rounds; NaN and infinity come through."""
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-8, 8, (80, 40), generator=g).to(BF16)
    x = torch.randint(-3, 4, (11, 40), generator=g).to(BF16)
    assert torch.equal(_bf16w(x, w), (x.double() @ w.double().T).to(BF16))
    # 257 = 256 + 1 and 259 = 258 + 1 lie halfway between bf16 neighbours (256, 258 and 258, 260)
    ties = torch.zeros(16, 2, dtype=BF16)
    ties[:2] = torch.tensor([[256.0, 1.0], [258.0, 1.0]])
    assert _bf16w(torch.tensor([[1.0, 1.0]], dtype=BF16), ties)[0, :2].tolist() == [256.0, 260.0]
    odd = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0]], dtype=BF16)
    y = _bf16w(odd, torch.ones(16, 2, dtype=BF16))
    assert y[0].isnan().all() and (y[1] == float("inf")).all()


def test_bf16w_kernel_gives_a_row_the_same_bits_at_any_m_and_thread_count():
    """Each output is one float32 chain over K in order, whatever block of rows or share of panels it falls in:
    a row's result is the same alone, in a batch of 9, 20 or 100 rows, on one thread or two (a request's tokens
    do not depend on what else the step carries)."""
    g = torch.Generator().manual_seed(9)
    w = native_matmul.gemm_pack_bf16(torch.randn(208, 576, generator=g))
    x = torch.randn(100, 576, generator=g).to(BF16)
    full = native_matmul.gemm_bf16w(x, w, 208)
    for m in (1, 9, 20):
        assert torch.equal(native_matmul.gemm_bf16w(x[:m], w, 208), full[:m]), m
    assert torch.equal(native_matmul.gemm_bf16w(x[7:8], w, 208), full[7:8])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native_matmul.gemm_bf16w(x, w, 208), full)
    finally:
        torch.set_num_threads(threads)


def test_bf16w_kernel_refuses_what_it_cannot_take():
    """x not bf16 or not on unit column stride, K not the weight's, panels not in the paired shape, n past the
    panels: None (the caller multiplies the plain weight); `dense_mm` on the panels still gives the product, and
    the panels unpack to the weight."""
    w = torch.randn(32, 64).to(BF16)
    wp = native_matmul.gemm_pack_bf16(w)
    assert wp.shape == (2, 32, 16, 2)
    x = torch.randn(3, 64).to(BF16)
    assert native_matmul.gemm_bf16w(x.float(), wp, 32) is None  # float32 x
    assert native_matmul.gemm_bf16w(x.half(), wp, 32) is None  # float16 x
    assert native_matmul.gemm_bf16w(torch.zeros(3, 62, dtype=BF16), wp, 32) is None  # K = 62 against 64
    assert native_matmul.gemm_bf16w(torch.zeros(64, 3, dtype=BF16).T, wp, 32) is None  # column stride 3
    assert native_matmul.gemm_bf16w(x, wp.reshape(2, 32, 32), 32) is None  # not the paired shape
    assert native_matmul.gemm_bf16w(x, wp, 33) is None  # more columns than the panels hold
    assert torch.equal(native_matmul.gemm_unpack_bf16(wp, 32), w)
    ref = x.float() @ w.float().T
    torch.testing.assert_close(quant_cpu.dense_mm(x, wp).float(), ref, atol=1e-5, rtol=2**-8)
    torch.testing.assert_close(quant_cpu.dense_mm(x.float(), wp), ref, atol=1e-5, rtol=2**-8)
    # a weight whose rows do not fill whole panels: zero rows pad the last, the product's columns stop at n
    w40 = torch.randn(40, 64).to(BF16)
    wp40 = native_matmul.gemm_pack_bf16(w40)
    assert wp40.shape[0] == 3 and not wp40[2, :, 8:].any()
    torch.testing.assert_close(native_matmul.gemm_bf16w(x, wp40, 40).float(), x.float() @ w40.float().T,
                               atol=1e-5, rtol=2**-8)


def test_linear_takes_the_bf16w_kernel_from_its_rows_and_the_int4_kernel_below(monkeypatch):
    """An int4 weight with a dense copy on this CPU: the copy is held in the paired panels; decode rows take the
    AVX512-BF16 int4 kernel below `gemm_bf16w_min_rows()` and the dense kernel from there (a prompt's step at
    every M); the fused layers take up to FUSED_DENSE_MAX_M rows and split them the same way
    (tests/runtime/test_fused_decode.py)."""
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", True)
    g = torch.Generator().manual_seed(5)
    w = quantize_int4(torch.randn(64, 576, generator=g) * 0.05, 32)
    w.prepack(dense=True)
    dense = w.packed["dense"][0]
    assert dense.dim() == 4 and dense.dtype == BF16 and "int4pack" not in w.packed
    first = native_matmul.gemm_bf16w_min_rows()
    assert quant_cpu.dense_min_rows(w) == first and 1 < first <= quant_cpu.Q4B_MAX_M
    assert quant_cpu.q4_max_rows(w) == first - 1 and quant_cpu.fused_max_rows(w) == quant_cpu.FUSED_DENSE_MAX_M
    q4b = quant_cpu.q4b_layout(w)
    assert q4b is not None
    for m in (1, first - 1, first, quant_cpu.Q4B_MAX_M, quant_cpu.Q4B_MAX_M + 1, 100):
        x = torch.randn(m, 576, generator=g).to(BF16)
        dense_y = native_matmul.gemm_bf16w(x, dense, 64)
        want = dense_y if m >= first else native_matmul.q4b_gemm(x, *q4b, 64)
        assert torch.equal(quant_cpu.linear(x, w), want), m
        assert torch.equal(quant_cpu.linear(x, w, prompt=True), dense_y), m
        # the dense copy holds the dequantized values rounded to bf16: within one rounding of their product
        ref = x.double() @ w.dequantize().to(BF16).double().T
        assert ((dense_y.double() - ref).abs() <= ref.abs() * 2**-8 + 576 * 2**-23 * (
            x.double().abs() @ w.dequantize().to(BF16).double().abs().T)).all(), m
