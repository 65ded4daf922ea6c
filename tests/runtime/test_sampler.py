"""Sampling: each filter and penalty, seeds, logprobs, the min_tokens mask."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from service.engine.sampling import SamplingParams
from service.runtime.sampler import sample, step_seed


@dataclass
class Row:
    sampling: SamplingParams
    seed: int = 0
    prompt_token_ids: list[int] = field(default_factory=lambda: [0])
    output_token_ids: list[int] = field(default_factory=list)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def draws(probs: list[float], n: int = 400, **kw) -> list[int]:
    sp = SamplingParams(**kw)
    lg = logits_of(probs)
    return [sample(lg, [Row(sp, seed=s)])[0].token_id for s in range(n)]


def test_greedy_is_argmax():
    lg = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 0.0]])
    res = sample(lg, [Row(SamplingParams(temperature=0)), Row(SamplingParams(temperature=0))])
    assert [r.token_id for r in res] == [1, 0]


def test_temperature_sampling_follows_the_distribution():
    got = draws([0.6, 0.3, 0.1], n=1500, temperature=1.0)
    freq = [got.count(i) / len(got) for i in range(3)]
    assert all(abs(f - p) < 0.05 for f, p in zip(freq, [0.6, 0.3, 0.1])), freq


def test_top_k_top_p_min_p_cut_the_tail():
    assert set(draws([0.5, 0.3, 0.2], top_k=2)) == {0, 1}
    assert set(draws([0.5, 0.3, 0.2], top_k=1)) == {0}
    assert set(draws([0.5, 0.3, 0.2], top_p=0.6)) == {0, 1}  # 0.5 < 0.6, so token 1 stays; 0.8 >= 0.6 drops 2
    assert set(draws([0.5, 0.3, 0.2], top_p=0.4)) == {0}
    assert set(draws([0.5, 0.3, 0.2], min_p=0.5)) == {0, 1}  # threshold 0.25
    assert set(draws([0.5, 0.3, 0.2], min_p=0.7)) == {0}


def test_repetition_penalty_applies_to_prompt_and_output_tokens():
    lg = torch.tensor([[3.0, 2.0, -1.0, 2.5]])
    sp = SamplingParams(temperature=0, repetition_penalty=2.0)
    # token 0 seen in the prompt: 3.0 / 2 = 1.5 < 2.5, so token 3 wins
    assert sample(lg, [Row(sp, prompt_token_ids=[0])])[0].token_id == 3
    # token 3 seen in the output too: 1.25; token 1 (2.0) wins
    assert sample(lg, [Row(sp, prompt_token_ids=[0], output_token_ids=[3])])[0].token_id == 1
    assert torch.equal(lg, torch.tensor([[3.0, 2.0, -1.0, 2.5]]))  # caller's logits untouched


def test_presence_and_frequency_penalties_count_output_tokens():
    lg = torch.tensor([[3.0, 2.0, 0.0]])
    freq = SamplingParams(temperature=0, frequency_penalty=0.6)
    assert sample(lg, [Row(freq, output_token_ids=[0])])[0].token_id == 0  # 3 - 0.6 = 2.4 > 2
    assert sample(lg, [Row(freq, output_token_ids=[0, 0])])[0].token_id == 1  # 3 - 1.2 = 1.8 < 2
    pres = SamplingParams(temperature=0, presence_penalty=1.5)
    assert sample(lg, [Row(pres, output_token_ids=[0])])[0].token_id == 1  # once: 3 - 1.5 < 2


def test_seed_reproducible_and_independent_of_batch_position():
    sp = SamplingParams(temperature=1.0, seed=7)
    lg = torch.randn(1, 500, generator=torch.Generator().manual_seed(0))
    alone = sample(lg, [Row(sp, seed=7)])[0].token_id
    batch = torch.cat([torch.randn(2, 500), lg])
    other = SamplingParams(temperature=0.5)
    mixed = sample(batch, [Row(other, seed=1), Row(other, seed=2), Row(sp, seed=7)])
    assert mixed[2].token_id == alone
    assert step_seed(7, 3) == step_seed(7, 3) != step_seed(7, 4)


def test_logprobs_are_raw_model_logprobs():
    lg = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    res = sample(lg, [Row(SamplingParams(temperature=0, logprobs=2))])[0]
    ref = torch.log_softmax(lg[0], 0)
    assert res.token_id == 2
    assert res.logprob == pytest.approx(float(ref[2]))
    assert [t for t, _ in res.top_logprobs] == [2, 1]
    assert res.top_logprobs[1][1] == pytest.approx(float(ref[1]))
    assert math.isclose(sum(math.exp(v) for v in ref.tolist()), 1.0, rel_tol=1e-6)
    assert sample(lg, [Row(SamplingParams(temperature=0))])[0].logprob is None


EOS_IDS = frozenset({0, 5})  # two EOS ids, like a chat model's end-of-text and end-of-turn


def eos_heavy_logits() -> torch.Tensor:
    """EOS id 0 is the argmax, then EOS id 5, then stop id 3; the only allowed tokens are 1, 2, 4."""
    return torch.tensor([[9.0, 1.0, 2.0, 8.0, 0.5, 8.5]])


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(3,)),
    SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=(3,)),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.99, min_tokens=3, stop_token_ids=(3,)),
    SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(3,), repetition_penalty=1.3),
], ids=["greedy", "random", "random-filtered", "greedy-penalized"])
def test_min_tokens_masks_eos_and_stop_ids_until_it_is_reached(sp):
    lg = eos_heavy_logits()
    banned = EOS_IDS | {3}

    def draw(n_out: int, seed: int) -> int:  # (the penalties touch only tokens 1 and 4)
        return sample(lg, [Row(sp, seed, prompt_token_ids=[4], output_token_ids=[1] * n_out)], EOS_IDS)[0].token_id

    for n in range(3):  # output tokens 0, 1, 2: never EOS or the stop id, whatever the seed
        got = {draw(n, s) for s in range(200)}
        assert got and not got & banned, (n, got)
    # from output index 3 = min_tokens on, the mask is gone: the model's favourites come back
    lifted = {draw(3, s) for s in range(200)}
    assert lifted & banned
    if sp.greedy:
        assert lifted == {0}
    assert torch.equal(lg, eos_heavy_logits())  # the caller's logits are untouched


def test_min_tokens_mask_is_per_row_in_a_batch():
    lg = eos_heavy_logits().repeat(4, 1)
    short = SamplingParams(temperature=0, min_tokens=2)
    rows = [Row(short), Row(SamplingParams(temperature=0)), Row(short, output_token_ids=[1, 1]),
            Row(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,)))]
    # row 0: EOS ids masked, stop id 3 (not its stop id) wins; row 1: no min_tokens; row 2: reached it;
    # row 3: EOS and its stop id masked, 2 wins
    assert [r.token_id for r in sample(lg, rows, EOS_IDS)] == [3, 0, 0, 2]


def test_min_tokens_masks_eos_under_ignore_eos_too():
    """ignore_eos only keeps EOS from ending the request; below min_tokens EOS is masked all the same
    (as vLLM does), and from min_tokens on it may be emitted (and then does not stop the request)."""
    lg = eos_heavy_logits()
    sp = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert sample(lg, [Row(sp, output_token_ids=[1])], EOS_IDS)[0].token_id == 3
    assert sample(lg, [Row(sp, output_token_ids=[1, 1])], EOS_IDS)[0].token_id == 0


def test_min_tokens_logprobs_stay_the_raw_model_ones():
    lg = eos_heavy_logits()
    sp = SamplingParams(temperature=0, min_tokens=2, logprobs=2)
    res = sample(lg, [Row(sp)], EOS_IDS)[0]
    ref = torch.log_softmax(lg[0], 0)
    assert res.token_id == 3
    assert res.logprob == pytest.approx(float(ref[3]))
    assert [t for t, _ in res.top_logprobs] == [0, 5]  # masked, yet the model's most likely tokens


def test_min_tokens_ignores_stop_ids_outside_the_vocabulary():
    sp = SamplingParams(temperature=0, min_tokens=1, stop_token_ids=(3, 10_000))
    assert sample(eos_heavy_logits(), [Row(sp)], EOS_IDS)[0].token_id == 2


@pytest.mark.parametrize("field,value,allowed", [
    ("temperature", -0.5, ">= 0"), ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"),
    ("max_tokens", 0, ">= 1"), ("top_k", -1, ">= 0"), ("min_p", 2.0, "[0, 1]"),
    ("repetition_penalty", 0.0, "> 0"), ("presence_penalty", 3.0, "[-2, 2]"), ("logprobs", 50, "[0, 20]"),
    ("temperature", float("nan"), ">= 0"),
])
def test_nonsense_sampling_values_name_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value) and allowed in str(e.value)


# ---- logit_bias ------------------------------------------------------------------------------------------------
def test_logit_bias_moves_greedy_and_random_choices_per_row():
    lg = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(3, 1)
    rows = [Row(SamplingParams(temperature=0, logit_bias={2: 2.5})),  # 1.0 + 2.5 = 3.5 beats 3.0
            Row(SamplingParams(temperature=0, logit_bias={0: -100})),  # the favourite banned: token 1
            Row(SamplingParams(temperature=0))]  # no bias in the same batch: the argmax
    assert [r.token_id for r in sample(lg, rows)] == [2, 1, 0]
    assert torch.equal(lg, torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(3, 1))  # the caller's logits are untouched
    # random draws: +100 all but forces a token, -100 all but bans one
    assert set(draws([0.6, 0.3, 0.1], temperature=1.0, logit_bias={2: 100})) == {2}
    assert set(draws([0.6, 0.3, 0.1], temperature=1.0, logit_bias={0: -100})) == {1, 2}


def test_logit_bias_comes_after_the_penalties_and_never_lifts_a_masked_token():
    lg = eos_heavy_logits()  # EOS 0 (9.0), EOS 5 (8.5), stop id 3 (8.0); allowed 1, 2, 4
    # a bias on an EOS id below min_tokens: still masked; the bias on token 4 (0.5 + 5 = 5.5) decides among the rest
    sp = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,), logit_bias={0: 100, 4: 5.0})
    assert sample(lg, [Row(sp)], EOS_IDS)[0].token_id == 4
    assert torch.equal(lg, eos_heavy_logits())  # the bias and the mask both put back, in that order
    # repetition penalty first (token 2, seen: 2.0 / 4 = 0.5), then its bias (+0.75 = 1.25): token 1 (1.0) loses
    sp = SamplingParams(temperature=0, repetition_penalty=4.0, logit_bias={2: 0.75, 0: -100, 5: -100, 3: -100})
    assert sample(lg, [Row(sp, prompt_token_ids=[2])])[0].token_id == 2
    sp = SamplingParams(temperature=0, repetition_penalty=4.0, logit_bias={2: 0.25, 0: -100, 5: -100, 3: -100})
    assert sample(lg, [Row(sp, prompt_token_ids=[2])])[0].token_id == 1  # 0.5 + 0.25 < 1.0


def test_logit_bias_keeps_logprobs_the_raw_model_ones():
    lg = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    res = sample(lg, [Row(SamplingParams(temperature=0, logprobs=2, logit_bias={3: 10.0}), )])[0]
    ref = torch.log_softmax(lg[0], 0)
    assert res.token_id == 3  # chosen with the bias ...
    assert res.logprob == pytest.approx(float(ref[3]))  # ... reported with the model's logprob
    assert [t for t, _ in res.top_logprobs] == [2, 1]


def test_logit_bias_skips_ids_outside_the_vocabulary():
    sp = SamplingParams(temperature=0, logit_bias={10_000: 100, 1: 5.0})
    assert sample(torch.tensor([[3.0, 2.0, 1.0]]), [Row(sp)])[0].token_id == 1


def test_logit_bias_is_kept_sorted_and_drops_zero_biases():
    sp = SamplingParams(logit_bias={7: 1.5, 2: -3, 4: 0})
    assert sp.logit_bias == ((2, -3.0), (7, 1.5))
    assert SamplingParams(logit_bias=[(7, 1.5), (2, -3)]) == sp


@pytest.mark.parametrize("bias,message", [
    ({5: 150.0}, "logit_bias[5]=150.0 is invalid: each bias must be a number in [-100, 100]"),
    ({5: float("nan")}, "logit_bias[5]=nan is invalid"),
    ({5: True}, "logit_bias[5]=True is invalid"),
    ({-1: 1.0}, "logit_bias key -1 is invalid: each key must be a token id"),
    ({"5": 1.0}, "logit_bias key '5' is invalid"),
    ({i: 1.0 for i in range(1025)}, "logit_bias has 1025 entries; at most 1024 are allowed"),
    ([(5, 1.0), (5, 2.0)], "logit_bias has token id 5 twice"),
    ([(5,)], "logit_bias entry (5,) is invalid"),
], ids=["bias-over-100", "bias-nan", "bias-bool", "negative-id", "string-id", "too-many", "duplicate-id", "not-a-pair"])
def test_bad_logit_bias_names_the_entry_and_what_is_allowed(bias, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(logit_bias=bias)
    assert message in str(e.value)
