"""Triton dequantizing matmul (through the interpreter) against dequantize + float32 F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.quant import QuantizedTensor, quantize_int4, quantize_int8

pytestmark = pytest.mark.interpreter

# Fraction of the output's largest magnitude. The oracle multiplies the same x by the exactly dequantized
# weight in float32. float32: summation order only. float16: the GPU rounds the dequantized tile to
# float16 (2^-11) and the output once. bfloat16: the same at 2^-9, plus one output step of 2^-7 (the
# interpreter truncates where the GPU rounds).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def q4_0(n: int, k: int, seed: int) -> QuantizedTensor:
    """GGUF Q4_0 layout: symmetric codes, zero = -8 * scale."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // 32, generator=g) * 0.05 + 0.01
    return QuantizedTensor("int4", (n, k), 32, codes[:, 0::2] | (codes[:, 1::2] << 4), scales, -8 * scales)


def weight(kind: str, n: int = 72, k: int = 96, seed: int = 0) -> QuantizedTensor:
    if kind == "q4_0":
        return q4_0(n, k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05 + 0.01
    if kind == "q4_1":  # asymmetric: zero = the group's minimum (GGUF Q4_1: d and m)
        return quantize_int4(w, 32)
    if kind == "int4-g16":
        return quantize_int4(w, 16)
    if kind == "int8-g32":
        return quantize_int8(w, 32)
    return quantize_int8(w, None)  # per channel: one group of K


def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), (err, ref.abs().max().item())


KINDS = ["q4_0", "q4_1", "int4-g16", "int8-g32", "int8-per-channel"]


@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_matches_dequantized(kind, m):
    from kernels.triton.quant import quant_linear

    w = weight(kind)  # N = 72: not a multiple of the 64-column tile
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m))
    check(quant_linear(x, w), F.linear(x, w.dequantize()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_half_dtypes(kind, dtype):
    from kernels.triton.quant import quant_linear

    w = weight(kind, seed=1)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    check(quant_linear(x, w), F.linear(x.float(), w.dequantize()), dtype)


@pytest.mark.parametrize("block_k", [16, 32, 64])
def test_k_tiles_inside_and_across_groups(block_k):
    """block_k 16/32 stay inside a group of 32 (one scale per column and tile); 64 spans two groups
    (the per-element scale path); K = 160 also leaves a partial last tile for 64."""
    from kernels.triton.quant import quant_linear

    for w in (weight("q4_1", 40, 160, seed=3), weight("int8-g32", 40, 160, seed=4)):
        x = torch.randn(3, 160, generator=torch.Generator().manual_seed(5))
        check(quant_linear(x, w, block_k=block_k), F.linear(x, w.dequantize()), torch.float32)


def test_bias_leading_dims_and_empty():
    from kernels.triton.quant import quant_linear

    w = weight("q4_1")
    bias = torch.randn(72, generator=torch.Generator().manual_seed(6))
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(7))
    y = quant_linear(x, w, bias)
    assert y.shape == (2, 3, 72)
    check(y, F.linear(x, w.dequantize(), bias), torch.float32)
    assert quant_linear(torch.zeros(0, 96), w).shape == (0, 72)


def test_row_slices_and_strided_input():
    """Weights that are row views of a larger quantized tensor (`rows(slice)`) and x with a row stride
    wider than K are read through their strides."""
    from kernels.triton.quant import quant_linear

    big = weight("int8-g32", 96, 96, seed=8)
    w = big.rows(slice(16, 88))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(9))[:, 16:112]
    check(quant_linear(x, w), F.linear(x, w.dequantize()), torch.float32)


def test_matches_cpu_path():
    """Both implementations of ops.linear agree for a quantized weight."""
    from kernels.quant import quant_linear as torch_linear
    from kernels.triton.quant import quant_linear

    w = weight("q4_0", 64, 128, seed=10)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(11))
    want = torch_linear(x, w)
    torch.testing.assert_close(quant_linear(x, w), want, atol=1e-5 * want.abs().max().item(), rtol=0)
