"""The waiting queue: priority, then the tenants' fair-share order, then arrival (torch-free).

Each tenant has its own heap on (priority, seq); `peek` takes, among the tenants' heads, the smallest
(priority, tenant key, seq). The tenant key comes from the fair-share policy (`fairness.FairShare.key`: the
tenant's service counter, then its requests in, under `vtc`; a constant under `fcfs`, which leaves plain
priority-then-arrival order). Preempted requests go to the front of their tenant's queue within their priority class.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Iterator

from service.engine.fairness import TenantKey
from service.engine.request import Request


class QueueEntry:
    """A heap slot. Removal marks it dead instead of searching the heap (lazy deletion)."""

    __slots__ = ("priority", "seq", "request", "tenant")

    def __init__(self, priority: int, seq: int, request: Request) -> None:
        self.priority = priority
        self.seq = seq
        self.request: Request | None = request
        self.tenant = request.tenant

    def __lt__(self, other: QueueEntry) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


def _no_key(tenant: str) -> TenantKey:
    return (0.0, 0)


class WaitingQueue:
    """Per-tenant min-heaps on (priority, seq). New requests take increasing seqs (arrival order within a
    tenant and priority); preempted ones take decreasing negative seqs, i.e. the front of their priority
    class, the most recently preempted first (it arrived earliest: victims are taken latest-arrival first).
    Picking among tenants costs one look at each tenant's head: tenants are few next to requests."""

    def __init__(self, tenant_key: Callable[[str], TenantKey] = _no_key) -> None:
        self._heaps: dict[str, list[QueueEntry]] = {}
        self._live: dict[str, QueueEntry] = {}
        self._tenant_key = tenant_key
        self._back_seq = 0
        self._front_seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._live

    def __iter__(self) -> Iterator[Request]:
        """Live requests, in no particular order (for metrics)."""
        for entry in self._live.values():
            assert entry.request is not None
            yield entry.request

    def push(self, request: Request) -> None:
        self._back_seq += 1
        self._push(QueueEntry(request.priority, self._back_seq, request))

    def push_front(self, request: Request) -> None:
        self._front_seq -= 1
        self._push(QueueEntry(request.priority, self._front_seq, request))

    def requeue(self, entry: QueueEntry) -> None:
        """Put back a popped entry at its old place (a request the admission policy skipped)."""
        self._push(entry)

    def peek(self, skip: Container[str] = ()) -> QueueEntry | None:
        """The next request, leaving out the tenants in `skip`."""
        best: QueueEntry | None = None
        best_key: tuple[int, TenantKey, int] | None = None
        empty = []
        key = self._tenant_key
        for tenant, heap in self._heaps.items():
            while heap and heap[0].request is None:
                heapq.heappop(heap)
            if not heap:
                empty.append(tenant)
                continue
            if tenant in skip:
                continue
            head = heap[0]
            k = (head.priority, key(tenant), head.seq)
            if best_key is None or k < best_key:
                best, best_key = head, k
        for tenant in empty:
            del self._heaps[tenant]
        return best

    def pop(self) -> QueueEntry:
        entry = self.peek()
        if entry is None:
            raise IndexError("pop from an empty waiting queue")
        return self.take(entry)

    def take(self, entry: QueueEntry) -> QueueEntry:
        """Remove the entry `peek` just returned (the head of its tenant's heap) without looking again."""
        heap = self._heaps[entry.tenant]
        assert heap[0] is entry and entry.request is not None, "take() is for the entry peek() returned"
        heapq.heappop(heap)
        del self._live[entry.request.request_id]
        return entry

    def remove(self, request: Request) -> bool:
        entry = self._live.pop(request.request_id, None)
        if entry is None:
            return False
        entry.request = None
        return True

    def _push(self, entry: QueueEntry) -> None:
        assert entry.request is not None
        assert entry.request.request_id not in self._live, f"{entry.request} is already waiting"
        self._live[entry.request.request_id] = entry
        heapq.heappush(self._heaps.setdefault(entry.tenant, []), entry)
