"""The work split with stealing (kernels/cpu/common.h `steal_next`) that the dense bf16 kernel, the AVX512 int4
kernel and the int8 LM-head kernel share: every unit (panel group, block of tiles) is computed exactly once, by one
thread, whatever the team does. Run with more threads than this machine has cores, the OS preempts threads in
the middle of their ranges and the others take the rest from the back: the outputs must be bit for bit those of
one thread (each output is one thread's float32 chain, never split), for unit counts that do not divide among
the threads, and with a team smaller than the ranges (a product under the kernels' size for a parallel region:
one thread takes every range)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kernels import native, native_matmul
from kernels.quant import quantize_int4, quantize_int8

BF16 = torch.bfloat16


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _same_on_any_team(run) -> None:
    """`run()` on one thread, then on 2, 3, 5 and 8 (past this machine's cores: preempted mid-range), each
    several times: every result bit for bit the one-thread result."""
    with _threads(1):
        ref = run()
    assert ref is not None
    for n in (2, 3, 5, 8):
        with _threads(n):
            for _ in range(4):
                assert torch.equal(run(), ref), f"{n} threads"


@pytest.mark.parametrize("n", [16, 48, 208, 3072 + 16])  # 1 partial group; 1 group; 13 panels (4 groups + 1); 193
@pytest.mark.parametrize("m", [1, 9, 64])
def test_dense_bf16_kernel_gives_the_same_bits_on_any_team(m, n):
    if not native_matmul.gemm_bf16w_available():
        pytest.skip(f"this CPU (or its C build) lacks AVX512-BF16: {native.unavailable_reason() or 'no AVX512-BF16'}")
    g = torch.Generator().manual_seed(m * 7 + n)
    wp = native_matmul.gemm_pack_bf16(torch.randn(n, 576, generator=g))
    x = torch.randn(m, 576, generator=g).to(BF16)
    _same_on_any_team(lambda: native_matmul.gemm_bf16w(x, wp, n))


@pytest.mark.parametrize("n", [70, 1536 + 48])  # 5 tiles (the last of 6 rows); 99 tiles: an odd count of blocks
@pytest.mark.parametrize("m", [1, 3, 8, 16])  # two tiles a block (m <= 4), one tile a block
def test_int4_kernel_gives_the_same_bits_on_any_team(m, n):
    if not native_matmul.q4b_available():
        pytest.skip(f"this CPU (or its C build) lacks AVX512-BF16: {native.unavailable_reason() or 'no AVX512-BF16'}")
    g = torch.Generator().manual_seed(m * 11 + n)
    w = quantize_int4(torch.randn(n, 576, generator=g) * 0.05, 32)
    codes, dm = native_matmul.q4b_pack(w.qweight, w.scales, w.zeros)
    x = torch.randn(m, 576, generator=g).to(BF16)
    _same_on_any_team(lambda: native_matmul.q4b_gemm(x, codes, dm, n))


@pytest.mark.parametrize("n", [70, 4096 + 16])  # 5 tiles; 257 tiles (the LM head's shape, smaller)
@pytest.mark.parametrize("m", [1, 4, 12])
def test_int8_kernel_gives_the_same_bits_on_any_team(m, n):
    if not native_matmul.q8t_available():
        pytest.skip(f"this CPU (or its C build) lacks AVX512-VNNI: {native.unavailable_reason() or 'no AVX512-VNNI'}")
    g = torch.Generator().manual_seed(m * 13 + n)
    w = quantize_int8(torch.randn(n, 576, generator=g), 32)
    codes, dss = native_matmul.q8t_pack(w.qweight, w.scales)
    x = torch.randn(m, 576, generator=g).to(BF16)
    _same_on_any_team(lambda: native_matmul.q8t_gemm(x, codes, dss, n))
