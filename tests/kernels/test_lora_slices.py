"""SlicedWeights: a plain (A^T, B^T) pair to the torch path, with its slice layout kept through copies."""

from __future__ import annotations

import copy

import torch

from kernels.lora import LoraSegments, SlicedWeights, sgmv_torch_


def test_unpacks_as_a_pair_and_survives_copies():
    a_t, b_t = torch.randn(8, 3), torch.randn(3, 5)
    w = SlicedWeights(a_t, b_t, [1, 2], [2, 3])
    first, second = w
    assert first is a_t and second is b_t and len(w) == 2
    for c in (copy.copy(w), copy.deepcopy(w)):
        assert isinstance(c, SlicedWeights) and (c.ranks, c.outs) == ((1, 2), (2, 3))
        assert torch.equal(c[0], a_t) and torch.equal(c[1], b_t)


def test_torch_path_reads_it_as_the_dense_pair():
    a_t, b_t = torch.randn(8, 3), torch.zeros(3, 5)
    b_t[:1, :2], b_t[1:, 2:] = torch.randn(1, 2), torch.randn(2, 3)  # block-diagonal, as fused adapters are
    seg = LoraSegments.from_token_slots([0, 0, -1])
    x = torch.randn(3, 8)
    sliced = sgmv_torch_(torch.zeros(3, 5), x, seg, [SlicedWeights(a_t, b_t, [1, 2], [2, 3])])
    plain = sgmv_torch_(torch.zeros(3, 5), x, seg, [(a_t, b_t)])
    assert torch.equal(sliced, plain) and sliced.abs().max() > 0
