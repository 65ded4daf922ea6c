"""Bad input to a Triton wrapper is refused with a ValueError/TypeError naming the problem, before any launch.

The kernels themselves do no bounds checks (on a GPU a wrong index reads other memory): every index,
shape and dtype they rely on is checked by the wrapper. Each case's id says what the bad input is.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import AttentionPlan, write_kv
from kernels.lora import LoraSegments, SlicedWeights
from kernels.quant import quantize_int4, quantize_int8

T, IN, OUT, R = 6, 32, 24, 8


def lora_inputs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(T, IN, generator=g), torch.randn(T, OUT, generator=g)
    weights = [(torch.randn(IN, R, generator=g), torch.randn(R, OUT, generator=g)), None]
    return y, x, LoraSegments((0, 3), (3, 6), (0, -1)), weights


def _set(i: int, value):
    def edit(args):
        args[i] = value
        return args
    return edit


def _weights(w):
    return lambda args: args[:3] + [w(args[3])]


SGMV_CASES = {
    "x-and-y-row-counts-differ": (_set(1, torch.randn(T + 1, IN)), ValueError, "x has 7 rows but y has 6"),
    "x-is-1-d": (_set(1, torch.randn(IN)), ValueError, r"sgmv needs x \[T, in\] and y \[T, out\]"),
    "x-integer-dtype": (_set(1, torch.zeros(T, IN, dtype=torch.int32)), TypeError,
                        "sgmv input x has dtype torch.int32"),
    "y-float64": (_set(0, torch.zeros(T, OUT, dtype=torch.float64)), TypeError,
                  "sgmv output y has dtype torch.float64"),
    "y-on-another-device": (_set(0, torch.zeros(T, OUT, device="meta")), ValueError,
                            "sgmv output y is on meta"),
    "segment-past-the-batch": (_set(2, LoraSegments((0,), (9,), (0,))), ValueError,
                               r"segment \[0, 9\) is out of order or outside"),
    "segments-overlap": (_set(2, LoraSegments((0, 2), (4, 6), (0, 0))), ValueError,
                         r"segment \[2, 6\) is out of order"),
    "segment-lists-of-different-length": (_set(2, LoraSegments((0, 3), (3,), (0, 0))), ValueError,
                                          "must have the same length"),
    "slot-index-past-the-slot-table": (_set(2, LoraSegments((0,), (6,), (2,))), ValueError,
                                       r"slot 2 is out of range: must be -1 or in \[0, 2\)"),
    "slot-index-below-minus-one": (_set(2, LoraSegments((0,), (6,), (-2,))), ValueError,
                                   "slot -2 is out of range"),
    "a-t-has-wrong-input-size": (_weights(lambda w: [(torch.randn(IN + 1, R), w[0][1]), None]), ValueError,
                                 r"A\^T \[33, 8\] and B\^T \[8, 24\] do not fit"),
    "b-t-rank-differs-from-a-t": (_weights(lambda w: [(w[0][0], torch.randn(R + 2, OUT)), None]), ValueError,
                                  "do not fit"),
    "a-t-not-contiguous": (_weights(lambda w: [(torch.randn(R, IN).t(), w[0][1]), None]), ValueError,
                           "must be contiguous"),
    "weights-not-a-pair": (_weights(lambda w: [w[0][0], None]), TypeError, "must be a pair"),
    "a-t-and-b-t-dtypes-differ": (_weights(lambda w: [(w[0][0], w[0][1].half()), None]), TypeError,
                                  "need one dtype, got A\\^T torch.float32, B\\^T torch.float16"),
    "slots-of-different-dtypes": (_weights(lambda w: [w[0], (w[0][0].half(), w[0][1].half())]), TypeError,
                                  "earlier slots torch.float32"),
    "slots-slice-the-output-differently": (
        _weights(lambda w: [SlicedWeights(w[0][0], w[0][1], [4, 4], [12, 12]),
                            SlicedWeights(w[0][0], w[0][1], [4, 4], [16, 8])]),
        ValueError, r"slices the output as \(16, 8\), another slot as \(12, 12\)"),
}


@pytest.mark.parametrize("case", list(SGMV_CASES))
def test_sgmv_rejects(case):
    from kernels.triton.sgmv import sgmv_

    edit, error, message = SGMV_CASES[case]
    with pytest.raises(error, match=message):
        sgmv_(*edit(list(lora_inputs())))


@pytest.mark.parametrize(("ranks", "outs"), [
    pytest.param([4, 4], [12, 10], id="outputs-do-not-sum-to-the-columns-of-b-t"),
    pytest.param([3, 4], [12, 12], id="ranks-do-not-sum-to-the-rows-of-b-t"),
    pytest.param([8], [12, 12], id="a-rank-per-output-slice-missing"),
    pytest.param([-1, 9], [12, 12], id="a-negative-rank"),
])
def test_sliced_weights_must_tile_the_pair(ranks, outs):
    with pytest.raises(ValueError, match="LoRA slices"):
        SlicedWeights(torch.zeros(IN, R), torch.zeros(R, OUT), ranks, outs)


def attention_inputs(seqs=((5, 1), (0, 6)), nb=8, bs=4, heads=4, kv_heads=2, d=16):
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(nb, bs, kv_heads, d, generator=g), torch.randn(nb, bs, kv_heads, d, generator=g)
    tables = [[3, 1], [6, 0]]
    plan = AttentionPlan.build(tables, [s for s, _ in seqs], [n for _, n in seqs], bs)
    t = sum(n for _, n in seqs)
    write_kv(kc, vc, torch.randn(t, kv_heads, d), torch.randn(t, kv_heads, d), plan.slot_mapping)
    return torch.randn(t, heads, d, generator=g), kc, vc, plan


def _plan(edit):
    def apply(args):
        edit(args[3])
        return args
    return apply


ATTENTION_CASES = {
    "q-is-2-d": (_set(0, torch.randn(7, 64)), ValueError, r"q must be \[tokens, heads, head_dim\]"),
    "q-integer-dtype": (_set(0, torch.zeros(7, 4, 16, dtype=torch.int64)), TypeError,
                        "attention q has dtype"),
    "k-and-v-caches-differ-in-shape": (_set(2, torch.randn(8, 4, 2, 8)), ValueError,
                                       "k_cache and v_cache must both be"),
    "head-dim-differs-from-cache": (_set(0, torch.randn(7, 4, 8)), ValueError,
                                    "q has head_dim 8, the cache 16"),
    "heads-not-a-multiple-of-kv-heads": (_set(0, torch.randn(7, 3, 16)), ValueError,
                                         "3 query heads cannot share 2 KV heads"),
    "q-rows-differ-from-plan-tokens": (_set(0, torch.randn(9, 4, 16)), ValueError,
                                       "the attention plan covers 7 new tokens, q has 9"),
    "block-id-past-the-cache": (_plan(lambda p: p.block_tables[1].__setitem__(1, 8)), ValueError,
                                "block id 8 is out of range for a cache of 8 blocks"),
    "negative-block-id": (_plan(lambda p: p.block_tables[0].__setitem__(0, -1)), ValueError,
                          "block id -1 is negative"),
    "block-table-too-short-for-the-context": (_plan(lambda p: p.block_tables[1].pop()), ValueError,
                                              "sequence 1 needs 2 blocks of 4 for 6 tokens"),
    "plan-without-per-sequence-geometry": (_plan(lambda p: p.lens.clear()), ValueError,
                                           "one entry per sequence"),
    "cache-on-another-device": (_set(1, torch.randn(8, 4, 2, 16, device="meta")), ValueError,
                                "k_cache is on meta"),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_rejects(case):
    from kernels.triton.attention import paged_attention

    edit, error, message = ATTENTION_CASES[case]
    with pytest.raises(error, match=message):
        paged_attention(*edit(list(attention_inputs())), 0.25)


def _qfield(name, value):
    def edit(args):
        setattr(args[1], name, value)  # bypasses QuantizedTensor's own checks, as a buggy loader might
        return args
    return edit


QUANT_CASES = {
    "x-features-differ-from-k": (_set(0, torch.randn(3, 48)), ValueError,
                                 "x has shape \\[3, 48\\], the weight expects K=64"),
    "x-integer-dtype": (_set(0, torch.zeros(3, 64, dtype=torch.int8)), TypeError,
                        "quantized linear input x has dtype"),
    "weight-is-a-dense-tensor": (_set(1, torch.randn(40, 64)), TypeError, "needs a QuantizedTensor weight"),
    "int4-qweight-not-uint8": (_qfield("qweight", torch.zeros(40, 32, dtype=torch.int8)), TypeError,
                               r"int4 qweight must be torch.uint8 \[40, 32\]"),
    "scales-of-wrong-shape": (_qfield("scales", torch.ones(40, 3)), ValueError,
                              r"scales must have shape \[40, 2\]"),
    "scales-integer-dtype": (_qfield("scales", torch.ones(40, 2, dtype=torch.int32)), TypeError,
                             "scales has dtype"),
    "int4-without-zeros": (_qfield("zeros", None), ValueError, "an int4 weight needs zeros"),
    "bias-of-wrong-length": (lambda a: a[:2] + [torch.randn(41)], ValueError, r"bias must have shape \[40\]"),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quant_linear_rejects(case):
    from kernels.triton.quant import quant_linear

    edit, error, message = QUANT_CASES[case]
    args = [torch.randn(3, 64), quantize_int4(torch.randn(40, 64), 32), None]
    with pytest.raises(error, match=message):
        quant_linear(*edit(args))


def test_int8_qweight_of_wrong_shape():
    from kernels.triton.quant import quant_linear

    w = quantize_int8(torch.randn(40, 64))
    w.qweight = torch.zeros(40, 32, dtype=torch.int8)
    with pytest.raises(TypeError, match=r"int8 qweight must be torch.int8 \[40, 64\]"):
        quant_linear(torch.randn(2, 64), w)
