"""Speculative decoding on a real (tiny random) model: the verify pass runs under each request's adapter over the
paged KV cache, and outputs do not change: greedy token for token, seeded sampling draw for draw, and the sampled
distribution at temperature 0.8 is the model's (chi-square against the exact distribution)."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch

from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from tests.runtime.test_engine_model import make_engine, tiny  # noqa: F401  (the fixture)
from tests.tiny_models import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny model and three adapters of ranks 4, 16 and 64 over different projections."""
    root = tmp_path_factory.mktemp("spec")
    path, hf = make_tiny_model(root, "llama-gqa", layers=2)
    dirs = []
    for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (16, "all-linear"), (64, ["o_proj", "down_proj"])]):
        torch.manual_seed(50 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=r, lora_alpha=16, init_lora_weights=False,
                                                                     target_modules=targets))
        pm.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return path, dirs


def _run(path, dirs, speculation: str, num_blocks_gib: float = 0.01, **engine):
    rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=num_blocks_gib),
                       EngineConfig(block_size=4, max_num_seqs=16, max_num_batched_tokens=96,
                                    speculation=speculation, draft_token_cost=0, **engine),
                       AdapterConfig(max_active_adapters=4))
    versions = [rt.add_local_adapter(d) for d in dirs]
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, VOCAB, (24,), generator=g).tolist()
    prompts, keys, params = [], [], []
    for i in range(12):
        # repetitive prompts (what prompt lookup feeds on), half of them behind a shared prefix (cache hits)
        motif = torch.randint(3, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        body = motif * 4
        prompts.append(shared + body if i % 2 else body)
        keys.append(None if i % 4 == 3 else versions[i % 3])
        kw = {}
        if i % 5 == 1:
            kw = {"repetition_penalty": 1.3, "presence_penalty": 0.5}
        elif i % 5 == 2:
            kw = {"min_tokens": 10}
        seeded = i % 3 == 2
        params.append(SamplingParams(max_tokens=24, temperature=0.8 if seeded else 0, seed=100 + i if seeded else None,
                                     **kw))
    finals = rt.engine.generate(prompts, params, adapter_versions=keys)
    rt.engine.check_idle_integrity()
    return rt, finals


def test_outputs_identical_with_and_without_speculation_mixed_adapters_prefix_hits(mixed):
    path, dirs = mixed
    _, off = _run(path, dirs, "off")
    rt, on = _run(path, dirs, "ngram")
    for a, b in zip(off, on, strict=True):
        assert a.error is None and b.error is None
        assert list(a.token_ids) == list(b.token_ids)  # greedy and seeded rows alike
        assert a.finish_reason is b.finish_reason and a.usage == b.usage
    s = rt.engine.stats
    assert s.prefix_cache_hit_tokens > 0
    assert s.spec_draft_tokens > 0 and 0 < s.spec_accepted_tokens < s.spec_draft_tokens
    assert sum(f.speculation.accepted_tokens for f in on) == s.spec_accepted_tokens


def test_outputs_identical_under_preemption_with_a_tiny_block_budget(mixed):
    path, dirs = mixed
    _, off = _run(path, dirs, "off")
    # 0.00025 GiB of float32 KV holds a few dozen 4-token blocks for this model: requests get preempted
    rt, tight = _run(path, dirs, "ngram", num_blocks_gib=0.00025)
    assert rt.engine.stats.preemptions > 0 and rt.engine.stats.spec_accepted_tokens > 0
    for a, b in zip(off, tight, strict=True):
        n = min(len(a.token_ids), len(b.token_ids))  # a tiny pool may end a long context early (LENGTH)
        assert list(a.token_ids)[:n] == list(b.token_ids)[:n] and n > 0


def test_a_seed_gives_the_same_text_whether_or_not_the_batch_speculates(tiny):  # noqa: F811
    model, _ = tiny
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=77, ignore_eos=True, speculation="off")
    alone = make_engine(model, speculation="off").generate([[5, 6, 7, 5, 6, 7, 5, 6]], sp)[0]
    others = [SamplingParams(max_tokens=20, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 2)]
    spec = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=77, ignore_eos=True, speculation="ngram")
    engine = make_engine(model, speculation="ngram", draft_token_cost=0)
    batch = engine.generate([[9, 9, 9, 9], [5, 6, 7, 5, 6, 7, 5, 6], [11, 12, 11, 12], [5, 6, 7, 5, 6, 7, 5, 6]],
                            [others[0], sp, others[1], spec])
    assert engine.stats.spec_draft_tokens > 0
    assert list(batch[1].token_ids) == list(alone.token_ids)  # not speculating, beside requests that do
    assert list(batch[3].token_ids) == list(alone.token_ids)  # speculating itself


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile for an upper tail of 0.001 (z = 3.09), by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


