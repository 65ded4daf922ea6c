"""Our Llama-family model against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_features, native, native_matmul, quant_cpu
from kernels.ops import AttentionPlan
from service.runtime.loader import load_model
from service.runtime.model import REFINE_TOP, KVCache, LlamaModel
from tests.tiny_models import KINDS, VOCAB, make_tiny_model

# fp32 path: same math as transformers up to summation order.
FP32_ATOL = 2e-4
# bf16 path: activations and K/V rounded to 8 mantissa bits; logits of these random models span ~[-10, 10].
BF16_ATOL = 0.25
TIE_MARGIN = 0.05  # reference top-2 logit gap below which a bf16 greedy choice may go either way


def run_chunks(model: LlamaModel, tokens: list[int], chunks: list[int], block_size: int = 4) -> torch.Tensor:
    """Feed `tokens` in consecutive chunks of the given sizes; return logits of every position [T, V]."""
    nblocks = (len(tokens) + block_size - 1) // block_size
    kv = KVCache(model.arch, num_blocks=nblocks + 3, block_size=block_size, dtype=model.dtype)
    # A scrambled block table proves positions are found through it, not by arithmetic on the arena.
    table = list(reversed(range(3, 3 + nblocks)))
    out, start = [], 0
    for n in chunks:
        plan = AttentionPlan.build([table], [start], [n], block_size)
        ids = torch.tensor(tokens[start : start + n])
        pos = torch.arange(start, start + n)
        out.append(model.compute_logits(model.forward(ids, pos, plan, kv)))
        start += n
    assert start == len(tokens)
    return torch.cat(out)


@pytest.fixture(scope="module", params=list(KINDS))
def tiny(request, tmp_path_factory):
    path, hf = make_tiny_model(tmp_path_factory.mktemp("m"), request.param)
    return path, hf


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_logits_match_transformers_fp32(tiny):
    path, hf = tiny
    loaded = load_model(path)
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32)
    tokens = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, tokens)
    ours = run_chunks(model, tokens, [len(tokens)])
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=FP32_ATOL, rtol=0)
    assert ref.std() > 0.5  # the comparison is not between two near-constant tensors


def test_chunked_prefill_and_decode_match_transformers(tiny):
    """Chunks attending to a cached prefix, then single-token decodes, give the same logits."""
    path, hf = tiny
    loaded = load_model(path)
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32)
    tokens = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = run_chunks(model, tokens, [7, 9, 5, 1, 1, 6, 1])
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=FP32_ATOL, rtol=0)


def test_bf16_path_close_to_transformers(tiny):
    path, hf = tiny
    loaded = load_model(path)
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16)
    tokens = torch.randint(3, VOCAB, (25,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = hf_logits(hf, tokens)
    ours = run_chunks(model, tokens, [10, 15])
    torch.testing.assert_close(ours, ref, atol=BF16_ATOL, rtol=0)
    # and it picks the same greedy token wherever the reference is not a near-tie: the random tiny models have
    # positions whose top two logits are 0.01 apart, closer than bf16 rounding of the activations separates
    top2 = ref.topk(2, -1).values
    decided = (top2[:, 0] - top2[:, 1]) >= TIE_MARGIN
    assert decided.float().mean() >= 0.5, "the comparison would be over too few positions"
    agree = (ours.argmax(-1) == ref.argmax(-1))[decided].float().mean()
    assert agree >= 0.95, f"greedy agreement {agree:.2f} where the reference's top two are >= {TIE_MARGIN} apart"


def test_quantize_on_load_stays_close(tiny):
    """int8 per-channel rounds each weight to 1/254 of its row's range, int4 (groups of 32) to 1/30 of its
    group's range: on these deliberately large random weights int8 stays within a few percent of the
    reference logits and keeps the greedy choice; int4 is coarser but still clearly the same model."""
    path, hf = tiny
    tokens = list(range(3, 23))
    ref = hf_logits(hf, tokens)
    rel, agree = {}, {}
    for mode in ("int8", "int4"):
        loaded = load_model(path, quantize=mode)
        model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32)
        ours = run_chunks(model, tokens, [20])
        rel[mode] = float((ours - ref).norm() / ref.norm())
        agree[mode] = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    assert 0 < rel["int8"] < 0.05, rel
    assert agree["int8"] >= 0.85, agree  # at least 17 of the 20 positions
    assert rel["int8"] < rel["int4"] < 0.5, rel


def test_batched_logits_are_float32_products_on_cpus_without_native_bf16(tiny, monkeypatch):
    """On a CPU without native bf16 that holds the dense copies in the AVX2 kernel's panels, the logits of
    DENSE_F32_MIN_M rows or more are the float32 product of the float32 final hidden states and the head's values
    unrounded (the head's copy keeps them so): every entry within float32 summation of the float64 product, not
    only the leading candidates. Fewer rows take the bf16 head, whose entries are that far off only where refined."""
    if not native_matmul.gemm_available():
        pytest.skip(f"the dense AVX2 kernel needs AVX2 and FMA and the C kernels ({native.unavailable_reason()})")
    monkeypatch.setattr(cpu_features, "_NATIVE_BF16", False)
    path, _ = tiny
    loaded = load_model(path, quantize="int8")
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.bfloat16, dense_weights_bytes=1 << 30)
    head = model.lm_head
    assert model.dense_weights and head.packed["dense"][0].dim() == 3  # float32 panels
    w = head.dequantize().double()
    h = torch.randn(20, w.shape[1], generator=torch.Generator().manual_seed(5))

    def off(m: int) -> torch.Tensor:  # how far each logit is from the float64 product, in float32 summation bounds
        got = model.compute_logits(h[:m])
        assert got.dtype == torch.float32 and got.shape == (m, w.shape[0])
        bound = w.shape[1] * 2**-23 * (h[:m].double().abs() @ w.abs().T)
        return (got.double() - h[:m].double() @ w.T).abs() / (bound + 1e-30)  # (a zero row: 0 / tiny)

    for m in (quant_cpu.DENSE_F32_MIN_M, 20):
        assert (off(m) <= 1).all(), m
    few = off(4)
    assert (few > 1).any()  # the bf16 head: rounded outside the refined candidates
    assert (few.topk(min(REFINE_TOP, w.shape[0]), dim=1, largest=False).values <= 1).all()
