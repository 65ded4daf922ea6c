"""The whole engine on a real (tiny random) model: continuous batching, prefix caching, preemption."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from service.config import EngineConfig
from service.engine.engine import LLMEngine
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason
from service.runtime.loader import load_model
from service.runtime.model import LlamaModel
from service.runtime.model_runner import ModelRunner
from tests.tiny_models import VOCAB, make_tiny_model

NEW_TOKENS = 12


class IdTokenizer:
    """Token ids as text: enough for the engine's detokenizer on a model without a vocabulary."""

    def __init__(self, eos_token_ids: frozenset[int] = frozenset({2})) -> None:
        self.eos_token_ids = eos_token_ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, hf = make_tiny_model(tmp_path_factory.mktemp("m"), "llama-gqa", layers=2)
    loaded = load_model(path)
    return LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32), hf


def make_engine(model: LlamaModel, num_blocks: int = 256, block_size: int = 4,
                eos: frozenset[int] = frozenset({2}), **cfg) -> LLMEngine:
    """`eos`: the tokenizer's EOS set, which the runner masks below min_tokens, as build_runtime wires it."""
    tokenizer = IdTokenizer(eos)
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, max_model_len=256,
                         eos_token_ids=tokenizer.eos_token_ids)
    return LLMEngine(runner, tokenizer, EngineConfig(block_size=block_size, **cfg))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_concurrent_equals_alone_equals_transformers(tiny):
    model, hf = tiny
    ps = prompts(16)
    batched = make_engine(model, max_num_batched_tokens=64).generate(ps, GREEDY)
    for p, out in zip(ps, batched):
        alone = make_engine(model).generate([p], GREEDY)[0]
        assert list(out.token_ids) == list(alone.token_ids)
        assert list(out.token_ids) == hf_greedy(hf, p)
        assert len(out.token_ids) == NEW_TOKENS


def test_prefix_cache_hit_same_output_computes_only_uncached(tiny):
    model, _ = tiny
    engine = make_engine(model, block_size=4)
    shared = list(range(10, 34))  # 24 tokens = 6 full blocks
    first = engine.generate([shared + [40, 41, 42]], GREEDY)[0]
    before = engine.stats.prompt_tokens_computed
    second = engine.generate([shared + [40, 41, 42]], GREEDY)[0]
    computed = engine.stats.prompt_tokens_computed - before
    assert list(second.token_ids) == list(first.token_ids)
    # 27-token prompt: 6 full blocks (24 tokens) are cached; the remaining 3 are computed.
    assert second.usage.cached_input_tokens == 24
    assert computed == 3
    # a cold engine computes all of them and agrees
    cold = make_engine(model).generate([shared + [40, 41, 42]], GREEDY)[0]
    assert list(cold.token_ids) == list(first.token_ids)


def test_preemption_under_tiny_block_budget_keeps_outputs(tiny):
    model, _ = tiny
    ps = prompts(8, seed=5)
    roomy = make_engine(model).generate(ps, GREEDY)
    tight_engine = make_engine(model, num_blocks=24, block_size=4)
    tight = tight_engine.generate(ps, GREEDY)
    assert tight_engine.stats.preemptions > 0
    assert [list(o.token_ids) for o in tight] == [list(o.token_ids) for o in roomy]
    tight_engine.check_idle_integrity()


def test_seeded_sampling_reproducible_whatever_the_batch(tiny):
    model, _ = tiny
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = make_engine(model).generate([[5, 6, 7, 8]], sp)[0]
    others = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, seed=99, ignore_eos=True)
    mixed = make_engine(model).generate([[9, 9, 9], [5, 6, 7, 8], [11, 12]], [others, sp, GREEDY])
    assert list(mixed[1].token_ids) == list(alone.token_ids)
    unseeded = [make_engine(model).generate([[5, 6, 7, 8]], SamplingParams(
        max_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True))[0].token_ids for _ in range(3)]
    assert len({tuple(u) for u in unseeded}) > 1  # without a seed, runs differ


