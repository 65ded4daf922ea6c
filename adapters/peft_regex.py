"""Regexes from an uploaded `adapter_config.json`, compiled under bounds on their size, their matching cost and
the time spent compiling them; whatever the regex parser or compiler raises becomes an AdapterError naming the
config key.

Python's `re` backtracks and holds the GIL: `(.*)*x` against a 32-character module name runs for hours, and
`(?:){4294967294}` loops four billion times on any name. Names are short, so matching stays cheap when no
repetition or alternation sits inside a repetition, there are few of them, and no repeat count is large.
Compiling is not free either: a 512-character regex of wide character classes (`[\\x00-\\U0010ffff]`) takes
~0.5 s, and a config may hold thousands of pattern keys, so one config gets `MAX_COMPILE_S` in all.
"""

from __future__ import annotations

import re
import time
from typing import Any

from adapters.errors import AdapterError

try:  # the stdlib regex parser, to bound the cost of regexes from uploaded configs
    from re import _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_REGEX_CHARS", "MAX_REPEAT_COUNT", "MAX_COMPILE_S", "RegexBudget", "compile_bounded"]

MAX_REGEX_CHARS = 512
MAX_CHOICES = 5  # repetitions/alternations in one regex: 5 `.*` over ~400 names match in ~1 s
MAX_REPEAT_COUNT = 256  # `{m,n}` bounds: longer than any module name, so a larger count never helps
MAX_COMPILE_S = 2.0
_REASON_CHARS = 200  # of the parser's own message: it may quote part of the pattern
_REPEAT_OPS = tuple(getattr(_sre_parse, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                    if hasattr(_sre_parse, op))
_UNBOUNDED = _sre_parse.MAXREPEAT  # the upper bound of `*`, `+` and `{m,}`; a count the user cannot write


class RegexBudget:
    """The compile time all the regexes of one config may take together (parsing included)."""

    def __init__(self, max_s: float | None = None) -> None:
        self.max_s = MAX_COMPILE_S if max_s is None else max_s
        self.spent_s = 0.0

    def spend(self, where: str, seconds: float) -> None:
        self.spent_s += seconds
        if self.spent_s > self.max_s:
            raise AdapterError(f"adapter_config.json: {where}: compiling the regular expressions of this config "
                               f"took more than {self.max_s:g} s; use fewer or simpler patterns")


def compile_bounded(
    where: str, pattern: str, budget: RegexBudget, *, max_choices: int = MAX_CHOICES, wrapper_choices: int = 0
) -> tuple[re.Pattern[str], int]:
    """Compile a regex from the (untrusted, uploaded) config with bounded compiling and matching cost.

    `where` names the config key in messages (bounded: see adapters.errors.quote). `wrapper_choices` are the
    choice points of peft's own wrapping around the user's text. Returns the regex and the number of choice
    points of the user's text.
    """
    if len(pattern) > MAX_REGEX_CHARS:
        raise AdapterError(f"adapter_config.json: {where} is longer than {MAX_REGEX_CHARS} characters")
    t0 = time.perf_counter()
    try:
        parsed = _sre_parse.parse(pattern)
        choices = _choice_points(parsed, inside_repeat=False, where=where) - wrapper_choices
        if choices > max_choices:
            raise AdapterError(f"adapter_config.json: {where} has {choices} repetitions/alternations; at most "
                               f"{max_choices} are allowed (bounded regex matching cost)")
        regex = re.compile(pattern)
    except AdapterError:
        raise
    except Exception as e:  # re.error, OverflowError (counts >= 2**32), RecursionError, ...: all refusals
        raise AdapterError(f"adapter_config.json: {where} is not a valid regular expression: {_reason(e)}") from None
    finally:
        budget.spend(where, time.perf_counter() - t0)
    return regex, choices


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, RecursionError):
        text = "it nests too deeply"
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def _choice_points(sub: Any, *, inside_repeat: bool, where: str) -> int:
    """Repetitions and alternations in a parsed regex; refuse them nested in a repetition (exponential), and
    repeat counts above MAX_REPEAT_COUNT (linear in the count, which may be four billion)."""
    n = 0
    for op, av in sub:
        is_repeat = op in _REPEAT_OPS
        if (is_repeat or op is _sre_parse.BRANCH) and inside_repeat:
            raise AdapterError(f"adapter_config.json: {where} nests a repetition or alternation inside a "
                               "repetition, which can take exponential time to match")
        if is_repeat:
            lo, hi, body = av
            count = max(lo, 0 if hi == _UNBOUNDED else hi)
            if count > MAX_REPEAT_COUNT:
                raise AdapterError(f"adapter_config.json: {where} repeats a part {count} times; a repeat count "
                                   f"must be from 0 to {MAX_REPEAT_COUNT}")
            n += lo != hi
            n += _choice_points(body, inside_repeat=hi > 1, where=where)
            continue
        n += op is _sre_parse.BRANCH
        stack = [av]
        while stack:  # operands nest SubPatterns inside tuples/lists (groups, branches, lookarounds)
            item = stack.pop()
            if isinstance(item, _sre_parse.SubPattern):
                n += _choice_points(item, inside_repeat=inside_repeat, where=where)
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    return n
