"""Host-memory tier of adapters: parsed adapters by version id, LRU-bounded by bytes and count.

store (files) -> HostAdapterCache (ParsedAdapter in host RAM) -> active slots on the device (runtime).

Loads run on a small thread pool, so the engine loop never waits on disk or parsing: it calls
`ensure_loading` and polls `status` (offline callers `wait`). One lock guards all state and is never held
while a loader runs. Which versions must stay in memory is not decided here: the cache asks its owner
(`adapters.lifecycle.AdapterVersions`) through `protected(version_id)` and never evicts those. A load that
does not fit (larger than the cache, or the room is held by protected adapters) fails with CacheFull instead
of exceeding the bounds, so `count <= max_count` and `nbytes <= max_bytes` hold at all times.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from adapters.identity import adapter_version_id
from adapters.peft_config import DEFAULT_MAX_RANK, BaseShapes
from adapters.peft_format import AdapterError, ParsedAdapter, parse_adapter
from adapters.store import Store, check_version_id
from kernels.threads import serial_thread

__all__ = ["AdapterLoadFailed", "CacheFull", "CacheStats", "HostAdapterCache", "LoaderFromStore", "Status",
           "StoredAdapterCorrupt"]

Status = Literal["ready", "loading", "failed", "absent"]
_MAX_FAILURES_KEPT = 1024  # remembered failures, oldest forgotten first: bad ids cannot grow memory


class CacheFull(RuntimeError):
    """A loaded adapter does not fit: larger than the cache, or (transient) its room is held by protected
    versions."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient  # room may free up when protected versions are let go: retry later


class AdapterLoadFailed(RuntimeError):
    """Raised by `wait` when the load failed; the loader's exception is its __cause__."""


class StoredAdapterCorrupt(RuntimeError):
    """The stored files no longer parse, or no longer hash to the version id they are stored under."""


@dataclass(frozen=True)
class CacheStats:
    count: int
    nbytes: int
    protected: int  # loaded versions the owner keeps in memory
    loading: int
    failed: int
    hits: int
    misses: int
    loads: int
    load_failures: int
    evictions: int
    load_seconds: tuple[float, ...]  # latency of the latest successful loads, oldest first


