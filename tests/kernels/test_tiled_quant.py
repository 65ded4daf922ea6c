"""The kernels that multiply quantized weights held in tiles of 16 rows with the outputs in the vector lanes: the
AVX512-BF16 int4 kernel (`native_matmul.q4b_gemm`, kernels/cpu/quant.c) and the AVX512-VNNI int8 one (`native_matmul.q8t_gemm`,
kernels/cpu/decode.c), against the float32 product of x and the dequantized weight; their layouts
(`native_matmul.q4b_pack`, `native_matmul.q8t_pack`), what they refuse, and where `linear` sends them work. They run only where
the CPU (and the C build) has AVX512-BF16 (and VNNI); elsewhere these tests are skipped with that reason, and the
AVX2 kernels' tests (tests/kernels/test_cpu_without_bf16.py) cover the same weights."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_features, native, native_matmul, quant_cpu
from kernels.quant import QuantizedTensor, quantize_int4, quantize_int8
from tests.kernels.test_native import _q8_bound

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _q4b():
    if not native_matmul.q4b_available():
        pytest.skip(f"this CPU (or its C build) lacks AVX512-BF16: {native.unavailable_reason() or 'no AVX512-BF16'}")


def _spy_with_native_bf16(monkeypatch, kernel: str) -> list[int]:
    """As on a CPU with native bf16: the rows of x of each call of `native_matmul.<kernel>` (which still runs)."""
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", True)
    called: list[int] = []
    real = getattr(native_matmul, kernel)
    monkeypatch.setattr(native_matmul, kernel, lambda *a: called.append(a[0].shape[0]) or real(*a))
    return called


def _gemm(x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor | None:
    codes, dm = native_matmul.q4b_pack(w.qweight, w.scales, w.zeros)
    return native_matmul.q4b_gemm(x, codes, dm, w.shape[0])


def _bound(x: torch.Tensor, w: QuantizedTensor, ref: torch.Tensor) -> torch.Tensor:
    """The output's bf16 rounding (2^-8 of it) plus float32 summation: each product d * (16 + code) * x is exact,
    the sums of a group and of the groups are float32 (2^-16 of the sum of the terms' magnitudes covers them with
    a wide margin, and is still 128x below the bf16 rounding of an output of that size). [M, N]"""
    n, k = w.shape
    d = w.scales.float().repeat_interleave(32, dim=1)  # [N, K]
    mz = (w.zeros.float() - 16 * w.scales.float()).repeat_interleave(32, dim=1)
    terms = x.float().abs() @ (31 * d.abs() + mz.abs()).T
    return ref.abs() * 2**-8 + terms * 2**-16 + 1e-30


@pytest.mark.parametrize("scales", ["float32", "float16"])  # as quantized here / as GGUF stores them (fp16 layout)
@pytest.mark.parametrize("k", [32, 576, 1536])  # one group; the default model's two K
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 13, 16, 31, 32, 64])  # every tiling: 2 tiles x 1-4 rows, 1 x 8 + tail
def test_q4b_kernel_is_within_float32_summation_and_the_outputs_rounding(m, k, scales):
    """N = 70 (a last tile of 6 rows); x has an all-zero group (where K allows) and a value 1000x the rest; the
    weight's zeros are negative and positive; its scales and zeros float32, or exact in fp16 (the layout then holds
    them in fp16). Every output within the bound, and on average within 1.5x of the output's own bf16 rounding:
    the kernel's error is that rounding."""
    g = torch.Generator().manual_seed(m * 10000 + k)
    w = quantize_int4(torch.randn(70, k, generator=g) * 0.05 + 0.01, 32)
    w.zeros[0, :] = 0.02
    if scales == "float16":
        w.scales.copy_(w.scales.half().float())
        w.zeros.copy_(w.zeros.half().float())
    assert native_matmul.q4b_pack(w.qweight, w.scales, w.zeros)[1].dtype == getattr(torch, scales)
    assert (w.zeros < 0).any() and (w.zeros > 0).any()
    x = torch.randn(m, k, generator=g)
    if k >= 64:
        x[:, 32:64] = 0.0
    x[0, k - 3] = 1000.0
    x = x.to(BF16)
    y = _gemm(x, w)
    assert y is not None and y.shape == (m, 70) and y.dtype == BF16
    ref = x.float() @ w.dequantize().T
    err = (y.float() - ref).abs()
    bound = _bound(x, w, ref)
    assert (err <= bound).all(), (err - bound).max()
    rounding = (ref.to(BF16).float() - ref).abs()
    assert err.mean() <= 1.5 * rounding.mean() + 1e-6, (err.mean(), rounding.mean())


