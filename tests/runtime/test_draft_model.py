"""Speculative drafts from a draft model (`--draft-model`): outputs identical to decoding without speculation over a
mixed batch (adapters of different ranks, base rows, prefix-cache hits, seeded sampling, a preemption), the draft's
own KV cache kept right across verifies (the served model as its own draft accepts every greedy draft), its blocks
returned when requests end, and draft models that cannot draft for the served one refused at start."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from tests.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The served tiny model (2 layers), two adapters, and a smaller random draft model (1 layer) of the same
    tokenizer."""
    root = tmp_path_factory.mktemp("draft")
    path, hf = make_tiny_model(root / "target", "llama-gqa", layers=2)
    draft, _ = make_tiny_model(root / "draft", "llama-gqa", seed=3, layers=1)
    dirs = []
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (16, "all-linear")]):
        torch.manual_seed(60 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=r, lora_alpha=16, init_lora_weights=False,
                                                                     target_modules=targets))
        pm.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return path, draft, dirs


def _run(path, draft, dirs, speculation: str, kv_gib: float = 0.01):
    rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=kv_gib, draft_model=str(draft),
                                     max_model_len=64),
                       EngineConfig(block_size=4, max_num_seqs=16, max_num_batched_tokens=96,
                                    speculation=speculation, draft_token_cost=0),
                       AdapterConfig(max_active_adapters=4))
    versions = [rt.add_local_adapter(d) for d in dirs]
    g = torch.Generator().manual_seed(9)
    shared = torch.randint(3, VOCAB, (24,), generator=g).tolist()
    prompts, keys, params = [], [], []
    for i in range(10):
        body = torch.randint(3, VOCAB, (5 + i,), generator=g).tolist()
        prompts.append(shared + body if i % 2 else body)  # half behind a shared prefix: cache hits
        keys.append(None if i % 3 == 2 else versions[i % 2])
        seeded = i % 4 == 1
        params.append(SamplingParams(max_tokens=20, temperature=0.8 if seeded else 0, seed=200 + i if seeded else None,
                                     ignore_eos=True))
    finals = rt.engine.generate(prompts, params, adapter_versions=keys)
    rt.engine.check_idle_integrity()
    return rt, finals


@pytest.mark.parametrize("kv_gib", [0.01, 0.00008], ids=["roomy", "preempting"])  # 0.00008: 40 blocks of 4
def test_outputs_identical_with_draft_model_speculation(models, kv_gib):
    path, draft, dirs = models
    _, off = _run(path, draft, dirs, "off", kv_gib)
    rt, on = _run(path, draft, dirs, "draft", kv_gib)
    for a, b in zip(off, on, strict=True):
        assert a.error is None and b.error is None
        assert list(a.token_ids) == list(b.token_ids)  # greedy and seeded rows alike
    s = rt.engine.stats
    assert s.spec_draft_tokens > 0 and s.prefix_cache_hit_tokens > 0
    if kv_gib < 0.001:
        assert s.preemptions > 0
    proposer = rt.engine.speculator.proposers["draft"]
    assert proposer.forward_passes > 0
    # every request has ended: the draft's blocks are all free again
    assert proposer.free_blocks == proposer.kv.num_blocks


def test_the_served_model_as_its_own_draft_has_every_greedy_draft_accepted(models):
    """Same weights on both sides: a draft differs from the target only if the draft's KV cache (catch-up after a
    verify, positions past a rejection) were wrong."""
    path, _, _ = models
    rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=0.01, draft_model=str(path)),
                       EngineConfig(block_size=4, speculation="draft", draft_token_cost=0))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (7 + 3 * i,), generator=g).tolist() for i in range(3)]
    finals = rt.engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    s = rt.engine.stats
    assert all(len(f.token_ids) == 40 for f in finals)
    assert s.spec_draft_tokens >= 30 and s.spec_accepted_tokens == s.spec_draft_tokens


def _kv_rows(proposer, seq, n: int) -> torch.Tensor:
    """The draft's K/V of positions [0, n) of one request: [layers, 2, n, kv_heads, head_dim]."""
    bs = proposer.block_size
    slots = torch.tensor([seq.blocks[p // bs] * bs + p % bs for p in range(n)])
    arena = proposer.kv.arena
    return arena.flatten(2, 3)[:, :, slots]


def test_proposals_after_rejections_are_those_of_a_fresh_draft(models):
    """The draft's cache across verifies: after each proposal the request's tokens grow by some of the drafts and a
    token the draft did not propose (a rejection's correction); the draft's proposals and its K/V of the tokens it
    has read must be what the draft model computes from scratch for the same tokens (a new proposer, empty cache).
    Some rounds add decode steps without drafts after the verify."""
    from service.engine.speculative import NgramProposer, SpecState
    from service.runtime.draft import DraftModelProposer

    path, draft, _ = models
    rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=0.01, draft_model=str(draft)),
                       EngineConfig(block_size=4))
    proposer = rt.engine.speculator.proposers["draft"]
    state = SpecState(proposer, 6, 6)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, VOCAB, (9,), generator=g).tolist()
    for round_ in range(8):
        k = 2 + round_ % 5
        got = proposer.propose(state, tokens, k)
        fresh = DraftModelProposer(proposer.model, 64, 4, 512)
        fresh_state = SpecState(NgramProposer(), 6, 6)
        assert got == fresh.propose(fresh_state, tokens, k) and len(got) == k
        torch.testing.assert_close(_kv_rows(proposer, state.proposer_state, len(tokens)),
                                   _kv_rows(fresh, fresh_state.proposer_state, len(tokens)), rtol=1e-5, atol=1e-6)
        kept = round_ % (k + 1)  # 0 .. k drafts kept, then a token of the target's
        tokens += got[:kept] + [(got[kept] + 1) % VOCAB if kept < k else 7]
        if round_ % 3 == 2:  # then steps without drafts: the target's tokens, none of them the draft's
            tokens += [(got[-1] + 2 + j) % VOCAB for j in range(3)]
    proposer.release(state)
    assert proposer.free_blocks == proposer.kv.num_blocks


def test_draft_models_that_cannot_draft_for_the_served_one_are_refused(models, tmp_path):
    """Bad input: a draft of another vocabulary; speculation 'draft' as the default with no draft model (engine and
    serve's flags)."""
    path, _, _ = models
    with pytest.raises(ValueError, match="vocabulary of 49152 tokens, the served model's has 128"):
        build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=0.01,
                                    draft_model="synthetic:smollm2-135m"), EngineConfig(block_size=4))
    with pytest.raises(ValueError, match=r"speculation='draft' needs a draft model \(--draft-model\)"):
        build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=0.01),
                      EngineConfig(block_size=4, speculation="draft"))
    # `serve --speculation draft` without --draft-model: refused before the model loads
    from service.cli import build_parser, serve_configs

    with pytest.raises(ValueError, match="speculation 'draft' as the server's default needs a draft model"):
        serve_configs(build_parser().parse_args(["serve", "--speculation", "draft"]))
    rc, ec, *_ = serve_configs(build_parser().parse_args(["serve", "--speculation", "draft", "--draft-model", "d"]))
    assert (rc.draft_model, ec.speculation) == ("d", "draft")