class HostAdapterCache:
    """ParsedAdapters by version id, loaded in the background by `loader(version_id)`."""

    def __init__(self, loader: Callable[[str], ParsedAdapter], max_bytes: int, max_count: int, workers: int = 1,
                 *, protected: Callable[[str], bool] | None = None, retry_failed_after_s: float = 5.0,
                 latency_samples: int = 1024) -> None:
        """`protected(version_id)`: True for a version that must not be evicted (called under this cache's
        lock, so it must never call back into the cache)."""
        if max_bytes <= 0 or max_count <= 0 or workers <= 0:
            raise ValueError(f"max_bytes, max_count and workers must be positive (got {max_bytes}, "
                             f"{max_count}, {workers})")
        self._loader = loader
        self.max_bytes, self.max_count = max_bytes, max_count
        # A failure is reported for this long before ensure_loading tries again: requests for a corrupt
        # adapter fail fast instead of each re-reading and re-parsing it.
        self._retry_after = retry_failed_after_s
        self._cond = threading.Condition(threading.Lock())
        self._ready: OrderedDict[str, tuple[ParsedAdapter, int]] = OrderedDict()  # least recently used first
        self._nbytes = 0
        self._loading: dict[str, object] = {}  # version id -> token of its load in flight
        self._failed: OrderedDict[str, tuple[BaseException, float]] = OrderedDict()  # -> (error, monotonic)
        self._protected = protected or (lambda version_id: False)
        self._load_seconds: deque[float] = deque(maxlen=latency_samples)
        self._hits = self._misses = self._loads = self._load_failures = self._evictions = 0
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load",
                                        initializer=serial_thread)

    # --- loading ------------------------------------------------------------------------------------------

    def ensure_loading(self, version_id: str) -> Status:
        """Start loading `version_id` unless it is ready or loading (one load per id at a time); a recent
        failure is reported as "failed" until `retry_failed_after_s` has passed. Returns the status."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the adapter cache is closed")
            if version_id in self._ready:
                return "ready"
            if version_id in self._loading:
                return "loading"
            failure = self._failed.get(version_id)
            if failure is not None and time.monotonic() - failure[1] < self._retry_after:
                return "failed"
            self._failed.pop(version_id, None)
            token = self._loading[version_id] = object()
            self._pool.submit(self._load, version_id, token)
            return "loading"

    def _load(self, version_id: str, token: object) -> None:
        start = time.perf_counter()
        adapter: ParsedAdapter | None = None
        error: BaseException | None = None
        try:
            adapter = self._loader(version_id)
            if not isinstance(getattr(adapter, "nbytes", None), int):
                raise TypeError(f"the adapter loader returned {type(adapter).__name__}, which has no nbytes size")
        except BaseException as e:  # the load's result, reported through status/error/wait: never stuck "loading"
            error = e
        elapsed = time.perf_counter() - start
        with self._cond:
            if self._loading.get(version_id) is not token:
                return  # discarded or closed while loading: drop the result
            del self._loading[version_id]
            if error is None:
                assert adapter is not None
                error = self._admit(version_id, adapter)
            if error is None:
                self._loads += 1
                self._load_seconds.append(elapsed)
            else:
                self._load_failures += 1
                self._failed[version_id] = (error, time.monotonic())
                while len(self._failed) > _MAX_FAILURES_KEPT:
                    self._failed.popitem(last=False)
            self._cond.notify_all()

    def _admit(self, version_id: str, adapter: ParsedAdapter) -> CacheFull | None:
        """Insert as most recently used and evict to fit; CacheFull (and nothing inserted) if it cannot."""
        size = adapter.nbytes
        if size > self.max_bytes:
            return CacheFull(f"adapter {version_id} takes {size} bytes in memory, more than the whole host "
                             f"adapter cache ({self.max_bytes} bytes)", transient=False)
        self._ready[version_id] = (adapter, size)
        self._nbytes += size
        self._evict(keep=version_id)
        if self._over_bounds():
            self._ready.pop(version_id)
            self._nbytes -= size
            pinned = [(a, s) for vid, (a, s) in self._ready.items() if self._protected(vid)]
            return CacheFull(f"no room for adapter {version_id} ({size} bytes): {len(pinned)} adapters in use "
                             f"hold {sum(s for _, s in pinned)} of {self.max_bytes} bytes and "
                             f"{len(pinned)} of {self.max_count} slots; retry when requests finish",
                             transient=True)
        return None

    def _over_bounds(self) -> bool:
        return len(self._ready) > self.max_count or self._nbytes > self.max_bytes

    def _evict(self, keep: str | None = None) -> None:
        """Evict least recently used, unprotected adapters until within bounds (or nothing is evictable)."""
        for vid in list(self._ready):
            if not self._over_bounds():
                return
            if vid == keep or self._protected(vid):
                continue
            _, size = self._ready.pop(vid)
            self._nbytes -= size
            self._evictions += 1

    # --- lookups ------------------------------------------------------------------------------------------

    def get(self, version_id: str) -> ParsedAdapter | None:
        """The loaded adapter (marked most recently used), or None; never starts a load."""
        with self._cond:
            entry = self._ready.get(version_id)
            if entry is None:
                self._misses += 1
                return None
            self._ready.move_to_end(version_id)
            self._hits += 1
            return entry[0]

    def status(self, version_id: str) -> Status:
        with self._cond:
            if version_id in self._ready:
                return "ready"
            if version_id in self._loading:
                return "loading"
            return "failed" if version_id in self._failed else "absent"

    def error(self, version_id: str) -> BaseException | None:
        """Why the latest load of `version_id` failed (str() is the message), or None."""
        with self._cond:
            failure = self._failed.get(version_id)
            return failure[0] if failure else None

    def wait(self, version_id: str, timeout: float | None = None) -> ParsedAdapter:
        """Block until `version_id` is loaded (for offline callers; the engine polls `status`).

        Raises AdapterLoadFailed, TimeoutError, or LookupError when it is neither loaded nor loading
        (call ensure_loading first; protect it if eviction could win the race against this wait).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if version_id in self._ready:
                    self._ready.move_to_end(version_id)
                    return self._ready[version_id][0]
                failure = self._failed.get(version_id)
                if failure is not None:
                    raise AdapterLoadFailed(f"loading adapter {version_id} failed: {failure[0]}") from failure[0]
                if version_id not in self._loading:
                    raise LookupError(f"adapter {version_id} is neither loaded nor loading")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"adapter {version_id} is still loading after {timeout} s")
                self._cond.wait(remaining)

    # --- removal ----------------------------------------------------------------------------------------

    def room_freed(self) -> None:
        """The owner let a version go: loads refused for lack of room are retried at once, not after the
        backoff."""
        with self._cond:
            for vid in [v for v, (e, _) in self._failed.items() if isinstance(e, CacheFull) and e.transient]:
                del self._failed[vid]

    def discard(self, version_id: str) -> bool:
        """Forget `version_id` (loaded copy, failure, a load in flight) unless protected; e.g. after deletion."""
        with self._cond:
            if self._protected(version_id):
                return False
            entry = self._ready.pop(version_id, None)
            if entry is not None:
                self._nbytes -= entry[1]
            loading = self._loading.pop(version_id, None)  # its result will be dropped
            failure = self._failed.pop(version_id, None)
            self._cond.notify_all()
            return entry is not None or loading is not None or failure is not None

    def stats(self) -> CacheStats:
        with self._cond:
            return CacheStats(
                count=len(self._ready), nbytes=self._nbytes, protected=sum(map(self._protected, self._ready)),
                loading=len(self._loading),
                failed=len(self._failed), hits=self._hits, misses=self._misses, loads=self._loads,
                load_failures=self._load_failures, evictions=self._evictions,
                load_seconds=tuple(self._load_seconds),
            )

    def close(self) -> None:
        """Stop loading: loads in flight finish but their results are dropped."""
        with self._cond:
            self._closed = True
            self._loading.clear()
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> HostAdapterCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoaderFromStore:
    """`loader` for HostAdapterCache: read the files from the store, parse, and check the content still
    hashes to the id it is stored under (a flipped bit or a swapped file fails loudly, never serves)."""

    def __init__(self, store: Store, arch: BaseShapes, base_model_id: str, *, max_rank: int = DEFAULT_MAX_RANK):
        self.store, self.arch, self.base_model_id, self.max_rank = store, arch, base_model_id, max_rank

    def __call__(self, version_id: str) -> ParsedAdapter:
        files = self.store.get(check_version_id(version_id))
        try:
            parsed = parse_adapter(files, self.arch, max_rank=self.max_rank)
        except AdapterError as e:
            raise StoredAdapterCorrupt(f"stored adapter {version_id} does not load: {e}") from e
        actual = adapter_version_id(parsed, self.base_model_id)
        if actual != version_id:
            raise StoredAdapterCorrupt(
                f"stored adapter {version_id} now hashes to {actual}: the stored files are corrupt or were "
                f"written for another base model than {self.base_model_id!r}; upload the adapter again")
        return parsed
