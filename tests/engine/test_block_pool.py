"""Block pool: states, LRU eviction order, prefix matching, extra-key isolation, hashing."""

from __future__ import annotations

import pytest

from service.engine.block_hash import hash_block_tokens
from service.engine.block_pool import NO_MATCH, BlockPool, FreeBlockQueue, KVBlock


def chain(tokens: list[int], block_size: int, extra_key: str | None = None) -> list[bytes]:
    hashes: list[bytes] = []
    for i in range(len(tokens) // block_size):
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * block_size:(i + 1) * block_size], extra_key))
    return hashes


def test_hash_is_stable_chained_and_keyed():
    h = hash_block_tokens(None, [1, 2, 3, 4], None)
    assert h == hash_block_tokens(None, [1, 2, 3, 4], None)
    assert len(h) == 16
    # fixed bytes: the same in every process (no salted hash(), no pickle)
    assert h.hex() == hash_block_tokens(None, [1, 2, 3, 4], None).hex()
    assert h != hash_block_tokens(h, [1, 2, 3, 4], None)  # the parent matters
    assert h != hash_block_tokens(None, [1, 2, 3, 4], "v1")
    assert hash_block_tokens(None, [1, 2], "") != hash_block_tokens(None, [1, 2], None)
    assert hash_block_tokens(None, [1, 2], "v1") != hash_block_tokens(None, [1, 2], "v2")
    assert hash_block_tokens(None, [256, 0], None) != hash_block_tokens(None, [1, 0], None)


def test_hash_matches_known_digest_across_processes():
    import subprocess
    import sys

    code = "from service.engine.block_hash import hash_block_tokens as h; print(h(None, [5, 6], 'k').hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hash_block_tokens(None, [5, 6], "k").hex()


def test_free_queue_unlinks_from_the_middle():
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    q.remove(blocks[0])
    assert [b.block_id for b in q] == [1, 3, 4]
    q.append(blocks[2])
    q.appendleft(blocks[0])
    assert [b.block_id for b in q] == [0, 1, 3, 4, 2]
    assert q.popleft() is blocks[0] and q.num_blocks == 4
    with pytest.raises(AssertionError):
        q.append(blocks[1])  # already linked


def test_states_and_counters():
    pool = BlockPool(8, 4)
    ids = pool.allocate(NO_MATCH, 3)
    assert ids == [0, 1, 2]
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (5, 0, 3)
    assert pool.usage == 3 / 8
    hashes = chain(list(range(8)), 4)
    pool.cache_blocks(ids, hashes, 0, 2)
    pool.check_integrity()
    pool.free(ids)
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (6, 2, 0)
    pool.check_integrity()
    assert pool.allocate(NO_MATCH, 9) is None  # all or nothing
    pool.check_integrity()


def test_free_order_evicts_tail_blocks_first_and_unhashed_before_all():
    pool = BlockPool(6, 2)
    a = pool.allocate(NO_MATCH, 3)  # blocks 0 1 2, all hashed
    pool.cache_blocks(a, chain([1, 2, 3, 4, 5, 6], 2), 0, 3)
    b = pool.allocate(NO_MATCH, 1)  # block 3, unhashed
    pool.free(a)
    pool.free(b)
    # LRU list: [3 (unhashed, to the head), 4, 5 (never used), 2, 1, 0 (a's, freed tail first)]
    assert pool.allocate(NO_MATCH, 4) == [3, 4, 5, 2]
    # block 2 (the deepest of a's prefix) was evicted; the first two blocks are still cached
    m = pool.match_prefix(chain([1, 2, 3, 4, 5, 6], 2), 3)
    assert m.block_ids == (0, 1) and m.num_tokens == 4
    pool.check_integrity()


def test_prefix_revival_shares_blocks_and_counts_evictable():
    pool = BlockPool(8, 4)
    toks = list(range(12))
    hashes = chain(toks, 4)
    a = pool.allocate(NO_MATCH, 3)
    pool.cache_blocks(a, hashes, 0, 3)
    m = pool.match_prefix(hashes, 2)  # capped
    assert m.block_ids == tuple(a[:2]) and m.num_evictable == 0
    b = pool.allocate(m, 1)
    assert b[:2] == a[:2] and pool.ref_count(a[0]) == 2
    pool.free(a)
    assert pool.ref_count(a[0]) == 1 and pool.num_cached == 1  # a[2] cached, a[0..1] still used by b
    pool.free(b)
    m2 = pool.match_prefix(hashes, 3)
    assert m2.num_evictable == 3
    c = pool.allocate(m2, 0)
    assert c == a and pool.num_cached == 0
    pool.check_integrity()


def test_extra_keys_never_share_blocks():
    pool = BlockPool(8, 2)
    toks = [7, 7, 7, 7]
    for key in (None, "v1"):
        ids = pool.allocate(NO_MATCH, 2)
        pool.cache_blocks(ids, chain(toks, 2, key), 0, 2)
        pool.free(ids)
    base = pool.match_prefix(chain(toks, 2, None), 2)
    v1 = pool.match_prefix(chain(toks, 2, "v1"), 2)
    assert base.num_tokens == v1.num_tokens == 4
    assert not set(base.block_ids) & set(v1.block_ids)
    assert pool.match_prefix(chain(toks, 2, "v2"), 2) is NO_MATCH


def test_duplicate_content_keeps_first_copy():
    pool = BlockPool(4, 2)
    h = chain([1, 2], 2)
    a = pool.allocate(NO_MATCH, 1)
    b = pool.allocate(NO_MATCH, 1)
    pool.cache_blocks(a, h, 0, 1)
    pool.cache_blocks(b, h, 0, 1)  # same content computed twice in one step
    pool.free(b)
    pool.free(a)
    assert pool.num_cached == 1 and pool.match_prefix(h, 1).block_ids == tuple(a)
    pool.check_integrity()


def test_reset_prefix_cache_forgets_only_free_blocks():
    pool = BlockPool(4, 2)
    h = chain([1, 2, 3, 4], 2)
    a = pool.allocate(NO_MATCH, 2)
    pool.cache_blocks(a, h, 0, 2)
    pool.free(a[1:])  # a[0] stays in use
    assert pool.reset_prefix_cache() == 1
    assert pool.match_prefix(h, 2).num_tokens == 2
    pool.check_integrity()


def test_bad_sizes_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