class GreedyOracle:
    """A proposer that drafts the model's own greedy continuation (what a good draft model would): on a peaked
    model at temperature 0.8 its drafts are often accepted and often rejected, so both paths are tested."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def propose(self, state, tokens, k: int) -> list[int]:
        key = tuple(tokens)
        if key not in self.cache:
            ids = list(tokens)
            with torch.no_grad():
                for _ in range(4):
                    ids.append(int(self.hf(torch.tensor([ids])).logits[0, -1].argmax()))
            self.cache[key] = ids[len(tokens):]
        return self.cache[key][:k]

    def release(self, state) -> None:
        """Nothing held per request."""


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny model whose LM head is scaled up, so its next-token distributions are peaked like a trained
    model's (the plain random one is nearly uniform over its 128 tokens)."""
    from service.runtime.loader import load_model
    from service.runtime.model import LlamaModel
    from tests.tiny_models import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("peaked")
    _, hf = make_tiny_model(root, "llama-gqa", layers=2, seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(2.5)
    hf.save_pretrained(root / "scaled", safe_serialization=True)
    write_tiny_tokenizer(root / "scaled")
    loaded = load_model(root / "scaled")
    return LlamaModel(loaded.arch, loaded.tensors, dtype=torch.float32), hf


def test_speculative_sampling_keeps_the_model_distribution(peaked):
    """Temperature 0.8: the second output token (the first position a verify pass decides) of 3000 seeded draws
    against its exact marginal sum_t0 p(t0) p(t1 | t0), computed from the model's logits. Threshold: the
    chi-square statistic (bins of expected count >= 5, the rest pooled) must stay below the 0.999 quantile: a false
    alarm once in a thousand seed sets; the seeds are fixed, so the test is deterministic."""
    model, hf = peaked
    temp = 0.8
    prompt = [7, 8, 9, 10, 7, 8, 9, 10, 7, 8, 9, 10] + list(range(20, 40))
    with torch.no_grad():
        p0 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].double() / temp, -1)
        nxt = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p1 = torch.softmax(hf(nxt).logits[:, -1].double() / temp, -1)  # [t0, t1]
    exact = (p0.unsqueeze(1) * p1).sum(0)  # marginal of t1
    n = 3000
    engine = make_engine(model, num_blocks=1024, speculation="ngram", max_num_seqs=64, max_num_batched_tokens=4096,
                         speculative_max_step_tokens=4096, draft_token_cost=0)
    engine.speculator.proposers["ngram"] = GreedyOracle(hf)
    params = [SamplingParams(max_tokens=4, temperature=temp, seed=s, ignore_eos=True) for s in range(n)]
    finals = engine.generate([prompt] * n, params)
    s = engine.stats
    assert s.spec_draft_tokens >= n, "every draw verifies drafts from its second token on"
    rate = s.spec_accepted_tokens / s.spec_draft_tokens
    assert 0.2 < rate < 0.9, f"drafts both accepted and rejected (acceptance {rate:.2f})"
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for f in finals:
        counts[f.token_ids[1]] += 1
    expected = exact * n
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if bool((~big).any()):
        obs = torch.cat([obs, counts[~big].sum().view(1)])
        exp = torch.cat([exp, expected[~big].sum().view(1)])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    assert df >= 5, "the distribution is spread enough to test"
    print(f"acceptance {rate:.2f}, chi2={chi2:.1f}, df={df}, critical {_chi2_critical(df):.1f}")
    assert chi2 < _chi2_critical(df), f"chi2={chi2:.1f} over {df} degrees of freedom"
    # the same seeds without speculation give the very same draws
    off = make_engine(model, num_blocks=1024, speculation="off", max_num_seqs=64,
                      max_num_batched_tokens=4096).generate([prompt] * 300, params[:300])
    assert [f.token_ids for f in off] == [f.token_ids for f in finals[:300]]
