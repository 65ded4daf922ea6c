"""Dequantizing matmul as one Triton kernel: the GPU path of `quant_linear` for `QuantizedTensor` weights.

`y [M, N] = x [M, K] @ W^T (+ bias)` with W read in its canonical layout (see `kernels.quant`): each
program dequantizes a `[BLOCK_K, BLOCK_N]` tile of W in registers (int4: byte k // 2, low nibble for
even k; value = code * scale + zero; int8: value = q * scale) and multiplies it with a tile of x,
accumulating in float32. The weight never exists dequantized in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant import QuantizedTensor
from kernels.triton.common import block, check_device, check_launchable, dot_dtype, float_dtype

BLOCK_N = 64


@triton.jit
def _dequant_mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
                       M, N, K, group,
                       stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
                       stride_ym, stride_yn,
                       INT4: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TILE: tl.constexpr,
                       DOT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        # W^T tile [BLOCK_K, BLOCK_N]
        if INT4:
            byte = tl.load(qw_ptr + n[None, :] * stride_qn + (k // 2)[:, None] * stride_qk, mask=w_ok, other=0)
            code = ((byte >> ((k % 2) * 4).to(tl.uint8)[:, None]) & 15).to(tl.float32)
        else:
            code = tl.load(qw_ptr + n[None, :] * stride_qn + k[:, None] * stride_qk, mask=w_ok, other=0)
            code = code.to(tl.float32)
        if GROUP_TILE:  # the whole K tile lies in one group: one scale (and zero) per column
            g = k0 // group
            scale = tl.load(s_ptr + n * stride_sn + g * stride_sg, mask=n_ok, other=0.0)[None, :]
            if INT4:
                zero = tl.load(z_ptr + n * stride_zn + g * stride_zg, mask=n_ok, other=0.0)[None, :]
        else:
            g = (k // group)[:, None]
            scale = tl.load(s_ptr + n[None, :] * stride_sn + g * stride_sg, mask=w_ok, other=0.0)
            if INT4:
                zero = tl.load(z_ptr + n[None, :] * stride_zn + g * stride_zg, mask=w_ok, other=0.0)
        w = code * scale
        if INT4:
            w += zero
        acc += tl.dot(x.to(DOT), w.to(DOT), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> None:
    float_dtype(x, "quantized linear input x")
    if not isinstance(w, QuantizedTensor):
        raise TypeError(f"the dequantizing matmul needs a QuantizedTensor weight, got {type(w).__name__}")
    n, k = w.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {list(x.shape)}, the weight expects K={k} features")
    want = (torch.uint8, (n, k // 2)) if w.kind == "int4" else (torch.int8, (n, k))
    if (w.qweight.dtype, tuple(w.qweight.shape)) != want:
        raise TypeError(f"{w.kind} qweight must be {want[0]} {list(want[1])}, got {w.qweight.dtype} "
                        f"{list(w.qweight.shape)}")
    groups = (n, k // w.group_size)
    for name, t in (("scales", w.scales), ("zeros", w.zeros)):
        if t is None:
            if name == "zeros" and w.kind == "int4":
                raise ValueError("an int4 weight needs zeros")
            continue
        float_dtype(t, f"quantized weight {name}")
        if tuple(t.shape) != groups:
            raise ValueError(f"quantized weight {name} must have shape {list(groups)}, got {list(t.shape)}")
        check_device(f"quantized weight {name}", t, x.device)
    check_device("quantized weight", w.qweight, x.device)
    if bias is not None:
        float_dtype(bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape [{n}], got {list(bias.shape)}")
        check_device("bias", bias, x.device)


def quant_linear(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None, *,
                 block_m: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x.dtype; block_m/block_k: None = chosen here (tests force them)."""
    _check(x, w, bias)
    n, k = w.shape
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    check_launchable(_dequant_mm_kernel, x.device)
    block_m = block_m or block(m)
    # K tiles inside one group let a tile share one scale per column (GGUF and our int4 use groups of 32)
    block_k = block_k or (32 if w.group_size % 32 == 0 else 16)
    dot, precision = dot_dtype(x.dtype)
    zeros = w.zeros if w.zeros is not None else w.scales  # not read for int8
    _dequant_mm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))](
        x2, w.qweight, w.scales, zeros, bias if bias is not None else y, y,
        m, n, k, w.group_size,
        x2.stride(0), x2.stride(1), *w.qweight.stride(), *w.scales.stride(), *zeros.stride(), *y.stride(),
        INT4=w.kind == "int4", HAS_BIAS=bias is not None, GROUP_TILE=w.group_size % block_k == 0,
        DOT=dot, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)
