"""QuantizedTensor, quantize/dequantize, and every CPU path of quant_linear against dequantize + F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import native_matmul, quant_cpu
from kernels.quant import QuantizedTensor, quant_embedding, quant_linear, quantize_int4, quantize_int8

# float32 x runs the exact reference path: dequantize + dense matmul (row chunks at most reorder nothing
# inside a dot product), so it matches to float32 rounding.
FP32_RTOL = 1e-5
# bf16 paths round the weight's scales/zeros to bf16 (int4pack kernels) or the dequantized weight to bf16,
# accumulate in fp32 and round the output to bf16 (relative 2^-9 each): we allow 1% of the output's
# largest magnitude, against the reference computed in float32 from the same bf16 x.
BF16_TOL = 1e-2


def _weight(kind: str, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01
    if kind == "int4":
        return quantize_int4(w, 32)
    if kind == "int8g32":
        return quantize_int8(w, 32)
    return quantize_int8(w, None)


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close_bf16(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= BF16_TOL * ref.abs().max().item(), (err, ref.abs().max().item())


KINDS = ["int4", "int8g32", "int8pc"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3, 64, 130])
def test_fp32_matches_dequantize_linear(kind: str, m: int) -> None:
    w = _weight(kind, 96, 128)
    x = _x(m, 128, torch.float32)
    ref = F.linear(x, w.dequantize())
    torch.testing.assert_close(quant_linear(x, w), ref, rtol=FP32_RTOL, atol=FP32_RTOL * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_chunked_rows(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant_cpu, "CHUNK_ELEMS", 40 * 64)  # 40-row chunks over 96 rows: 3 uneven chunks
    w = _weight(kind, 96, 64)
    x = _x(5, 64, torch.float32)
    ref = F.linear(x, w.dequantize())
    torch.testing.assert_close(quant_linear(x, w), ref, rtol=FP32_RTOL, atol=FP32_RTOL * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 5, 9, 64, 128, 150])  # both sides of every path threshold
def test_bf16_auto_path(kind: str, m: int) -> None:
    w = _weight(kind, 96, 128)
    x = _x(m, 128, torch.bfloat16)
    _close_bf16(quant_linear(x, w), F.linear(x.float(), w.dequantize()))


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("int4", quant_cpu.int4pack_mm),
        ("int4", quant_cpu.dequant_mm),
        ("int8g32", quant_cpu.int8_split_mm),
        ("int8g32", quant_cpu.dequant_mm),
        ("int8pc", quant_cpu.int8pack_mm),
        ("int8pc", quant_cpu.int8_split_mm),
        ("int8pc", quant_cpu.dequant_mm),
    ],
)
@pytest.mark.parametrize("m", [1, 17])
def test_bf16_each_path(kind: str, path, m: int) -> None:
    w = _weight(kind, 64, 192, seed=3)
    x = _x(m, 192, torch.bfloat16)
    _close_bf16(path(x, w), F.linear(x.float(), w.dequantize()))


def test_int4pack_scales_and_zeros_layout() -> None:
    # x = identity makes the kernel return W^T itself: pins the [K//group, N, 2] (scale, zero) table and
    # the code - 8 offset against dequantize, element by element.
    w = _weight("int4", 32, 64, seed=5)
    got = quant_cpu.int4pack_mm(torch.eye(64, dtype=torch.bfloat16), w).float().t()
    want = w.dequantize()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_int4pack_q4_0_style_zero_is_exact() -> None:
    # GGUF Q4_0: zero = -8 * scale, so the kernel's zero (zero + 8 * scale) is exactly 0.
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    scales = torch.full((32, 2), 0.5)
    w = QuantizedTensor("int4", (32, 64), 32, codes[:, 0::2] | (codes[:, 1::2] << 4), scales, -8 * scales)
    assert w.packed == {}
    got = quant_cpu.int4pack_mm(torch.eye(64, dtype=torch.bfloat16), w).float().t()
    assert torch.equal(got, (codes.float() - 8) * 0.5)


def test_unpackable_shapes_fall_back() -> None:
    # N = 40 is not a multiple of 16 (int4pack) and K = 48 not of 32 (int8pack): the dequant path serves, or for
    # the int4 weight on a CPU with AVX2 and no native bf16 the AVX2 int4 kernel, which needs no packed layout, or
    # on one with AVX512-BF16 that int4 kernel, whose tiled layout pads N to a multiple of 16.
    for w in (quantize_int4(torch.randn(40, 64), 32), quantize_int8(torch.randn(40, 48), 16),
              quantize_int8(torch.randn(40, 48), None)):
        x = _x(2, w.shape[1], torch.bfloat16)
        _close_bf16(quant_linear(x, w), F.linear(x.float(), w.dequantize()))
        # the kernels' checks, cached (the int4 weight's tiled layout where the CPU has AVX512-BF16)
        assert set(w.packed) <= {"q4avx2", "q4b", "q8t"}


def test_leading_dims_bias_and_empty() -> None:
    w = _weight("int4", 48, 64)
    bias = torch.randn(48)
    x = _x(6, 64, torch.float32).reshape(2, 3, 64)
    ref = F.linear(x, w.dequantize(), bias)
    torch.testing.assert_close(quant_linear(x, w, bias), ref, rtol=FP32_RTOL, atol=1e-5)
    assert quant_linear(torch.zeros(0, 64, dtype=torch.bfloat16), w).shape == (0, 48)
    with pytest.raises(ValueError, match="expects K=64"):
        quant_linear(torch.zeros(1, 32), w)


def test_plain_weight_passes_through() -> None:
    w = torch.randn(24, 32, dtype=torch.float16)
    x = torch.randn(3, 32)
    torch.testing.assert_close(quant_linear(x, w), F.linear(x, w.float()))
    assert torch.equal(quant_embedding(torch.tensor([3, 1]), w), w[[3, 1]].float())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 8), groups=st.integers(1, 4), group=st.sampled_from([2, 8, 32]), scale=st.floats(1e-3, 10))
def test_quantize_error_bounds(n: int, groups: int, group: int, scale: float) -> None:
    w = torch.randn(n, groups * group) * scale
    q4 = quantize_int4(w, group)
    err4 = (q4.dequantize() - w).abs().reshape(n, groups, group)
    assert (err4 <= q4.scales[..., None] * 0.5 + 1e-5 * scale).all()  # half a step of each group
    q8 = quantize_int8(w, group)
    err8 = (q8.dequantize() - w).abs().reshape(n, groups, group)
    assert (err8 <= q8.scales[..., None] * 0.5 + 1e-6 * scale).all()
    assert q8.qweight.abs().max() <= 127 and int(q4.qweight.max()) <= 255


def test_constant_rows_roundtrip() -> None:
    w = torch.zeros(4, 64)
    w[1] = 3.0
    assert torch.equal(quantize_int4(w).dequantize(), w)
    assert torch.equal(quantize_int8(w).dequantize(), w)


def test_rows_cat_rows_embedding_and_nbytes() -> None:
    for w in (_weight("int4", 64, 64), _weight("int8g32", 64, 64), _weight("int8pc", 64, 64)):
        full = w.dequantize()
        idx = torch.tensor([5, 0, 63, 5])
        assert torch.equal(w.rows(idx).dequantize(), full[idx])
        assert torch.equal(w.rows(slice(8, 12)).dequantize(), full[8:12])
        assert torch.equal(QuantizedTensor.cat_rows([w, w.rows(idx)]).dequantize(), torch.cat([full, full[idx]]))
        ids = torch.tensor([[1, 2, 3], [63, 0, 1]])
        assert torch.equal(quant_embedding(ids, w), full[ids])
        assert quant_embedding(ids, w, torch.bfloat16).dtype == torch.bfloat16
        assert torch.equal(w.dequantize(torch.bfloat16), full.to(torch.bfloat16))
        canonical = w.qweight.numel() * w.qweight.element_size() + w.scales.numel() * 4
        canonical += 0 if w.zeros is None else w.zeros.numel() * 4
        assert w.nbytes == canonical
        w.prepack()
        assert w.packed and w.nbytes > canonical  # fast-path layouts count as resident
    with pytest.raises(ValueError, match="different layouts"):
        QuantizedTensor.cat_rows([_weight("int4", 16, 64), _weight("int8g32", 16, 64)])


def test_invalid_quantized_tensor() -> None:
    with pytest.raises(ValueError, match="int4 qweight must be torch.uint8"):
        QuantizedTensor("int4", (4, 64), 32, torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="supported are int4, int8"):
        QuantizedTensor("int2", (4, 64), 32, torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2))
    with pytest.raises(ValueError, match="does not divide K=64"):
        quantize_int4(torch.randn(4, 64), 24)


def test_a_dense_copy_serves_batched_bf16_matmuls_as_the_chunked_dequant_path_would(monkeypatch):
    """With a dense bf16 copy held (small models, a CPU with native bf16: forced here), M >= DENSE_MIN_M takes a
    plain bf16 matmul: the same values as dequantizing on the fly (both round the dequantized weight to bf16
    once); smaller M keeps the int4 kernel. (Without native bf16: tests/kernels/test_cpu_without_bf16.py.)"""
    from kernels import cpu_features, quant_cpu

    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", True)

    w = quantize_int4(torch.randn(96, 128, generator=torch.Generator().manual_seed(3)), 32)
    w.prepack(dense=True)
    # where this CPU has AVX512-BF16 the copy is held in the paired panels of the dense bf16 kernel, which takes
    # over from its rows (tests/kernels/test_gemm_bf16w.py): the same values, summed in another order
    paired = native_matmul.gemm_bf16w_available()
    first = quant_cpu.dense_min_rows(w)  # past the AVX512-BF16 int4 kernel's rows where this CPU has it
    assert first == (native_matmul.gemm_bf16w_min_rows() if paired else
                     quant_cpu.Q4B_MAX_M + 1 if native_matmul.q4b_available() else quant_cpu.DENSE_MIN_M)
    xs = {m: torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
          for m in (first, first + 7, 2 * first, 200)}
    want = {m: quant_cpu.dequant_mm(x, w) for m, x in xs.items()}
    dense = w.packed["dense"][0]
    assert dense.dtype == torch.bfloat16 and w.nbytes >= 2 * 96 * 128
    # else held in oneDNN's blocked layout where torch's oneDNN multiplies bf16 on this CPU (plain elsewhere)
    assert paired == (dense.dim() == 4)
    assert paired or dense.is_mkldnn == (torch.backends.mkldnn.is_available()
                                         and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    tol = {"atol": 1e-5, "rtol": 2**-7} if paired else {"atol": 0, "rtol": 0}  # two bf16 roundings apart at most
    for m, x in xs.items():
        torch.testing.assert_close(quant_cpu.linear(x, w), want[m], **tol, msg=f"M={m}")
    # a non-contiguous x (a strided view) too
    wide = torch.randn(first, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)[:, ::2]
    torch.testing.assert_close(quant_cpu.linear(wide, w), quant_cpu.dequant_mm(wide.contiguous(), w), **tol)
    below = xs[first][: first - 1]
    q4b = quant_cpu.q4b_layout(w)
    small = native_matmul.q4b_gemm(below, *q4b, w.shape[0]) if q4b is not None else quant_cpu.int4pack_mm(below, w)
    torch.testing.assert_close(quant_cpu.linear(below, w), small, atol=0, rtol=0)
