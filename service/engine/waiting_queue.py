"""The waiting queue: priority, then arrival; preempted requests go to the front (torch-free)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from service.engine.request import Request


class QueueEntry:
    """A heap slot. Removal marks it dead instead of searching the heap (lazy deletion)."""

    __slots__ = ("priority", "seq", "request")

    def __init__(self, priority: int, seq: int, request: Request) -> None:
        self.priority = priority
        self.seq = seq
        self.request: Request | None = request

    def __lt__(self, other: QueueEntry) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class WaitingQueue:
    """Min-heap on (priority, seq). New requests take increasing seqs (FCFS within a priority);
    preempted ones take decreasing negative seqs, i.e. the front of their priority class, the most
    recently preempted first (it arrived earliest: victims are taken latest-arrival first)."""

    def __init__(self) -> None:
        self._heap: list[QueueEntry] = []
        self._live: dict[str, QueueEntry] = {}
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

    def peek(self) -> QueueEntry | None:
        heap = self._heap
        while heap and heap[0].request is None:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def pop(self) -> QueueEntry:
        entry = self.peek()
        if entry is None:
            raise IndexError("pop from an empty waiting queue")
        heapq.heappop(self._heap)
        assert entry.request is not None
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
        heapq.heappush(self._heap, entry)
