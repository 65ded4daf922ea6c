"""Speculative decoding inside the continuous batch (torch-free): who proposes draft tokens, how many, and what a
verify pass keeps.

A request in decode normally computes one token a step. When it speculates, its step carries its last token plus
k draft tokens proposed here; the runner returns the target token at each of the k + 1 positions, each chosen by
the request's own sampling rule as if the drafts before it were accepted (the same seeded draw, index for index,
that non-speculative decoding makes). The longest run of drafts equal to those targets is accepted, and the target
after it (a correction, or a bonus token when all k matched) comes for free. Greedy or seeded, the tokens are
therefore exactly those of decoding without speculation: for a point-mass draft (n-gram lookup) this is rejection
sampling, where draft x is kept with probability p(x) and a rejection draws from p restricted to tokens other than
x, with the randomness coupled to the request's seed.

What stops it from costing: each request's k adapts (grows by one after a verify that kept every draft, drops to
one past the accepted run otherwise); a request drafts only as many tokens as pay at the step's load, given its
estimated acceptance and what one more position costs relative to a step (`draft_token_cost`: on the CPU a
position adds ~0.8 of a single decode step's fixed cost, measured), with a rare one-draft probe otherwise; and a
step adds no drafts past `speculative_max_step_tokens`, where the batch is compute-bound. Requests with a response format do not speculate (their mask would have to follow every draft).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.engine.request import Request

SPECULATION_MODES = ("off", "ngram", "draft")
MAX_DRAFT_TOKENS = 16  # per request and step: a verify chunk stays a short extend


class Proposer(Protocol):
    """Proposes up to `k` tokens to follow `tokens` (the request's prompt and output so far); `release` frees what
    it holds for a request (`SpecState.proposer_state`) when the request ends."""

    def propose(self, state: SpecState, tokens: Sequence[int], k: int) -> list[int]: ...

    def release(self, state: SpecState) -> None: ...


@dataclass
class SpecState:
    """One request's speculation: its proposer's index, its current k, and what it drafted and kept."""

    proposer: Proposer
    max_k: int
    k: int
    draft_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # of them, accepted
    verifies: int = 0
    # The n-gram proposer's index: for each n, the n-gram ending at each indexed position -> the latest such
    # position (the token after it is what the n-gram was followed by). Positions [0, indexed) are indexed.
    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0
    proposer_state: object = None  # what another proposer keeps per request (a draft model: its KV cache)

    # Estimated chance that a draft is accepted (given the one before it was): a moving average over verifies.
    alpha: float = 0.6
    # While its drafts do not pay here: decode steps until the next one-draft probe, and the current interval.
    probe_in: int = 0
    probe_every: int = 0

    def on_verified(self, proposed: int, accepted: int) -> None:
        """Adaptive k: one more after a verify that kept every draft, one past the accepted run otherwise; and the
        acceptance estimate moves towards this verify's (accepted / (accepted + 1) when one was rejected)."""
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.verifies += 1
        self.k = min(self.max_k, self.k + 1) if accepted == proposed else max(1, accepted + 1)
        sample = 1.0 if accepted == proposed else accepted / (accepted + 1)
        self.alpha = 0.7 * self.alpha + 0.3 * sample

    def worth(self, k: int, load: int, cost: float) -> int:
        """How many of k drafts pay in a step of `load` tokens, where one more position costs `cost` times a
        step's fixed cost. Draft j is accepted with probability alpha**j; it raises the step's tokens by that and
        its cost by one position, which pays while alpha**j > load * cost / (1 + load * cost)."""
        bar = load * cost / (1 + load * cost)
        a = self.alpha
        n = 0
        while n < k and a ** (n + 1) > bar:
            n += 1
        if n:
            self.probe_every = 0
            return n
        # Not worth it on the estimate: probe with one draft now and then (doubling the interval up to 64 steps),
        # so a request whose text turns to copying picks speculation up again.
        if self.probe_in > 0:
            self.probe_in -= 1
            return 0
        self.probe_every = min(64, max(8, 2 * self.probe_every))
        self.probe_in = self.probe_every
        return 1


class NgramProposer:
    """Prompt lookup: the latest earlier occurrence of the last n tokens (n from `n_max` down to `n_min`) in the
    request's own prompt and output, and the tokens that followed it. The index grows incrementally, so a step
    costs O(new tokens x n range), not a scan of the context."""

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"ngram range {n_min}-{n_max} is invalid: need 1 <= n_min <= n_max")
        self.n_min = n_min
        self.n_max = n_max

    def propose(self, state: SpecState, tokens: Sequence[int], k: int) -> list[int]:
        n_tok = len(tokens)
        if k <= 0 or n_tok < 2:
            return []
        grams = state.ngrams
        # Index each n-gram tokens[end - n:end] by `end`, the position of the token that followed it, for every
        # end < n_tok: the query (the last n tokens, followed by nothing yet) thus finds only earlier occurrences.
        for end in range(max(state.indexed, 1), n_tok):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                grams[tuple(tokens[end - n:end])] = end
        state.indexed = n_tok
        for n in range(min(self.n_max, n_tok - 1), self.n_min - 1, -1):
            end = grams.get(tuple(tokens[n_tok - n:]))
            if end is not None:
                return list(tokens[end:end + k])
        return []

    def release(self, state: SpecState) -> None:
        """The index lives in the state: nothing else to free."""


