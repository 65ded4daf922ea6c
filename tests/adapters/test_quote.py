"""quote() echoes client input into an error message: a bounded prefix, never the whole value."""

from __future__ import annotations

import math

import pytest

from adapters.errors import quote
from adapters.registry_types import AdapterRef, check_name, check_tenant
from adapters.store import check_version_id

MIB2 = "x" * (2 << 20)


@pytest.mark.parametrize("value, expected", [
    ("q_proj", "'q_proj'"),
    (4, "4"),
    (None, "None"),
    (True, "True"),
    (math.nan, "nan"),
    (["a", "b"], "['a', 'b']"),
    ({"q_proj": 8}, "{'q_proj': 8}"),
])
def test_small_values_are_their_repr(value, expected):
    assert quote(value) == expected


@pytest.mark.parametrize("value, tail", [
    (MIB2, "... (2097152 chars)"),
    ([MIB2] * 5000, "(5000 entries)"),
    (list(range(10)), "[0, 1, 2, 3, ...] (10 entries)"),
    ({MIB2: [[[MIB2]]]}, "..."),
    (10**400, "<an integer of 1329 bits>"),
    ([10**5000], "<list>"),  # repr() itself refuses an int of 5001 digits
    (b"\0" * (2 << 20), "'"),
])
def test_large_values_are_cut(value, tail):
    text = quote(value)
    assert len(text) < 200 and text.endswith(tail), text


def test_limit_and_prefix():
    assert quote("abcdef", 3) == "'abc'... (6 chars)"
    assert quote("abc", 3) == "'abc'"


@pytest.mark.parametrize("check", [check_name, check_tenant, AdapterRef.parse, check_version_id],
                         ids=lambda f: f.__qualname__)
def test_registry_messages_quote_a_bounded_prefix(check):
    with pytest.raises(ValueError) as info:
        check(MIB2)
    assert len(str(info.value)) < 300 and "... (2097152 chars)" in str(info.value)
