"""The tiny random model, int4-quantized, with two LoRA adapters: a prefill and decode steps entirely on
the Triton path (through the interpreter) give the torch path's logits."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from adapters.identity import adapter_version_id
from adapters.peft_format import parse_adapter
from kernels.ops import AttentionPlan, LoraSegments, TorchKernels, TritonKernels
from service.runtime.loader import load_model
from service.runtime.lora import LoraSlots, fuse_adapter
from service.runtime.model import KVCache, LlamaModel, LoraStep
from tests.tiny_models import VOCAB, make_tiny_model

pytestmark = pytest.mark.interpreter

# float32 on both paths, over the same int4 weights: only summation order differs.
ATOL = 1e-3
ADAPTERS = {
    "all-linear-r8": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "qv-r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


def test_decode_steps_match_torch_path(tmp_path, monkeypatch):
    from kernels.triton import attention, quant, sgmv

    path, hf = make_tiny_model(tmp_path, "llama-gqa", layers=2)
    loaded = load_model(path, quantize="int4")
    slots = LoraSlots(loaded.arch, max_active=2)
    for slot, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + slot)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **kw))
        pm.save_pretrained(tmp_path / name)
        parsed = parse_adapter(tmp_path / name, loaded.arch)
        version = adapter_version_id(parsed, loaded.model_id)
        slots.load(slot, fuse_adapter(parsed, loaded.arch, version, torch.float32))
    torch_model = LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32, kernels=TorchKernels())
    models = {"torch": torch_model, "base": torch_model,
              "triton": LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32, kernels=TritonKernels())}

    # three requests: adapter 0, the base model, adapter 1; prompts of 6, 5 and 9 tokens
    req_slots = [0, -1, 1]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 5, 9)]
    bs = 4
    tables = [[9, 2, 14, 5], [0, 11, 7, 3], [6, 13, 1, 10, 8]]  # scrambled: positions go through the tables
    caches = {mode: KVCache(loaded.arch, num_blocks=16, block_size=bs, dtype=torch.float32)
              for mode in ("torch", "triton", "base")}

    def step(mode: str, starts: list[int], toks: list[list[int]]) -> torch.Tensor:
        model = models[mode]
        lens = [len(t) for t in toks]
        plan = AttentionPlan.build(tables, starts, lens, bs)
        ids = torch.tensor([t for ts in toks for t in ts])
        pos = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)])
        seg = LoraSegments.from_token_slots([s for s, n in zip(req_slots, lens) for _ in range(n)])
        lora = None if mode == "base" else LoraStep(seg, slots.table)
        hidden = model.forward(ids, pos, plan, caches[mode], lora)
        return model.compute_logits(hidden)

    calls = {"quant_linear": 0, "sgmv_": 0, "paged_attention": 0}

    def counting(name, f):
        def counted(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return counted

    for module, name in ((quant, "quant_linear"), (sgmv, "sgmv_"), (attention, "paged_attention")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))

    starts, toks = [0, 0, 0], prompts
    # the adapters really change their requests' logits (the comparison is not base against base)
    base, with_lora = step("base", starts, toks).split([6, 5, 9]), step("torch", starts, toks).split([6, 5, 9])
    assert torch.equal(base[1], with_lora[1])
    assert min((base[i] - with_lora[i]).abs().max().item() for i in (0, 2)) > 0.1
    caches["torch"] = KVCache(loaded.arch, num_blocks=16, block_size=bs, dtype=torch.float32)
    for _ in range(4):  # the prefill, then three decode steps
        ref = step("torch", starts, toks)
        out = step("triton", starts, toks)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        last = torch.tensor([len(t) for t in toks]).cumsum(0) - 1  # each request's last row
        nxt = ref[last].argmax(-1)
        assert torch.equal(out[last].argmax(-1), nxt)
        starts = [s + len(t) for s, t in zip(starts, toks)]
        toks = [[int(t)] for t in nxt]
    # every layer's projections, LoRA groups and attention ran on the Triton path: 2 layers x 4 steps
    # (the LM head is quantized too: one more matmul per step)
    assert calls == {"paged_attention": 8, "sgmv_": 8 * 4, "quant_linear": 8 * 4 + 4}
