"""The error an adapter is refused with, and how a message quotes what the client sent.

A message that echoes client input must stay short: gRPC sends it in trailing metadata (16 KiB at most), and a
2 MiB string quoted whole turns INVALID_ARGUMENT into RESOURCE_EXHAUSTED "Stream removed" for the client.
"""

from __future__ import annotations

import reprlib

__all__ = ["AdapterError", "quote"]

QUOTE_LIMIT = 80
_ENTRIES = 4  # list entries or dict items a quote shows


class AdapterError(ValueError):
    """An adapter we refuse; the message names the offending feature, key, file or tensor."""


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for a message, cut after `limit` characters: `'xxx'... (2097152 chars)`,
    `['a', 'b', 'c', 'd', ...] (5000 entries)`.

    Never raises and never builds the whole repr of a large value: strings are cut before `repr`, containers
    go through reprlib (a few entries, a few levels), and an integer too large for `str` is described.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} chars)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        # str() of an int is quadratic and refused past 4300 digits; its size is all a reader needs.
        return f"<an integer of {value.bit_length()} bits>"
    short = reprlib.Repr()
    short.maxlevel = 2
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = short.maxfrozenset = _ENTRIES
    short.maxstring = short.maxother = short.maxlong = limit
    try:
        text = short.repr(value)
    except Exception:  # a hostile value's __repr__, or a huge int nested in a container
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + "..."
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > _ENTRIES:
        text += f" ({len(value)} entries)"
    return text
