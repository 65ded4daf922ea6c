"""The KV block pool with prefix caching (torch-free).

The KV arena is one preallocated tensor owned by the model runner; this pool only hands out block
indices into it. A block is in exactly one state:

- in use:  ref_cnt > 0 (shared by every running request whose block table holds it);
- cached:  ref_cnt == 0 and it has a hash: its KV is still valid and a later request with the same
           prefix can revive it;
- free:    ref_cnt == 0 and no hash.

Cached and free blocks both sit in one intrusive LRU list; allocation takes the head and evicts its
hash. Reviving a cached block unlinks it from the middle of that list in O(1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from service.engine.block_hash import BlockHash


class KVBlock:
    """Bookkeeping of one block index; `prev`/`next` link it into the free list while ref_cnt == 0."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev: KVBlock | None = None
        self.next: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly-linked list of ref-0 blocks threaded through the blocks themselves.

    Head = least recently freed = next to be evicted. Two sentinels remove every edge case from
    push/pop/unlink, so each is a handful of pointer writes.
    """

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self.num_blocks = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVBlock:
        block = self._head.next
        if block is self._tail:
            raise IndexError("pop from an empty free block queue")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        """Unlink a block from anywhere in the list (a cached block being revived)."""
        prev, nxt = block.prev, block.next
        assert prev is not None and nxt is not None, f"{block} is not in the free list"
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self.num_blocks -= 1

    def append(self, block: KVBlock) -> None:
        self._link_before(block, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        assert self._head.next is not None
        self._link_before(block, self._head.next)

    def _link_before(self, block: KVBlock, at: KVBlock) -> None:
        assert block.prev is None and block.next is None, f"{block} is already in the free list"
        prev = at.prev
        assert prev is not None
        block.prev, block.next = prev, at
        prev.next = block
        at.prev = block
        self.num_blocks += 1

    def __iter__(self) -> Iterator[KVBlock]:
        b = self._head.next
        while b is not self._tail:
            assert b is not None
            yield b
            b = b.next


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a request: these block ids hold its first `num_tokens` tokens."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0
    num_evictable: int = 0  # how many of them have ref 0: reviving them takes them off the free list


NO_MATCH = PrefixMatch()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: the KV cache needs at least one block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self._blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._num_hashed_free = 0  # ref-0 blocks that still hold a hash ("cached")
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- counters -------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free plus cached (evictable)."""
        return self._free.num_blocks

    @property
    def num_cached(self) -> int:
        return self._num_hashed_free

    @property
    def num_free(self) -> int:
        return self._free.num_blocks - self._num_hashed_free

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self._free.num_blocks

    @property
    def usage(self) -> float:
        return self.num_in_use / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    # ---- prefix cache ---------------------------------------------------------------------
    def match_prefix(self, block_hashes: Sequence[BlockHash], max_blocks: int) -> PrefixMatch:
        """Longest run of leading hashes that are cached, at most `max_blocks`. Touches nothing."""
        ids: list[int] = []
        evictable = 0
        for h in block_hashes[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            ids.append(block.block_id)
            evictable += block.ref_cnt == 0
        if not ids:
            return NO_MATCH
        return PrefixMatch(tuple(ids), len(ids) * self.block_size, evictable)

    def record_prefix_query(self, num_queried: int, num_hit: int) -> None:
        self.prefix_queried_tokens += num_queried
        self.prefix_hit_tokens += num_hit

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash], start: int, end: int) -> None:
        """Register blocks [start, end) of a block table, now full and computed, under their hashes."""
        for i in range(start, end):
            block = self._blocks[block_ids[i]]
            if block.block_hash is not None:
                continue  # a revived prefix block: already registered
            h = block_hashes[i]
            if h in self._cached:
                # Two requests computed the same content in the same step; keep the first copy.
                # This one stays unhashed and is simply freed (first in line for reuse).
                continue
            block.block_hash = h
            self._cached[h] = block

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, prefix: PrefixMatch, num_new: int) -> list[int] | None:
        """Take the prefix blocks (ref + 1) and `num_new` fresh ones, or nothing if they do not fit."""
        if num_new + prefix.num_evictable > self._free.num_blocks:
            return None
        ids = list(prefix.block_ids)
        for bid in ids:
            self._acquire(self._blocks[bid])
        ids.extend(self._pop_free(num_new))
        return ids

    def allocate_new(self, num_new: int) -> list[int] | None:
        """Fresh blocks to extend a running request's table, or None if the pool cannot supply them."""
        if num_new > self._free.num_blocks:
            return None
        return self._pop_free(num_new)

    def free(self, block_ids: Sequence[int]) -> None:
        """Release one request's table. Walked from the tail so a prompt's deepest blocks, the least
        likely to be shared, are evicted first; unhashed blocks hold nothing and go to the head."""
        for bid in reversed(block_ids):
            block = self._blocks[bid]
            assert block.ref_cnt > 0, f"double free of block {bid}"
            block.ref_cnt -= 1
            if block.ref_cnt:
                continue
            if block.block_hash is None:
                self._free.appendleft(block)
            else:
                self._free.append(block)
                self._num_hashed_free += 1

    def _acquire(self, block: KVBlock) -> None:
        if block.ref_cnt == 0:
            self._free.remove(block)
            self._num_hashed_free -= block.block_hash is not None
        block.ref_cnt += 1

    def _pop_free(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            block = self._free.popleft()
            if block.block_hash is not None:
                # Evict: the block is about to be overwritten, so its old content must not be found.
                del self._cached[block.block_hash]
                block.block_hash = None
                self._num_hashed_free -= 1
            block.ref_cnt = 1
            out.append(block.block_id)
        return out

    def reset_prefix_cache(self) -> int:
        """Forget every cached (ref-0) block; in-use blocks keep their hashes. Returns how many."""
        n = 0
        for block in self._free:
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                n += 1
        self._num_hashed_free -= n
        return n

    # ---- integrity ------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError unless every block is in exactly one consistent state."""
        in_free = set()
        for block in self._free:
            assert block.block_id not in in_free, f"{block} is twice in the free list"
            assert block.ref_cnt == 0, f"{block} is in the free list with a reference"
            in_free.add(block.block_id)
        assert len(in_free) == self._free.num_blocks, "free list length counter is wrong"
        free = cached = in_use = 0
        for block in self._blocks:
            if block.ref_cnt < 0:
                raise AssertionError(f"{block} has a negative ref count")
            if block.ref_cnt == 0:
                assert block.block_id in in_free, f"{block} has ref 0 but is not in the free list"
            else:
                assert block.block_id not in in_free, f"{block} is in use and in the free list"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"{block} is hashed but not in the map"
            if block.ref_cnt:
                in_use += 1
            elif block.block_hash is None:
                free += 1
            else:
                cached += 1
        assert len(self._cached) == sum(b.block_hash is not None for b in self._blocks), "stale hash map entry"
        assert cached == self._num_hashed_free, f"cached counter {self._num_hashed_free} != {cached}"
        assert free + cached + in_use == self.num_blocks, "blocks lost"
        assert (free, cached, in_use) == (self.num_free, self.num_cached, self.num_in_use)
