"""The exact refinement of the LM head's leading logits (kernels/cpu/decode.c `refine_top_q8` and its bf16-input
form `refine_top_q8_bf16`, through kernels.native_matmul): each row's k largest logits recomputed in float32 from
the int8 head, ties to the lower index, NaNs never kept; the bf16 form the same values as widening first."""

from __future__ import annotations

import torch

from kernels import native_matmul

BF16 = torch.bfloat16


def test_refine_top_q8_recomputes_each_rows_leading_candidates_exactly():
    """Tie-free logits (float32 noise, so the k largest are one set): at each row's 16 largest the float32 dot
    product of hidden with the dequantized int8 row (within float32 summation of the torch einsum's), everything
    else untouched; a NaN is never taken for a candidate; k outside 1..REFINE_MAX_K and mismatched shapes are
    refused with nothing changed."""
    from kernels.quant import quantize_int8

    g = torch.Generator().manual_seed(12)
    w = quantize_int8(torch.randn(1000, 64, generator=g) * 0.05, 32)
    hidden = torch.randn(3, 64, generator=g)
    logits = torch.randn(3, 1000, generator=g)
    logits[1, 7] = float("nan")
    out = logits.clone()
    assert native_matmul.refine_top_q8(out, hidden, w.qweight, w.scales, 16)
    exact = hidden @ w.dequantize().T
    for r in range(3):
        finite = logits[r].nan_to_num(nan=-float("inf"))
        top = finite.topk(16).indices
        torch.testing.assert_close(out[r, top], exact[r, top], rtol=1e-5, atol=1e-6)
        rest = torch.ones(1000, dtype=torch.bool)
        rest[top] = False
        assert torch.equal(out[r, rest].nan_to_num(nan=123.0), logits[r, rest].nan_to_num(nan=123.0))
    for k in (0, native_matmul.REFINE_MAX_K + 1):
        again = logits.clone()
        assert not native_matmul.refine_top_q8(again, hidden, w.qweight, w.scales, k)
        assert torch.equal(again.nan_to_num(nan=1.0), logits.nan_to_num(nan=1.0))
    assert not native_matmul.refine_top_q8(logits.clone(), hidden[:2], w.qweight, w.scales, 16)  # rows disagree


def test_refine_top_q8_from_bf16_logits_is_the_float32_pass_in_one():
    """`refine_top_q8_bf16` (the head's bf16 logits widened and refined row by row) gives exactly what widening
    them all and then `refine_top_q8` gives: on rows with many ties (small integers: the k kept are the k largest,
    ties at the boundary to the lower index, checked against a stable sort), a rising row (every block has a new
    candidate: nothing skipped), a NaN, and a vocabulary of 1,000 (a tail of 8 after the last block of 32). Bad
    shapes (hidden's rows disagree) and k outside 1..REFINE_MAX_K are refused (None)."""
    from kernels.quant import quantize_int8

    g = torch.Generator().manual_seed(13)
    w = quantize_int8(torch.randn(1000, 64, generator=g) * 0.05, 32)
    hidden = torch.randn(4, 64, generator=g)
    logits = torch.randint(0, 8, (4, 1000), generator=g).to(BF16)  # ties everywhere
    logits[1] = torch.linspace(-3, 3, 1000).to(BF16)  # rising: the kept set changes in every block
    logits[2] = (torch.randn(1000, generator=g) * 4).to(BF16)
    logits[2, 500] = float("nan")
    logits[3, 990:] = 9  # the largest in the tail after the last full block
    out = native_matmul.refine_top_q8_bf16(logits, hidden, w.qweight, w.scales, 16)
    assert out is not None and out.dtype == torch.float32
    ref = logits.float()
    assert native_matmul.refine_top_q8(ref, hidden, w.qweight, w.scales, 16)
    assert torch.equal(out.nan_to_num(nan=123.0), ref.nan_to_num(nan=123.0))
    exact = hidden @ w.dequantize().T
    for r in range(4):
        v = logits[r].float().nan_to_num(nan=-float("inf"))
        top = torch.sort(-v, stable=True).indices[:16]  # the 16 largest, ties to the lower index
        torch.testing.assert_close(out[r, top], exact[r, top], rtol=1e-5, atol=1e-6)
        rest = torch.ones(1000, dtype=torch.bool)
        rest[top] = False
        assert torch.equal(out[r, rest].nan_to_num(nan=123.0), logits[r, rest].float().nan_to_num(nan=123.0))
    assert native_matmul.refine_top_q8_bf16(logits, hidden[:3], w.qweight, w.scales, 16) is None
    for k in (0, native_matmul.REFINE_MAX_K + 1):
        assert native_matmul.refine_top_q8_bf16(logits, hidden, w.qweight, w.scales, k) is None
