"""Per-tenant limits that depend on what else is running: concurrent requests and a tokens-per-minute bucket.

Refusals are `LimitExceeded` (RESOURCE_EXHAUSTED with a retry hint), not ValueError: the same request succeeds
later. Who the tenants are and their limits live in `service.tenants`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.tenants import Tenant

__all__ = ["Lease", "LimitExceeded", "TenantLimitExceeded", "TenantLimiter"]


class LimitExceeded(Exception):
    """A rate or concurrency limit refused a request for now; it may succeed after `retry_after_s`.

    Deliberately not a ValueError: the server answers RESOURCE_EXHAUSTED with a RetryInfo.
    """

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantLimitExceeded(LimitExceeded):
    def __init__(self, message: str, retry_after_s: float, *, tenant: str = "", limit: str = ""):
        super().__init__(message, retry_after_s)
        self.tenant, self.limit = tenant, limit


@dataclass
class _Usage:
    in_flight: int = 0
    level: float | None = None  # tokens left in the bucket (negative: over-charged); None: no bucket
    updated: float = 0.0


class Lease:
    """One admitted request: `charge` adds tokens to its tenant's bucket, `release` ends it (idempotent)."""

    def __init__(self, limiter: TenantLimiter | None, tenant_id: str, state: _Usage | None,
                 tokens_per_minute: int | None, tokens: int):
        self._limiter, self._state, self._tpm = limiter, state, tokens_per_minute
        self.tenant_id = tenant_id
        self.tokens = tokens  # charged so far
        self.released = False

    def charge(self, tokens: int) -> None:
        """Charge `tokens` more (e.g. generated output); may drive the bucket negative, which delays the
        tenant's next requests rather than failing this one."""
        _check_tokens(tokens)
        if self._limiter is None or self._state is None:
            self.tokens += tokens
            return
        with self._limiter._lock:
            self.tokens += tokens
            self._limiter._refill(self._state, self._tpm)
            if self._state.level is not None:
                self._state.level -= tokens

    def release(self) -> None:
        if self._limiter is None or self._state is None:
            self.released = True
            return
        with self._limiter._lock:
            if not self.released:
                self.released = True
                self._state.in_flight -= 1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_tokens(tokens: object) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r} is invalid: a token count is an integer >= 0")


class TenantLimiter:
    """Admits requests under each tenant's max_concurrent_requests and tokens_per_minute.

    The token bucket holds up to tokens_per_minute tokens and refills continuously at tokens_per_minute / 60
    per second. A request is admitted while the bucket is positive and is then charged its tokens, so one
    large request can overdraw it; the tenant waits until the debt is repaid. Limits are read from the
    Tenant at each call, so a reloaded tenants file takes effect at once; state is kept per tenant id.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, concurrency_retry_s: float = 1.0):
        self._clock = clock
        self._concurrency_retry_s = concurrency_retry_s  # hint only: when a request ends is unknown
        self._lock = threading.Lock()
        self._states: dict[str, _Usage] = {}

    def acquire(self, tenant: Tenant, tokens: int) -> Lease:
        """Admit one request of `tokens` (prompt) tokens or raise TenantLimitExceeded."""
        return self.acquire_many(tenant, 1, tokens)[0]

    def acquire_many(self, tenant: Tenant, n: int, tokens: int = 0) -> list[Lease]:
        """Admit `n` requests of one call together (all or none: each counts against max_concurrent_requests, and
        the bucket's level is checked once, as for one request), each charged `tokens`; or raise
        TenantLimitExceeded."""
        _check_tokens(tokens)
        if n < 1:
            raise ValueError(f"n={n} is invalid: at least one request is admitted")
        cmax, tpm = tenant.limits.max_concurrent_requests, tenant.limits.tokens_per_minute
        if cmax is None and tpm is None:
            return [Lease(None, tenant.id, None, None, tokens) for _ in range(n)]
        with self._lock:
            state = self._states.get(tenant.id)
            if state is None:
                state = self._states[tenant.id] = _Usage(updated=self._clock())
            self._refill(state, tpm)
            if cmax is not None and state.in_flight + n > cmax:
                asked = "" if n == 1 else f" and this call asks for {n}"
                raise TenantLimitExceeded(
                    f"tenant {tenant.id!r} has {state.in_flight} requests in flight{asked}, its limit "
                    f"(max_concurrent_requests={cmax}); retry after {self._concurrency_retry_s:g} s or when "
                    f"{'one of them has' if n == 1 else 'they have'} finished", self._concurrency_retry_s,
                    tenant=tenant.id, limit="max_concurrent_requests")
            if tpm is not None and state.level is not None and state.level <= 0:
                # Wait until the bucket holds one token again (positive, so the request is admitted).
                retry = (1.0 - state.level) * 60.0 / tpm
                raise TenantLimitExceeded(
                    f"tenant {tenant.id!r} has used up its tokens_per_minute={tpm} limit "
                    f"({math.ceil(-state.level)} tokens over); retry after {retry:.1f} s", retry,
                    tenant=tenant.id, limit="tokens_per_minute")
            state.in_flight += n
            if state.level is not None:
                state.level -= n * tokens
            return [Lease(self, tenant.id, state, tpm, tokens) for _ in range(n)]

    def in_flight(self, tenant_id: str) -> int:
        with self._lock:
            state = self._states.get(tenant_id)
            return state.in_flight if state else 0

    def tokens_available(self, tenant: Tenant) -> float | None:
        """The bucket level now (negative when overdrawn); None if the tenant has no tokens_per_minute."""
        with self._lock:
            tpm = tenant.limits.tokens_per_minute
            state = self._states.get(tenant.id)
            if state is None:
                return None if tpm is None else float(tpm)
            self._refill(state, tpm)
            return state.level

    def _refill(self, state: _Usage, tpm: int | None) -> None:
        # Caller holds self._lock.
        now = self._clock()
        if tpm is None:
            state.level = None
        elif state.level is None:
            state.level = float(tpm)  # a new bucket (or a limit just added) starts full
        else:
            state.level = min(float(tpm), state.level + max(0.0, now - state.updated) * tpm / 60.0)
        state.updated = now
