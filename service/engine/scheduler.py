"""The scheduler: one rule for prefill and decode (torch-free).

Each step, under a token budget and a sequence limit, every running request catches its
`num_computed_tokens` up towards `num_tokens` (a decode is 1 token; a prompt longer than the
remaining budget is computed in chunks over several steps, so decodes keep flowing), then waiting
requests are admitted starting from their longest cached prefix. Between tenants, the fair-share
policy (`fairness.FairShare`, `EngineConfig.scheduling_policy`) decides: under `vtc` the waiting request
of the best priority class whose tenant has received the least weighted service goes first; when every seat is
taken, a tenant with none, or one that is not backlogged (nothing else waiting), may take one seat a step from the
tenant furthest ahead (`_seat_victims`); and while more than one tenant has requests in, a step computes at most
`max_shared_prefill_tokens` prompt tokens, of which the request admitted next claims its share ahead of the running
prompts of tenants ahead of it, all of them when its tenant is not backlogged, and then its whole prompt even beyond
the bound (`_prompt_room`): a light tenant's new request waits for one short step, not for a step full of another
tenant's prompts, and then for one step of its own prompt; under `fcfs`, priority then arrival. When a running
request needs a block and none is left, the running request ranked last is preempted (lowest priority; under
`vtc` from the tenant furthest ahead; then latest arrival): it returns all its blocks and goes back to the front of
its tenant's queue to be recomputed.

The admission policy (chosen at construction) may skip waiting requests; whatever it reserves for a
request it admits (an adapter slot) is handed back through `on_release`, on every path that ends a
run: finish, abort, failure, preemption, and memory refusing the request right after the policy
agreed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import NamedTuple

from service.config import EngineConfig
from service.engine.admission import AdmissionPolicy, AdmitInOrder
from service.engine.fairness import FairShare, TenantKey
from service.engine.kv_cache import KVCacheManager
from service.engine.outputs import RequestError
from service.engine.request import Request, RequestStatus
from service.engine.speculative import Speculator, accept
from service.engine.types import FinishReason, SampleResult, ScheduledChunk, SchedulerOutput
from service.engine.waiting_queue import WaitingQueue


class _Claim(NamedTuple):
    """Prompt tokens of a step the next waiting request may take before running requests ranked after it."""

    request: Request
    rank: tuple[int, TenantKey]  # its (priority, tenant key)
    tokens: int
    # Its tenant is not backlogged and it can have a seat: running requests ranked after it compute no prompt
    # tokens this step unless it is not admitted after all (then they get the step's prompt room it left).
    exclusive: bool


class QueueFullError(Exception):
    """The waiting queue is at its bound; the caller should retry later (RESOURCE_EXHAUSTED)."""


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        admission: AdmissionPolicy | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.block_size = kv.block_size
        self.num_blocks = kv.pool.num_blocks
        self.max_model_len = max_model_len
        # A request finishes (LENGTH) when it reaches this many tokens. Past the pool's capacity a
        # lone request could never get its next block, so the pool bounds it too: a context of
        # num_blocks * block_size tokens is computable, and its sampled token ends the request.
        self.max_num_tokens = min(max_model_len, self.num_blocks * self.block_size + 1)
        self.admission: AdmissionPolicy = admission if admission is not None else AdmitInOrder()
        self.speculator = speculator
        # Every tenant weighs 1 until the engine is told the tenants' weights (LLMEngine.set_tenant_weights).
        self.fair = FairShare(config.scheduling_policy, None, config.input_token_weight, config.output_token_weight)
        # Sorted by `_run_order` at the start of each step: the last one is always the preemption victim.
        self.running: list[Request] = []
        self.waiting = WaitingQueue(self.fair.key)
        self.num_preemptions = 0  # every preemption, for memory or for a seat
        self.num_seats_taken = 0  # preemptions that gave a seat to a tenant (vtc, `_seat_victims`)
        self._arrivals = 0
        self._exclusive_last_step = False  # the last step's claim was exclusive (`_prompt_room`)

    def set_policy(self, policy: str, max_shared_prefill_tokens: int | None = None) -> None:
        """Switch the policy between tenants (and the shared prompt bound) while nothing is in the scheduler: every
        tenant's counter starts afresh, their weights are kept. ValueError for an unknown policy or a bound < 1;
        RuntimeError while a request is waiting or running (its place in the queue was set by the old policy)."""
        if self.has_unfinished():
            raise RuntimeError(f"the scheduling policy can change only while the engine is idle "
                               f"({len(self.running)} running, {len(self.waiting)} waiting)")
        bound = max_shared_prefill_tokens
        if bound is None:
            bound = self.config.max_shared_prefill_tokens
        config = replace(self.config, scheduling_policy=policy, max_shared_prefill_tokens=bound)  # validates both
        fair = FairShare(policy, self.fair.weight_of, config.input_token_weight, config.output_token_weight)
        self.config, self.fair = config, fair
        self.waiting = WaitingQueue(fair.key)
        self._exclusive_last_step = False

    # ---- queue --------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request. ValueError if it can never run; QueueFullError if the queue is full."""
        n = request.num_prompt_tokens
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt of {n} tokens is too long: it must be shorter than max_model_len={self.max_model_len}"
            )
        need = self.kv.num_blocks_for(n)
        if need > self.num_blocks:
            raise ValueError(
                f"prompt of {n} tokens needs {need} KV blocks of {self.block_size} tokens, more than the "
                f"{self.num_blocks} blocks of the whole cache (at most {self.num_blocks * self.block_size} tokens)"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_waiting} requests waiting, "
                f"the configured max_waiting); retry later"
            )
        self._arrivals += 1
        request.arrival_seq = self._arrivals
        request.status = RequestStatus.WAITING
        self.waiting.push(request)
        self.fair.arrive(request.tenant)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # ---- one step -----------------------------------------------------------------------
    def _run_order(self, request: Request) -> tuple[int, TenantKey, int]:
        return (request.priority, self.fair.key(request.tenant), request.arrival_seq)

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        """Schedule n tokens of req and charge its tenant for the prompt positions never charged before."""
        start = req.num_computed_tokens
        end = min(start + n, req.num_prompt_tokens)
        charged = req.num_charged_prompt_tokens
        if end > charged:
            self.fair.charge(req.tenant, input_tokens=end - max(start, charged))
            req.num_charged_prompt_tokens = end
        return ScheduledChunk(req, start, n, start + n == req.num_tokens)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        failed: list[tuple[Request, RequestError]] = []

        # The order is fixed for the step (counters move as it is scheduled): requests before i are
        # scheduled and rank above the tail, so the preemption victim is never one of them.
        running = self.running
        running.sort(key=self._run_order)
        prompt_room, claim = self._prompt_room(budget)
        self._exclusive_last_step = claim is not None and claim.exclusive
        # An exclusive claim may take more than the shared bound (a light request's whole prompt in one step); the
        # other prompts of the step stay within the bound.
        over = max(0, prompt_room - self.config.max_shared_prefill_tokens) if claim is not None else 0
        deferred: list[Request] = []  # prompts held back by an exclusive claim
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            assert n > 0, f"{req} is running with nothing to compute"
            prompt = n > 1  # a prompt chunk (or a preempted request's recomputation), not a decode
            if prompt:
                behind = claim is not None and self._run_order(req)[:2] > claim.rank
                if behind and claim.exclusive:
                    deferred.append(req)
                    i += 1
                    continue
                n = min(n, prompt_room - over - (claim.tokens if behind else 0))
                if n <= 0:
                    i += 1  # its prompt goes on next step
                    continue
            while not self.kv.grow(req, n):
                # Victims come from the tail (lowest priority, latest arrival). Requests before i
                # are already scheduled and rank higher, so the tail is never one of them.
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                chunks.append(self._chunk(req, n))
                budget -= n
                if prompt:
                    prompt_room -= n
                i += 1

        # Admitting while running requests are being evicted would only evict them again.
        if not preempted:
            budget, prompt_room = self._admit(budget, prompt_room, over, claim, chunks, failed, preempted)
        if deferred and claim is not None and claim.request.status != RequestStatus.RUNNING:
            # The claim was not taken up (memory, its adapter, a preemption): the prompts it held back go on, in run
            # order, in the room it left, from free blocks only (a preemption now would evict requests scheduled
            # above them); not those that lost their seat meanwhile (`_admit` may have given it to another tenant).
            for req in deferred:
                if req.status != RequestStatus.RUNNING:
                    continue
                n = min(req.num_tokens - req.num_computed_tokens, budget, prompt_room - over)
                if n > 0 and self.kv.grow(req, n):
                    chunks.append(self._chunk(req, n))
                    budget -= n
                    prompt_room -= n
        if self.speculator is not None and chunks:
            budget = self._add_drafts(chunks, budget)

        return SchedulerOutput(chunks, self.config.max_num_batched_tokens - budget, preempted, failed)

    def _prompt_room(self, budget: int) -> tuple[int, _Claim | None]:
        """The prompt tokens this step may compute, and what the next waiting request may claim of them ahead of the
        prompt chunks of running requests ranked after it. Under `vtc`, while more than one tenant has requests in,
        a step computes at most `max_shared_prefill_tokens` prompt tokens, so a tenant's new request never waits long
        for a step of another tenant's prompts to end; the request the fair share admits next claims its prompt, up
        to half of them, before running requests of tenants ahead of it. Half: whatever holds a backlogged tenant's
        request back (its adapter loading, memory), the running prompts still go on. A request that cannot have a
        seat this step (every seat taken, none it may take: `_seat_victims`) claims nothing: the room it would hold
        back would go unused, and the running prompts, which hold their seats, would take a step more.

        When that request's tenant is not backlogged (this is its only request waiting: a light or interactive
        stream) and it can have a seat, its claim is exclusive: its prompt, whole (up to the step's budget, beyond
        the shared bound: the room grows to hold it), is the only one that starts or goes on in this step (decodes
        go on), so its first token comes after one step of its own prompt, not after a step of other tenants'
        prompts nor after several steps of its own; if it is not admitted after all, the prompts held back get the
        shared bound's room.
        A backlogged tenant's next request would gain nothing from a short step: its claim is never exclusive. Nor
        is a claim in the step right after an exclusive one: however many light tenants arrive, the prompts held back
        go on at least every other step."""
        limit = self.config.max_shared_prefill_tokens
        if limit >= budget or not self.fair.fair or self.fair.num_active_tenants() < 2:
            return budget, None
        entry = self.waiting.peek()
        if entry is None:
            return limit, None
        req = entry.request
        assert req is not None
        uncached = req.num_tokens - self.kv.match(req).num_tokens
        held: dict[str, list[Request]] = {}
        for r in self.running:
            held.setdefault(r.tenant, []).append(r)
        if len(self.running) >= self.config.max_num_seqs and self._seat_victim(req, held) is None:
            return limit, None  # it cannot have a seat this step: the room it would hold back would go unused
        exclusive = not self._exclusive_last_step and self._only_one_waiting(req.tenant, held)
        tokens = min(budget if exclusive else limit // 2, uncached)
        return max(limit, tokens), _Claim(req, (req.priority, self.fair.key(req.tenant)), tokens, exclusive)

    def _only_one_waiting(self, tenant: str, held: dict[str, list[Request]]) -> bool:
        """`tenant` is not backlogged: of its requests in the scheduler, one is waiting (`held`: running requests by
        tenant)."""
        return self.fair.active_tenants().get(tenant, 0) - len(held.get(tenant, ())) == 1

    def _admit(self, budget: int, prompt_room: int, over: int, claim: _Claim | None, chunks: list[ScheduledChunk],
               failed: list[tuple[Request, RequestError]], preempted: list[str]) -> tuple[int, int]:
        """Admit waiting requests in the fair order while the budget, the prompt room and the seats allow; returns
        what is left of the budget and the prompt room. `over`: the part of the room only the claim's request may
        take (an exclusive claim beyond the shared bound)."""
        policy = self.admission
        policy.begin_step(self.running)
        skipped = []
        # Blocks being computed this step: a waiting request whose next uncached block is among them
        # waits one step and then reuses it, instead of computing the same prefix a second time.
        in_flight = {h for c in chunks for h in self.kv.hashes_in_flight(c.request, c.start + c.num_tokens)}
        stolen = False
        # With every seat taken, only a tenant that may take one is looked at (vtc, `_seat_victims`): the running
        # requests by tenant, and the seated tenants that may not take another seat.
        seated: dict[str, list[Request]] = {}
        skip: set[str] = set()
        while budget > 0 and prompt_room > 0:
            if len(self.running) >= self.config.max_num_seqs:
                if stolen or not self.fair.fair:
                    break
                seated = {}
                for r in self.running:
                    seated.setdefault(r.tenant, []).append(r)
                skip = {t for t in seated if not self._seat_victims(t, seated)}
            entry = self.waiting.peek(skip)
            if entry is None:
                break
            req = entry.request
            assert req is not None
            room = prompt_room if claim is not None and req is claim.request else prompt_room - over
            if room <= 0:
                break  # what is left of the room is the claim's alone
            victim = None
            if seated:
                victim = self._seat_victim(req, seated)
                if victim is None:
                    break
            if in_flight and self.kv.next_uncached_hash(req, self.kv.match(req)) in in_flight:
                skipped.append(self.waiting.take(entry))
                continue
            verdict = policy.may_admit(req)
            if verdict is not True:
                if verdict is not False:
                    failed.append((req, verdict))  # stays queued until the engine finishes it
                skipped.append(self.waiting.take(entry))
                continue
            if victim is not None:
                freed = self._evict_for_seat(victim, chunks)
                budget += freed
                if freed > 1:  # its prompt chunk
                    prompt_room += freed
                preempted.append(victim.request_id)
                stolen = True
            prefix = self.kv.match(req)
            n = min(req.num_tokens - prefix.num_tokens, budget, room)
            if not self.kv.admit(req, prefix, n):
                policy.on_release(req)  # hand back what the policy reserved for it
                break  # the head waits for memory; nobody behind it jumps the queue
            self.waiting.take(entry)
            if req.num_cached_tokens is None:
                req.num_cached_tokens = prefix.num_tokens
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)  # sorted into place at the start of the next step
            chunks.append(self._chunk(req, n))
            in_flight.update(self.kv.hashes_in_flight(req, req.num_computed_tokens + n))
            budget -= n
            prompt_room -= n
            if claim is not None and claim.exclusive and req is claim.request:
                prompt_room = 0  # its step computes its prompt only
        for entry in skipped:
            self.waiting.requeue(entry)
        return budget, prompt_room

    def _add_drafts(self, chunks: list[ScheduledChunk], budget: int) -> int:
        """Give decode chunks of speculating requests their drafts, in run order, while the step's tokens stay
        within the speculator's step bound and the budget. Drafts never preempt and never evict a cached prefix:
        a request whose draft positions do not fit in the pool's free blocks simply decodes one token."""
        spec = self.speculator
        assert spec is not None
        load = self.config.max_num_batched_tokens - budget  # the step's tokens before drafts
        room = min(budget, spec.max_step_tokens - load)
        for c in chunks:
            if room <= 0:
                break
            req = c.request
            if c.num_tokens != 1 or not c.sample or req.spec_state is None or req.num_output_tokens == 0:
                continue
            # Positions up to start + k must exist in the context window: the LENGTH rule ends the request once it
            # holds max_num_tokens tokens, and the token after the drafts is always appended.
            k = min(room, self.max_num_tokens - req.num_tokens - 1)
            drafts = spec.drafts_for(req, k, load) if k > 0 else []
            if drafts and self.kv.grow(req, 1 + len(drafts), evict=False):
                c.draft_token_ids = tuple(drafts)
                c.num_tokens += len(drafts)
                room -= len(drafts)
                budget -= len(drafts)
        return budget

    def _seat_victims(self, tenant: str, held: dict[str, list[Request]]) -> list[str]:
        """Under `vtc`, with every seat taken (`held`: the running requests by tenant): the tenants `tenant` may take
        a seat from, furthest ahead first. A tenant takes a seat when it holds none, or when its waiting request is
        its only one (it is not backlogged: a light stream whose requests overlap); so a backlogged tenant that holds
        a seat never takes another, and seats do not churn between backlogged tenants. The victim's tenant is ahead
        of it (larger key) and holds at least two seats more than it, so a move never turns the seat counts around."""
        own = len(held.get(tenant, ()))
        if own and not self._only_one_waiting(tenant, held):
            return []
        key = self.fair.key
        mine = key(tenant)
        ahead = [t for t, rs in held.items() if t != tenant and len(rs) >= own + 2 and key(t) > mine]
        return sorted(ahead, key=key, reverse=True)

    def _seat_victim(self, request: Request, held: dict[str, list[Request]]) -> Request | None:
        """The running request that gives `request` a seat (see `_seat_victims`): the latest arrival, at this
        request's priority or a lower one, of the tenant furthest ahead that has one (its full KV blocks stay in
        the prefix cache, so resuming it recomputes little). None when no seat may be taken."""
        for tenant in self._seat_victims(request.tenant, held):
            candidates = [r for r in held[tenant] if r.priority >= request.priority]
            if candidates:
                return max(candidates, key=lambda r: r.arrival_seq)
        return None

    def _evict_for_seat(self, victim: Request, chunks: list[ScheduledChunk]) -> int:
        """Preempt `victim` for a seat; drop its chunk from this step. Returns the tokens that frees."""
        freed = 0
        for i, c in enumerate(chunks):
            if c.request is victim:
                freed = c.num_tokens
                del chunks[i]
                break
        self.running.remove(victim)
        self._preempt(victim)
        self.num_seats_taken += 1
        return freed

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        self.admission.on_release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.push_front(request)
        self.num_preemptions += 1

    def update_from_output(
        self, out: SchedulerOutput, results: Sequence[SampleResult | list[SampleResult] | None]
    ) -> list[tuple[Request, list[SampleResult]]]:
        """Advance every scheduled request and append the sampled tokens; returns (request, new samples) pairs
        for the engine's stop checks. A chunk with drafts keeps the drafts that equal the targets at their
        positions, then the next target; the KV slots of the drafts it rejected are past its computed tokens
        (overwritten later), and the blocks holding only those are returned to the pool at once."""
        sampled = []
        for chunk, result in zip(out.chunks, results, strict=True):
            req = chunk.request
            if req.is_finished:
                continue
            if not chunk.draft_token_ids:
                req.num_computed_tokens += chunk.num_tokens
                self.kv.on_computed(req)
                if chunk.sample:
                    if not isinstance(result, SampleResult):
                        raise RuntimeError(f"the model runner returned no sample for {req.request_id!r}")
                    req.append_output_token(result.token_id)
                    self.fair.charge(req.tenant, output_tokens=1)
                    sampled.append((req, [result]))
                continue
            drafts = chunk.draft_token_ids
            if not isinstance(result, list) or len(result) != chunk.num_tokens:
                raise RuntimeError(f"the model runner returned no {chunk.num_tokens} targets for the verify pass "
                                   f"of {req.request_id!r}")
            a = accept(drafts, [r.token_id for r in result])
            kept = result[:a + 1]
            req.num_computed_tokens += 1 + a  # its last token and the accepted drafts
            for r in kept:
                req.append_output_token(r.token_id)
            self.kv.trim(req)
            self.kv.on_computed(req)
            self.fair.charge(req.tenant, output_tokens=len(kept))
            assert self.speculator is not None
            self.speculator.on_verified(req, len(drafts), a)
            sampled.append((req, kept))
        return sampled

    def finish_requests(self, finished: Iterable[tuple[Request, FinishReason]]) -> None:
        """Finish running or waiting requests; their blocks go back to the pool (hashed ones cached)."""
        any_running = False
        now = time.monotonic()
        for req, reason in finished:
            if req.is_finished:
                continue
            if req.status is RequestStatus.RUNNING:
                self.kv.free(req)
                self.admission.on_release(req)
                any_running = True
            else:
                self.waiting.remove(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = reason
            req.finished_time = now
            self.fair.leave(req.tenant)
            if self.speculator is not None:
                self.speculator.release(req)
        if any_running:
            self.running = [r for r in self.running if not r.is_finished]

    # ---- integrity ----------------------------------------------------------------------
    def check_integrity(self) -> None:
        """The pool is consistent and its references are exactly the running requests' tables."""
        pool = self.kv.pool
        pool.check_integrity()
        refs: dict[int, int] = {}
        for req in self.running:
            assert req.status is RequestStatus.RUNNING, f"{req} is in the running list"
            assert len(req.block_ids) >= self.kv.num_blocks_for(req.num_computed_tokens), f"{req} lacks blocks"
            assert len(set(req.block_ids)) == len(req.block_ids), f"{req} holds a block twice"
            for bid in req.block_ids:
                refs[bid] = refs.get(bid, 0) + 1
        for req in self.waiting:
            assert not req.block_ids, f"waiting {req} holds blocks"
            assert req.lora_slot == -1, f"waiting {req} holds adapter slot {req.lora_slot}"
        for bid in range(pool.num_blocks):
            assert pool.ref_count(bid) == refs.get(bid, 0), f"block {bid}: ref count != running tables"
        assert len({id(r) for r in self.running}) == len(self.running), "a request runs twice"
        active: dict[str, int] = {}
        for req in [*self.running, *self.waiting]:
            active[req.tenant] = active.get(req.tenant, 0) + 1
        assert active == self.fair.active_tenants(), f"fair-share requests {self.fair.active_tenants()} != {active}"