def accept(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """How many leading drafts equal the targets at their positions (the verify rule)."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a


@dataclass(frozen=True)
class SpecStats:
    """A request's speculation, in its final record: drafts verified and accepted (0 and 0 without it)."""

    draft_tokens: int = 0
    accepted_tokens: int = 0


class Speculator:
    """Chosen once, at engine construction: attaches a proposer to each request that speculates, and adds drafts
    to a scheduled step."""

    def __init__(self, default_mode: str, max_draft_tokens: int, max_step_tokens: int,
                 proposers: dict[str, Proposer], draft_token_cost: float = 0.8) -> None:
        self.default_mode = default_mode
        self.max_draft_tokens = max_draft_tokens
        self.max_step_tokens = max_step_tokens
        self.draft_token_cost = draft_token_cost
        self.proposers = proposers
        # Verifies by accepted length [0, MAX_DRAFT_TOKENS], drafts verified and accepted.
        self.accepted_hist = [0] * (MAX_DRAFT_TOKENS + 1)
        self.draft_tokens = 0
        self.accepted_tokens = 0

    def mode_of(self, request: Request) -> str:
        sp = request.sampling
        return sp.speculation if sp.speculation is not None else self.default_mode

    def check(self, mode: str) -> None:
        """ValueError naming the field when this engine cannot serve `mode`."""
        if mode != "off" and mode not in self.proposers:
            if mode == "draft":
                raise ValueError("sampling.speculation='draft' is not available: this server has no draft model "
                                 "(start it with --draft-model, or use 'ngram' or 'off')")
            raise ValueError(f"sampling.speculation={mode!r} is not available on this server")

    def attach(self, request: Request) -> None:
        """Give the request its speculation state, or None when it does not speculate."""
        mode = self.mode_of(request)
        self.check(mode)
        if mode == "off" or request.grammar is not None:
            request.spec_state = None
            return
        sp = request.sampling
        max_k = sp.max_draft_tokens if sp.max_draft_tokens is not None else self.max_draft_tokens
        request.spec_state = SpecState(self.proposers[mode], max_k, max_k)

    def drafts_for(self, request: Request, room: int, load: int = 1) -> list[int]:
        """Up to `room` drafts for a request in decode (its last token not yet computed) in a step of `load`
        tokens, bounded by its k, by how many pay at that load (`SpecState.worth`), and by what may still be
        generated: the token after the drafts always comes, so drafts <= tokens left - 1."""
        state = request.spec_state
        if state is None:
            return []
        left = request.sampling.max_tokens - request.num_output_tokens - 1
        k = min(state.k, room, left)
        if k <= 0:
            return []
        k = state.worth(k, load, self.draft_token_cost)
        if k <= 0:
            return []
        return state.proposer.propose(state, request.all_token_ids, k)

    def release(self, request: Request) -> None:
        """The request has ended: its proposer frees what it held for it."""
        state = request.spec_state
        if state is not None:
            state.proposer.release(state)

    def on_verified(self, request: Request, proposed: int, accepted: int) -> None:
        state = request.spec_state
        assert state is not None
        state.on_verified(proposed, accepted)
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.accepted_hist[accepted] += 1
