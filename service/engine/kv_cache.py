"""Block tables of requests on top of the block pool, with or without prefix caching (torch-free).

The scheduler speaks in requests and token counts; this layer turns them into block counts, keeps
each request's `block_ids` / `num_computed_tokens` / `num_registered_blocks` consistent with the
pool, and is the only place that knows whether prefix caching is on (chosen once, by class).
"""

from __future__ import annotations

from service.engine.block_pool import NO_MATCH, BlockPool, PrefixMatch
from service.engine.request import Request


class KVCacheManager:
    """Block tables without prefix caching: every admission starts from zero computed tokens."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size

    @staticmethod
    def create(pool: BlockPool, enable_prefix_caching: bool) -> KVCacheManager:
        return PrefixCachingKVCacheManager(pool) if enable_prefix_caching else KVCacheManager(pool)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, request: Request) -> PrefixMatch:
        """Cached blocks a (re-)admitted request can start from."""
        return NO_MATCH

    def admit(self, request: Request, prefix: PrefixMatch, num_new_tokens: int) -> bool:
        """Give a waiting request the prefix blocks plus room for its first chunk; False if it does
        not fit (nothing changes then)."""
        need = self.num_blocks_for(prefix.num_tokens + num_new_tokens) - len(prefix.block_ids)
        ids = self.pool.allocate(prefix, need)
        if ids is None:
            return False
        request.block_ids = ids
        request.num_computed_tokens = prefix.num_tokens
        request.num_registered_blocks = len(prefix.block_ids)
        self.pool.record_prefix_query(request.num_tokens, prefix.num_tokens)
        return True

    def grow(self, request: Request, num_new_tokens: int, evict: bool = True) -> bool:
        """Make room for `num_new_tokens` more computed positions; False if the pool is short. `evict=False`
        (draft positions): only from blocks that cache nothing, never evicting a cached prefix."""
        need = self.num_blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if not evict and need > self.pool.num_free:
            return False
        ids = self.pool.allocate_new(need)
        if ids is None:
            return False
        request.block_ids.extend(ids)
        return True

    def on_computed(self, request: Request) -> None:
        """Called after `request.num_computed_tokens` advanced."""

    def trim(self, request: Request) -> None:
        """Return the blocks past those its tokens need (grown for drafts a verify pass rejected). They hold no
        computed position, so they were never hashed, and go back to the pool as free blocks."""
        keep = self.num_blocks_for(request.num_tokens)
        extra = request.block_ids[keep:]
        if extra:
            self.pool.free(extra)
            del request.block_ids[keep:]

    def hashes_in_flight(self, request: Request, end: int) -> list:
        """Hashes of the blocks this step fills for `request` (computing positions up to `end`)."""
        return []

    def next_uncached_hash(self, request: Request, prefix: PrefixMatch) -> object | None:
        """Hash of the first full block past the cached prefix (None if there is none)."""
        return None

    def free(self, request: Request) -> None:
        """Return every block of the request; hashed ones stay cached for whoever comes next."""
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_registered_blocks = 0


class PrefixCachingKVCacheManager(KVCacheManager):
    def match(self, request: Request) -> PrefixMatch:
        request.update_block_hashes(self.block_size)
        # The last token is always computed, even on a full hit: its logits give the next token.
        most = (request.num_tokens - 1) // self.block_size
        have = len(request.prompt_logprobs)  # filled only with sampling.prompt_logprobs
        if have < request.num_prompt_tokens - 1 and request.sampling.prompt_logprobs is not None:
            # positions whose prompt logprobs it still needs are computed, cached or not (a hit skips their logits)
            most = min(most, have // self.block_size)
        return self.pool.match_prefix(request.block_hashes, most)

    def on_computed(self, request: Request) -> None:
        # Blocks whose every position now has KV become shareable.
        num_full = request.num_computed_tokens // self.block_size
        start = request.num_registered_blocks
        if num_full > start:
            request.update_block_hashes(self.block_size)
            self.pool.cache_blocks(request.block_ids, request.block_hashes, start, num_full)
            request.num_registered_blocks = num_full

    def hashes_in_flight(self, request: Request, end: int) -> list:
        request.update_block_hashes(self.block_size)
        return request.block_hashes[request.num_registered_blocks : end // self.block_size]

    def next_uncached_hash(self, request: Request, prefix: PrefixMatch) -> object | None:
        k = len(prefix.block_ids)
        hashes = request.block_hashes  # filled by match()
        return hashes[k] if k < min(len(hashes), (request.num_tokens - 1) // self.block_size) else None