@pytest.mark.parametrize("scales", ["float32", "float16"])
@pytest.mark.parametrize("m", [8, 9, 64])  # the rows that keep their sums in units of the group scale
def test_q4b_kernel_takes_groups_whose_scale_is_zero(m, scales):
    """Groups with a scale of 0 (every weight of the group is its zero) in some rows, among them a row's first group
    and a row whose every group has one: from 8 rows of x on the kernel keeps each row's sum in units of the lane's
    last nonzero scale, and such lanes must add only zero * sum(x) for that group. Within the same bound as above."""
    g = torch.Generator().manual_seed(m)
    w = quantize_int4(torch.randn(40, 576, generator=g) * 0.05, 32)
    w.scales[3, 0] = 0.0
    w.scales[5, 4:9] = 0.0
    w.scales[17, :] = 0.0
    w.scales[30:, 11] = 0.0
    if scales == "float16":
        w.scales.copy_(w.scales.half().float())
        w.zeros.copy_(w.zeros.half().float())
    assert native_matmul.q4b_pack(w.qweight, w.scales, w.zeros)[1].dtype == getattr(torch, scales)
    x = torch.randn(m, 576, generator=g).to(BF16)
    y = _gemm(x, w)
    ref = x.float() @ w.dequantize().T
    assert torch.isfinite(y.float()).all()
    assert ((y.float() - ref).abs() <= _bound(x, w, ref)).all()


def test_q4b_kernel_gives_a_row_the_same_result_at_any_m_from_8_rows():
    """From 8 rows of x on, each row's arithmetic is the same whatever block of rows it falls in: a row's output is
    bit for bit the same at M = 8, 9, 17, 40 and 64 (a decode's result does not depend on how many share the step
    there)."""
    g = torch.Generator().manual_seed(7)
    w = quantize_int4(torch.randn(70, 1536, generator=g) * 0.05, 32)
    x = torch.randn(64, 1536, generator=g).to(BF16)
    full = _gemm(x, w)
    for m in (8, 9, 17, 40):
        for start in (0, 64 - m):
            assert torch.equal(_gemm(x[start:start + m].contiguous(), w), full[start:start + m]), (m, start)


def test_q4b_kernel_is_exact_on_small_integers():
    """GGUF Q4_0 (zero = -8 * scale, scale 0.5) and x of small integers: every product and sum is exact in float32,
    so the kernel returns the exact sums rounded to bf16."""
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    scales = torch.full((48, 2), 0.5)
    w = QuantizedTensor("int4", (48, 64), 32, codes[:, 0::2] | (codes[:, 1::2] << 4), scales, -8 * scales)
    for m in (1, 3, 7):
        x = torch.randint(-3, 4, (m, 64), generator=torch.Generator().manual_seed(m)).to(BF16)
        want = (x.float() @ ((codes.float() - 8) * 0.5).T).to(BF16)
        assert torch.equal(_gemm(x, w), want), m


def test_q4b_layout_puts_each_code_where_the_kernel_reads_it():
    """Tile t, group g, chunk c, 16-bit word w, nibble j holds the code of row 16 t + w // 2 at k = 32 g + 8 c +
    2 j + w % 2; the scales follow per tile and group, then zero - 16 * scale; the rows past N are zero."""
    n, k = 20, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    scales, zeros = torch.rand(n, 2) + 0.5, torch.rand(n, 2) - 0.5
    packed, dm = native_matmul.q4b_pack(codes[:, 0::2] | (codes[:, 1::2] << 4), scales, zeros)
    assert packed.shape == (2, 2, 4, 64) and dm.shape == (2, 2, 2, 16)
    words = packed.view(2, 2, 4, 32, 2).to(torch.int32)
    words = words[..., 0] | (words[..., 1] << 8)  # little-endian 16-bit words
    for t, g, c, wd, j in [(0, 0, 0, 0, 0), (0, 1, 3, 31, 3), (1, 0, 2, 7, 1), (0, 1, 1, 10, 2)]:
        row, col = 16 * t + wd // 2, 32 * g + 8 * c + 2 * j + wd % 2
        assert (words[t, g, c, wd] >> (4 * j)) & 15 == codes[row, col]
    assert torch.equal(dm[0, 1, 0], scales[:16, 1]) and torch.equal(dm[1, 0, 1, :4], zeros[16:, 0] - 16 * scales[16:, 0])
    assert not packed[1, :, :, 16:].any() and not dm[1, :, :, 4:].any()  # rows 20..31 of the last tile: words 8..31
    # scales and zeros exact in fp16: held in fp16, the zeros themselves (the kernel forms zero - 16 * scale)
    _, dm16 = native_matmul.q4b_pack(codes[:, 0::2] | (codes[:, 1::2] << 4), scales.half().float(), zeros.half().float())
    assert dm16.dtype == torch.float16 and torch.equal(dm16[1, 0, 1, :4], zeros[16:, 0].half())


