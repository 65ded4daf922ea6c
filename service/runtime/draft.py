"""Speculative drafts from a draft model: a smaller model with the target's tokenizer proposes the next k tokens
greedily (`--draft-model PATH`, requests with speculation 'draft').

The draft model keeps its own paged KV cache, separate from the target's: each request that drafts holds blocks
of it (`DraftSequence`, in `SpecState.proposer_state`) covering the tokens the draft has read. A proposal first
catches the draft up on the tokens it has not read (the prompt at first; after a verify, only the target's token
after the drafts it kept, whose K/V the draft wrote while proposing them), then decodes k - 1 more tokens one at
a time. The K/V of drafts that were rejected is simply overwritten by the next catch-up, so a rejection needs no
rollback; a target-side preemption changes nothing here. The drafts are greedy (a point mass), which the verify rule of
`service.engine.speculative` keeps exact for greedy and sampled requests alike. The draft model runs without
the request's adapter, and requests' drafts are computed one request after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kernels.attention import AttentionPlan
from service.engine.speculative import SpecState
from service.runtime.model import KVCache, LlamaModel

MAX_CATCH_UP = 512  # tokens the draft reads in one forward pass (a long prompt takes several)


@dataclass
class DraftSequence:
    blocks: list[int] = field(default_factory=list)
    read: int = 0  # the request's tokens whose K/V the draft has, from position 0
    ahead: list[int] = field(default_factory=list)  # its own drafts whose K/V follows, at positions read..


class DraftModelProposer:
    """Implements the engine's `Proposer` with `model` over an arena of `num_blocks` blocks of `block_size`."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, max_model_len: int) -> None:
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv = KVCache(model.arch, num_blocks, block_size, model.dtype, device=model.device)
        self._free = list(range(num_blocks - 1, -1, -1))
        self.forward_passes = 0  # the draft's forward passes so far

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def propose(self, state: SpecState, tokens: Sequence[int], k: int) -> list[int]:
        seq = state.proposer_state
        if not isinstance(seq, DraftSequence):
            seq = state.proposer_state = DraftSequence()
        n = len(tokens)
        k = min(k, self.max_model_len - n + 1)  # the draft writes K/V up to position n + k - 2
        if k <= 0 or n == 0 or not self._cover(seq, n + k - 1):
            return []
        # The drafts the request kept since the last proposal have their K/V here already: count them as read.
        kept = 0
        while kept < len(seq.ahead) and seq.read + kept < n and tokens[seq.read + kept] == seq.ahead[kept]:
            kept += 1
        seq.read += kept
        seq.ahead = []
        with torch.inference_mode():
            start = min(seq.read, n - 1)  # at least the last token: its logits give the first draft
            while n - start > MAX_CATCH_UP:
                self._forward(seq, tokens[start : start + MAX_CATCH_UP], start)
                start += MAX_CATCH_UP
            token = self._forward(seq, tokens[start:n], start)
            seq.read = n
            drafts = [token]
            for i in range(1, k):
                token = self._forward(seq, [token], n - 1 + i)
                drafts.append(token)
        seq.ahead = drafts[:-1]  # K/V written at positions n .. n + k - 2
        return drafts

    def release(self, state: SpecState) -> None:
        seq = state.proposer_state
        if isinstance(seq, DraftSequence):
            self._free.extend(reversed(seq.blocks))
            seq.blocks.clear()
            seq.read = 0
            seq.ahead = []

    def _cover(self, seq: DraftSequence, positions: int) -> bool:
        """Blocks for `positions` tokens; False (nothing taken) when the arena has too few free."""
        need = -(-positions // self.block_size) - len(seq.blocks)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.blocks.append(self._free.pop())
        return True

    def _forward(self, seq: DraftSequence, ids: Sequence[int], start: int) -> int:
        """The draft's K/V for `ids` at positions start.. written; returns its greedy token after the last."""
        model = self.model
        dev = model.device
        n = len(ids)
        plan = AttentionPlan.build([seq.blocks], [start], [n], self.block_size, dev)
        hidden = model.forward(torch.tensor(ids, dtype=torch.int64, device=dev),
                               torch.arange(start, start + n, dtype=torch.int64, device=dev), plan, self.kv)
        self.forward_passes += 1
        return int(model.compute_logits(hidden[-1:]).argmax(-1).item())
