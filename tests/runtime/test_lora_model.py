"""Mixed-adapter batches on our model against `peft.PeftModel` with each adapter alone."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from adapters.identity import adapter_version_id
from adapters.peft_format import parse_adapter
from kernels.ops import AttentionPlan, LoraSegments
from service.runtime.loader import load_model
from service.runtime.lora import LoraSlots, fuse_adapter
from service.runtime.model import KVCache, LlamaModel, LoraStep
from tests.tiny_models import VOCAB, make_tiny_model

# fp32 on both sides: only the summation order differs.
ATOL = 3e-4

ADAPTERS = {
    # different ranks, target sets, scaling rules and layer filters in one batch
    "all-r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "qv-r16-rslora-layers12": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                   layers_to_transform=[1, 2]),
    "mlp-regex-r4-layer0": dict(r=4, lora_alpha=4, target_modules=r"model\.layers\.0\.mlp\.(gate_proj|down_proj)"),
    "attn-r32-patterns": dict(r=32, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                              rank_pattern={"o_proj": 8}, alpha_pattern={"k_proj": 64}),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    path, hf = make_tiny_model(root, "llama-gqa", layers=3)
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **kw))
        dirs[name] = root / name
        pm.save_pretrained(dirs[name])
    # the reference: one PeftModel holding every adapter, switched with set_adapter
    names = list(ADAPTERS)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), dirs[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        ref.load_adapter(dirs[n], adapter_name=n)
    loaded = load_model(path)
    return loaded, hf, ref, dirs


def ref_logits(ref, hf, name: str | None, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        if name is None:
            return hf(torch.tensor([tokens])).logits[0]
        ref.set_adapter(name)
        return ref(torch.tensor([tokens])).logits[0]


def mixed_batch(setup, dtype: torch.dtype, lora_dtype: torch.dtype, reqs: list[tuple[str | None, int]]):
    """Every prompt but its last token as prefill chunks in one step, then the last tokens as decodes in another,
    every adapter in one batch with base-model rows; returns (name, prompt, our logits, peft's) per request."""
    loaded, hf, ref, dirs = setup
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=dtype)
    slots = LoraSlots(loaded.arch, max_active=4)
    names = list(ADAPTERS)
    for slot, name in enumerate(names):
        parsed = parse_adapter(dirs[name], loaded.arch)
        slots.load(slot, fuse_adapter(parsed, loaded.arch, adapter_version_id(parsed, loaded.model_id), lora_dtype))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for _, n in reqs]
    slot_of = {n: i for i, n in enumerate(names)}
    bs = 4
    kv = KVCache(loaded.arch, num_blocks=256, block_size=bs, dtype=dtype)
    tables = [list(range(30 * i, 30 * i + 30)) for i in range(len(reqs))]

    def step(starts: list[int], lens: list[int], toks: list[list[int]]) -> list[torch.Tensor]:
        token_slots = [slot_of.get(name, -1) for (name, _), n in zip(reqs, lens) for _ in range(n)]
        plan = AttentionPlan.build(tables, starts, lens, bs)
        ids = torch.tensor([t for ts in toks for t in ts])
        pos = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)])
        lora = LoraStep(LoraSegments.from_token_slots(token_slots), slots.table)
        logits = model.compute_logits(model.forward(ids, pos, plan, kv, lora))
        return list(logits.float().split(lens))

    pre = step([0] * len(reqs), [len(p) - 1 for p in prompts], [p[:-1] for p in prompts])
    dec = step([len(p) - 1 for p in prompts], [1] * len(reqs), [p[-1:] for p in prompts])
    return [(name, p, torch.cat([a, b]), ref_logits(ref, hf, name, p)) for (name, _), p, a, b in zip(reqs, prompts,
                                                                                                    pre, dec)]


def test_mixed_batch_matches_peft_per_request(setup):
    _, hf, ref, _ = setup
    names = list(ADAPTERS)
    # six requests: every adapter, two base-model rows (one between adapters), different lengths
    reqs = [(names[0], 9), (None, 5), (names[1], 12), (names[2], 7), (names[3], 10), (None, 3)]
    for name, p, ours, expect in mixed_batch(setup, torch.float32, torch.float32, reqs):
        torch.testing.assert_close(ours, expect, atol=ATOL, rtol=0, msg=f"adapter {name}")
        # the adapters really change the output (the comparison is not base vs base)
        if name is not None:
            assert (expect - ref_logits(ref, hf, None, p)).abs().max() > 0.05


def test_bfloat16_serving_path_matches_peft_per_request(setup):
    """What the CPU serves with: bfloat16 activations and the adapters' weights held in bfloat16 (the C SGMV for
    segments up to 64 rows, a bfloat16 product for the 80-token prefill), against peft in float32. Tolerance:
    that of the base model's bfloat16 path against transformers (0.25 on these logits, tests/runtime/
    test_model.py), and every adapter moves the logits by several times that, so it cannot pass unapplied."""
    from kernels import native
    from service.builder import lora_weight_dtype

    _, hf, ref, _ = setup
    # the dtype the server holds them in (float32 only where the C kernels cannot be built)
    held = torch.bfloat16 if native.library() is not None else torch.float32
    assert lora_weight_dtype("torch", torch.bfloat16) == held
    names = list(ADAPTERS)
    reqs = [(names[0], 81), (None, 5), (names[1], 12), (names[2], 7), (names[3], 10), (None, 3)]
    for name, p, ours, expect in mixed_batch(setup, torch.bfloat16, torch.bfloat16, reqs):
        torch.testing.assert_close(ours, expect, atol=0.25, rtol=0, msg=f"adapter {name}")
        if name is not None:
            assert (expect - ref_logits(ref, hf, None, p)).abs().max() > 1.0


def test_segments_skip_slots_without_weights_for_a_projection(setup):
    """The layer-0-only MLP adapter leaves layers 1-2 and attention untouched."""
    loaded, _, _, dirs = setup
    parsed = parse_adapter(dirs["mlp-regex-r4-layer0"], loaded.arch)
    fused = fuse_adapter(parsed, loaded.arch, "v-test", torch.float32)
    assert fused.layers[0]["gate_up"] is not None and fused.layers[0]["down"] is not None
    assert fused.layers[0]["qkv"] is None and fused.layers[0]["o"] is None
    assert all(g is None for layer in fused.layers[1:] for g in layer.values())
    # gate rows only: the up half of the fused B^T is zero
    a_t, b_t = fused.layers[0]["gate_up"]
    inter = loaded.arch.intermediate_size
    assert a_t.shape == (loaded.arch.hidden_size, 4) and b_t.shape == (4, 2 * inter)
    assert b_t[:, inter:].abs().max() == 0 and b_t[:, :inter].abs().max() > 0
