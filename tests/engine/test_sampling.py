"""SamplingParams: bounds on its free-size fields, checked before per-item work, and short messages."""

from __future__ import annotations

import pytest

from service.engine.sampling import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS, SamplingParams


def test_stop_token_ids_are_a_frozenset():
    sp = SamplingParams(stop_token_ids=(7, 3, 7))
    assert sp.stop_token_ids == frozenset({3, 7}) and isinstance(sp.stop_token_ids, frozenset)
    assert SamplingParams().stop_token_ids == frozenset()


def test_stop_token_ids_bound_counts_entries():
    SamplingParams(stop_token_ids=range(MAX_STOP_TOKEN_IDS))
    with pytest.raises(ValueError, match=f"stop_token_ids has 65 entries; at most {MAX_STOP_TOKEN_IDS}"):
        SamplingParams(stop_token_ids=range(MAX_STOP_TOKEN_IDS + 1))
    with pytest.raises(ValueError, match="has 65 entries"):  # duplicates count: the bound is on what was sent
        SamplingParams(stop_token_ids=[3] * (MAX_STOP_TOKEN_IDS + 1))


def test_too_many_stop_strings():
    with pytest.raises(ValueError, match=f"stop has 17 sequences; at most {MAX_STOP_SEQUENCES}"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)])


def test_a_huge_stop_string_is_quoted_short():
    huge = "x" * 2**20
    with pytest.raises(ValueError) as info:
        SamplingParams(stop=("ok", huge))
    msg = str(info.value)
    assert len(msg) < 1024, len(msg)
    assert msg.startswith("stop='xxx") and f"({2**20} chars)" in msg and f"at most {MAX_STOP_LENGTH}" in msg


def test_a_huge_bad_number_is_quoted_short():
    with pytest.raises(ValueError) as info:
        SamplingParams(seed=10**5000)
    assert len(str(info.value)) < 1024 and "seed=<an integer of" in str(info.value)
