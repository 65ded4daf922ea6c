"""Fair sharing between tenants: the Virtual Token Counter (torch-free).

The scheduling policy follows Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024).
Each tenant has a counter of the service it has received: prompt tokens the engine computed for it
(`input_token_weight` each) and tokens it generated (`output_token_weight` each), divided by the tenant's
`weight`. Under the `vtc` policy the scheduler admits, among the waiting requests of the best priority
class, the head request of the tenant with the smallest counter; so backlogged tenants receive service in
proportion to their weights, whatever the shapes and rates of their requests.

Rules that keep it fair over time:
- no banked credit: a tenant that comes back from idle starts at the smallest counter among the active
  tenants (those with requests waiting or running), or, when nobody is active, at the counter of the last
  tenant to go idle; so idling never buys a burst at everyone else's expense;
- tokens served from the prefix cache are not charged (the engine computed nothing for them), and a
  preempted request's recomputation is not charged twice (the preemption was the server's choice);
- preemption victims come from the tenant furthest ahead (largest counter) within the lowest priority;
- at equal counters (a tenant back from idle starts level with the tenant furthest behind) the tenant with fewer
  requests in goes first: the one that is not backlogged.

Under `fcfs` the counters are kept for visibility but do not order anything: priority, then arrival.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from service.config import SCHEDULING_POLICIES

TenantKey = tuple[float, int]


@dataclass(frozen=True)
class TenantShare:
    """Where one tenant stands: its weight, counter (weighted service per unit of weight), and its requests
    in the scheduler (waiting or running)."""

    tenant: str
    weight: float
    service: float
    requests: int


class FairShare:
    """Per-tenant service counters and the order they give the scheduler.

    `weight_of(tenant)` is asked when a tenant is charged (a tenant unknown to it has weight 1); the
    scheduler calls `arrive`/`leave` once per request that enters/leaves it and `charge` for the tokens
    each step computes or samples. Only the engine thread writes; `shares()` may be read from any thread.
    """

    def __init__(self, policy: str = "vtc", weight_of: Callable[[str], float] | None = None,
                 input_token_weight: float = 1.0, output_token_weight: float = 2.0) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy {policy!r} is invalid: use one of {', '.join(SCHEDULING_POLICIES)}")
        for name, w in (("input_token_weight", input_token_weight), ("output_token_weight", output_token_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"{name}={w!r} is invalid: must be a number >= 0")
        self.policy = policy
        self.fair = policy == "vtc"
        self.weight_of = weight_of or (lambda tenant: 1.0)
        self.input_token_weight = float(input_token_weight)
        self.output_token_weight = float(output_token_weight)
        self._counters: dict[str, float] = {}
        self._active: dict[str, int] = {}  # tenant -> its requests in the scheduler (waiting or running)
        self._idle_floor = 0.0  # where a tenant returning to an empty scheduler starts

    # ---- what the scheduler reads --------------------------------------------------------
    def key(self, tenant: str) -> TenantKey:
        """Admission order among tenants within a priority class: smaller goes first. The counter, then, at equal
        counters (a tenant back from idle starts level with the tenant furthest behind), the tenant with fewer
        requests in: the one that is not backlogged."""
        if not self.fair:
            return (0.0, 0)
        return (self._counters.get(tenant, 0.0), self._active.get(tenant, 0))

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    # ---- bookkeeping ---------------------------------------------------------------------
    def arrive(self, tenant: str) -> None:
        """A request of `tenant` entered the scheduler. A tenant that was idle is lifted to the floor."""
        n = self._active.get(tenant, 0)
        if n == 0:
            others = [self._counters.get(t, 0.0) for t in self._active]
            floor = min(others) if others else self._idle_floor
            if self._counters.get(tenant, 0.0) < floor:
                self._counters[tenant] = floor
        self._active[tenant] = n + 1

    def leave(self, tenant: str) -> None:
        """A request of `tenant` left the scheduler (finished, failed or aborted)."""
        n = self._active.get(tenant, 0)
        assert n > 0, f"tenant {tenant!r} has no request in the scheduler"
        if n > 1:
            self._active[tenant] = n - 1
            return
        del self._active[tenant]
        if not self._active:
            self._idle_floor = max(self._idle_floor, self._counters.get(tenant, 0.0))

    def charge(self, tenant: str, input_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.input_token_weight * input_tokens + self.output_token_weight * output_tokens
        if cost:
            weight = self.weight_of(tenant)
            self._counters[tenant] = self._counters.get(tenant, 0.0) + cost / weight

    def forget_idle(self) -> None:
        """Forget the service of every tenant with no request in (e.g. the server's own warm-up request)."""
        self._counters = {t: c for t, c in self._counters.items() if t in self._active}
        self._idle_floor = 0.0

    # ---- visibility ----------------------------------------------------------------------
    def num_active_tenants(self) -> int:
        """Tenants with requests in the scheduler (waiting or running)."""
        return len(self._active)

    def active_tenants(self) -> dict[str, int]:
        """Each tenant's requests in the scheduler (waiting or running)."""
        return self._active.copy()

    def shares(self, also: Iterable[str] = ()) -> list[TenantShare]:
        """Every tenant with a counter or requests, and the tenants in `also`, sorted by tenant id. Safe from
        any thread: each dict is copied at once."""
        counters = self._counters.copy()
        active = self._active.copy()
        return [TenantShare(t, float(self.weight_of(t)), counters.get(t, 0.0), active.get(t, 0))
                for t in sorted(set(counters) | set(active) | set(also))]
