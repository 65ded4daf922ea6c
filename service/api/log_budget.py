"""A rate bound for log lines that clients cause (refusals of bad input, cancelled streams, failures).

Each refused call is worth a line, but a client that sends garbage in a loop must not be able to fill the disk
or drown everything else: a token bucket lets `rate_per_s` lines a second through on average, in bursts of
`burst`; lines over the budget are dropped and counted, and one summary line per `summary_s` window says how
many were dropped and of which kinds ("suppressed K similar refusals").
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any


class LogBudget:
    def __init__(self, logger: Any, summary_event: str, what: str, *, rate_per_s: float, burst: int,
                 summary_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1 or summary_s <= 0:
            raise ValueError(f"a log budget needs rate_per_s > 0, burst >= 1 and summary_s > 0, not "
                             f"{rate_per_s}, {burst}, {summary_s}")
        self.logger, self.summary_event, self.what = logger, summary_event, what
        self.rate_per_s, self.burst, self.summary_s = rate_per_s, burst, summary_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._refilled = clock()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._timer: threading.Timer | None = None
        self._closed = False

    def emit(self, level: str, event: str, kind: str, **fields: Any) -> bool:
        """Log `event` at `level` if the budget allows; else count it under `kind` (e.g. the status code) for
        the next summary. True when it was logged."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate_per_s)
            self._refilled = now
            allowed = self._tokens >= 1
            if allowed:
                self._tokens -= 1
            else:
                self._dropped[kind] += 1
                if self._timer is None and not self._closed:
                    self._timer = threading.Timer(self.summary_s, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
        if allowed:
            getattr(self.logger, level)(event, **fields)
        return allowed

    def flush(self) -> int:
        """Log the summary of what was dropped since the last one (if anything was); how many that was."""
        with self._lock:
            dropped, self._dropped = self._dropped, collections.Counter()
            self._timer = None
        total = sum(dropped.values())
        if total:
            self.logger.warning(self.summary_event, message=f"suppressed {total} similar {self.what}",
                                count=total, kinds=dict(dropped.most_common()), max_per_s=self.rate_per_s)
        return total

    def close(self) -> None:
        """Cancel the pending summary and log it now."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self.flush()