def test_min_tokens_greedy_never_emits_eos_before_it(tiny):
    """EOS = the first tokens greedy decoding wants: without min_tokens the answer ends at once; with
    it, none of its first min_tokens tokens is an EOS id, and it ends on EOS after them."""
    model, _ = tiny
    p = [5, 6, 7, 8]
    free = make_engine(model).generate([p], GREEDY)[0].token_ids
    eos = frozenset(free[:6])
    engine = make_engine(model, eos=eos)
    assert engine.generate([p], SamplingParams(max_tokens=NEW_TOKENS, temperature=0))[0].token_ids == free[:1]
    sp = SamplingParams(max_tokens=40, temperature=0, min_tokens=6)
    out = engine.generate([p], sp)[0]
    assert not set(out.token_ids[:6]) & eos, out.token_ids
    assert len(out.token_ids) > 6


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_random_never_emits_eos_or_stop_ids_before_it(tiny, ignore_eos):
    """Half the vocabulary is EOS and one more id is a stop id, sampled at temperature 1: unmasked,
    nearly every draw would end a request; masked, the first min_tokens tokens never do."""
    model, _ = tiny
    eos = frozenset(range(0, VOCAB, 2))
    engine = make_engine(model, eos=eos)
    min_tokens, stop_id = 8, 3
    sps = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, min_tokens=min_tokens, stop_token_ids=(stop_id,),
                          ignore_eos=ignore_eos) for s in range(8)]
    outs = engine.generate([[5, 6, 7, 8]] * len(sps), sps)
    for out in outs:
        ids = list(out.token_ids)
        assert len(ids) > min_tokens and not set(ids[:min_tokens]) & (eos | {stop_id}), ids
    if not ignore_eos:  # after min_tokens the mask lifts: the requests end on EOS or the stop id
        assert all(o.finish_reason is not FinishReason.LENGTH for o in outs)
    unmasked = engine.generate([[5, 6, 7, 8]] * 8, [SamplingParams(max_tokens=40, temperature=1.0, seed=s)
                                                    for s in range(8)])
    assert any(len(o.token_ids) < min_tokens for o in unmasked)  # the test would catch a missing mask


# ---- prompt logprobs -------------------------------------------------------------------------------------------
def run_collecting(engine: LLMEngine, specs: list) -> dict[str, tuple[list, object]]:
    """Drive the engine over `specs`; per request id, the prompt logprobs its first output carried and its final."""
    for spec in specs:
        engine.add_request(spec)
    got: dict[str, list] = {}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got, "prompt logprobs came twice"
                got[out.request_id] = out.prompt_logprobs
            if out.final is not None:
                finals[out.request_id] = out.final
    return {rid: (got.get(rid), finals[rid]) for rid in finals}


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def test_prompt_logprobs_equal_transformers_across_chunks_a_cache_hit_and_a_preemption(tiny):
    """Prompt token j + 1's logprob from the logits at position j, and the 3 most likely tokens there, against
    transformers' log-softmax (float32 model: within 1e-4), whether the prompt was computed in one step or in
    8-token chunks beside other requests, after another request cached its prefix, or after a preemption."""
    from service.engine.request import RequestSpec

    model, hf = tiny
    ps = prompts(6, seed=7)
    ps[0] = list(range(10, 50))  # 40 tokens: five chunks of 8
    want = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3)

    def check(entries, prompt):
        ref = hf_prompt_logprobs(hf, prompt)
        assert [e.token_id for e in entries] == prompt[1:]
        for j, e in enumerate(entries):
            assert e.logprob == pytest.approx(float(ref[j, prompt[j + 1]]), abs=1e-4)
            top = ref[j].topk(3)
            assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
            assert [v for _, v in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)

    # chunked beside other requests (no prompt logprobs for those)
    engine = make_engine(model, max_num_batched_tokens=8)
    specs = [RequestSpec(f"r{i}", tuple(p), want if i == 0 else GREEDY) for i, p in enumerate(ps)]
    res = run_collecting(engine, specs)
    check(res["r0"][0], ps[0])
    assert all(res[f"r{i}"][0] is None for i in range(1, 6))
    # its prefix cached by an earlier request: the positions it needs logits for are computed anyway
    engine = make_engine(model)
    engine.generate([ps[0]], GREEDY)
    res = run_collecting(engine, [RequestSpec("hit", tuple(ps[0]), want)])
    hit = res["hit"][0]
    check(hit, ps[0])
    assert res["hit"][1].usage.cached_input_tokens == 0
    # a second request with prompt logprobs on its own, no alternatives: the same logprobs again
    res = run_collecting(engine, [RequestSpec("again", tuple(ps[0]), SamplingParams(
        max_tokens=4, temperature=0, prompt_logprobs=0))])
    assert [e.logprob for e in res["again"][0]] == pytest.approx([e.logprob for e in hit], abs=1e-6)
    assert all(e.top_logprobs is None for e in res["again"][0])
    # preempted under a tiny block budget, also in the middle of a prompt (some of its logprobs had, some not; its
    # re-admission takes a cache hit only over positions it has them for): every entry once, the same values
    long = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 50, 60)]
    tight = make_engine(model, num_blocks=20, block_size=4, max_num_batched_tokens=8)
    mid_prompt = []
    preempt = tight.scheduler._preempt

    def spy(req):
        mid_prompt.append(0 < len(req.prompt_logprobs) < req.num_prompt_tokens - 1)
        preempt(req)

    tight.scheduler._preempt = spy
    res = run_collecting(tight, [RequestSpec(f"t{i}", tuple(p), want) for i, p in enumerate(ps + long)])
    assert any(mid_prompt), mid_prompt
    for i, p in enumerate(ps + long):
        check(res[f"t{i}"][0], p)
    tight.check_idle_integrity()