def test_q4b_kernel_refuses_what_it_cannot_take():
    """No rows, more rows than Q4B_MAX_M, K not a multiple of 32: None (the caller takes another path)."""
    w = quantize_int4(torch.randn(32, 64), 32)
    assert _gemm(torch.zeros(0, 64, dtype=BF16), w) is None
    assert _gemm(torch.zeros(native_matmul.Q4B_MAX_M + 1, 64, dtype=BF16), w) is None
    odd = QuantizedTensor("int4", (32, 48), 16, torch.zeros(32, 24, dtype=torch.uint8), torch.ones(32, 3),
                          torch.zeros(32, 3))
    assert quant_cpu.q4b_layout(odd) is None  # groups of 16: not this kernel's


@pytest.mark.parametrize("dense", [False, True], ids=["no-dense-copy", "dense-copy"])
def test_linear_takes_the_q4b_kernel_up_to_its_rows(monkeypatch, dense):
    """On a CPU with native bf16 and this kernel: int4 weights with groups of 32 go to it for M <= Q4B_MAX_M, or,
    with a dense copy held, below the rows from which the dense bf16 kernel takes over (whose copy then needs no
    int4pack copy: tests/kernels/test_gemm_bf16w.py); the fused layers take Q4B_MAX_M rows, or with the dense copy
    FUSED_DENSE_MAX_M (that kernel takes any M)."""
    called = _spy_with_native_bf16(monkeypatch, "q4b_gemm")
    g = torch.Generator().manual_seed(5)
    w = quantize_int4(torch.randn(64, 576, generator=g) * 0.05, 32)
    w.prepack(dense=dense)
    assert "q4b" in w.packed and ("int4pack" in w.packed) != dense
    top = native_matmul.gemm_bf16w_min_rows() - 1 if dense else quant_cpu.Q4B_MAX_M
    assert quant_cpu.q4_max_rows(w) == top
    assert quant_cpu.fused_max_rows(w) == (quant_cpu.FUSED_DENSE_MAX_M if dense else quant_cpu.Q4B_MAX_M)
    ms = sorted({1, 8, top, top + 1, quant_cpu.Q4B_MAX_M, quant_cpu.Q4B_MAX_M + 1, 100})
    for m in ms:
        x = torch.randn(m, 576, generator=g).to(BF16)
        ref = x.float() @ w.dequantize().T
        torch.testing.assert_close(quant_cpu.linear(x, w).float(), ref, atol=0.02, rtol=0.02, msg=f"M={m}")
    assert called == [m for m in ms if m <= top]


@pytest.fixture
def q8t():
    if not native_matmul.q8t_available():
        pytest.skip("this CPU (or its C build) lacks AVX512-VNNI")


def _q8t(x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor | None:
    codes, dss = native_matmul.q8t_pack(w.qweight, w.scales)
    return native_matmul.q8t_gemm(x, codes, dss, w.shape[0])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 37, 64])  # 2 tiles x 1-4 rows, 1 x 5-8, 8 + tail
def test_q8t_kernel_is_the_int8_dot_product_kernels_product(m, q8t):
    """N = 70, K = 576 (the default model's head), codes of -128 and 127 included: within the bound of x's int8
    rounding (the VNNI matrix-vector kernel's, tests/kernels/test_native.py) plus the output's bf16 rounding, and
    bit for bit what that kernel returns where it takes the rows (M <= 8): the same integer sums and scalings."""
    from kernels.quant_cpu import _q8_sums

    g = torch.Generator().manual_seed(m)
    w = quantize_int8(torch.randn(70, 576, generator=g) * 0.05, 32)
    w.qweight[3, :5] = -128
    w.qweight[4, :5] = 127
    x = torch.randn(m, 576, generator=g).to(BF16)
    y = _q8t(x, w)
    assert y is not None and y.shape == (m, 70) and y.dtype == BF16
    ref = x.float() @ w.dequantize().T
    err = (y.float() - ref).abs()
    assert (err <= _q8_bound(x, w) + ref.abs() * 2**-8 + 1e-6).all(), err.max()
    if m <= native_matmul.GEMV_MAX_M and native_matmul.gemv_available():
        old = native_matmul.q8_gemv(x, w.qweight, w.scales, _q8_sums(w))
        assert (y.float() - old.float()).abs().max() <= (old.float().abs() * 2**-7).max()


def test_q8t_layout_and_refusals(q8t):
    """Chunk c of tile t and group g holds row 16 t + i's codes at k = 32 g + 4 c .. + 3 in bytes 4 i ..; the scales
    and 128 * scale * the group's code sum follow; rows past N are zero. No rows, more rows than Q8T_MAX_M, K not a
    multiple of 32: None."""
    w = quantize_int8(torch.randn(20, 64), 32)
    packed, dss = native_matmul.q8t_pack(w.qweight, w.scales)
    assert packed.shape == (2, 2, 8, 16, 4) and dss.shape == (2, 2, 2, 16)
    assert torch.equal(packed[1, 1, 3, 2], w.qweight[18, 32 + 12:32 + 16])
    assert torch.equal(dss[0, 1, 1], 128 * w.scales[:16, 1] * w.qweight[:16, 32:].sum(-1).float())
    assert not packed[1, :, :, 4:].any() and not dss[1, :, :, 4:].any()
    assert _q8t(torch.zeros(0, 64, dtype=BF16), w) is None
    assert _q8t(torch.zeros(native_matmul.Q8T_MAX_M + 1, 64, dtype=BF16), w) is None
    assert native_matmul.q8t_gemm(torch.zeros(1, 48, dtype=BF16), packed, dss, 20) is None


def test_linear_takes_the_q8t_kernel_up_to_its_rows(monkeypatch, q8t):
    """On a CPU with native bf16 and the kernel: an int8 weight with groups of 32 (the default model's head) goes
    to it for M <= Q8T_MAX_M, to its dense copy from the next M on."""
    called = _spy_with_native_bf16(monkeypatch, "q8t_gemm")
    g = torch.Generator().manual_seed(6)
    w = quantize_int8(torch.randn(64, 576, generator=g) * 0.05, 32)
    w.prepack(dense=True)
    assert "q8t" in w.packed and quant_cpu.dense_min_rows(w) == native_matmul.Q8T_MAX_M + 1
    ms = (1, 8, native_matmul.Q8T_MAX_M, native_matmul.Q8T_MAX_M + 1)
    for m in ms:
        x = torch.randn(m, 576, generator=g).to(BF16)
        ref = x.float() @ w.dequantize().T
        torch.testing.assert_close(quant_cpu.linear(x, w).float(), ref, atol=0.03, rtol=0.02, msg=f"M={m}")
    assert called == [m for m in ms if m <= native_matmul.Q8T_MAX_M]


def test_prompt_steps_keep_to_the_dense_copy_at_every_m(monkeypatch):
    """A step that computes prompt tokens (`prompt=True`) multiplies by the dense copy even at the kernel's M, as a
    whole prompt's step does, so a prompt's K/V and first token do not depend on how much of it the prefix cache
    held (the copy's weights are rounded to bf16, the kernel's are not); decode rows take the kernel."""
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", True)
    g = torch.Generator().manual_seed(8)
    w = quantize_int4(torch.randn(48, 576, generator=g) * 0.05, 32)
    w.prepack(dense=True)
    for m in (1, 5, quant_cpu.q4_max_rows(w)):  # decode rows take the kernel up to there
        x = torch.randn(m, 576, generator=g).to(BF16)
        assert torch.equal(quant_cpu.linear(x, w, prompt=True), quant_cpu.dense_mm(x, w.packed["dense"][0])), m
        assert torch.equal(quant_cpu.linear(x, w), native_matmul.q4b_gemm(x, *quant_cpu.q4b_layout(w), 48)), m
