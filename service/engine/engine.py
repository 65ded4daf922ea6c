"""LLMEngine: schedule -> run the model -> post-process, one step at a time (torch-free).

The engine is single-threaded: the serving loop owns it and is the only caller of every method
(the API layer hands it new requests and aborts through its own queue).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable

from service.config import EngineConfig
from service.engine.adapters import AdapterAdmission, AdapterSlotsLike
from service.engine.admission import AdmissionPolicy
from service.engine.block_pool import BlockPool
from service.engine.detokenizer import Detokenizer
from service.engine.kv_cache import KVCacheManager
from service.engine.outputs import (
    EngineStats,
    ErrorKind,
    FinalOutput,
    RequestError,
    RequestOutput,
    final_output,
)
from service.engine.request import Request, RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.scheduler import QueueFullError, Scheduler
from service.engine.speculative import NgramProposer, Proposer, Speculator
from service.engine.structured import CompiledGrammarLike, FormatDeadEnd
from service.engine.types import FinishReason, ModelRunnerLike, SampleResult, SchedulerOutput, TokenizerLike

logger = logging.getLogger(__name__)


class LLMEngine:
    """Requests in, per-step outputs out. `admission` picks which waiting requests may start each
    step (default: strictly in queue order); it is chosen here, once, never switched per step.

    With `adapter_slots` the engine serves LoRA adapters: requests name an adapter version in their
    spec (`adapter_version`), and an `AdapterAdmission` over those slots bounds and rotates the adapters of each
    step's batch (pass `admission=AdapterAdmission(slots, ...)` instead to tune it). Without adapter
    support a request with an extra_key is refused.
    """

    def __init__(
        self,
        runner: ModelRunnerLike,
        tokenizer: TokenizerLike,
        config: EngineConfig,
        admission: AdmissionPolicy | None = None,
        adapter_slots: AdapterSlotsLike | None = None,
        clock: Callable[[], float] = time.monotonic,
        draft_proposer: Proposer | None = None,
    ) -> None:
        """`clock`: what request deadlines are compared with (time.monotonic, as the API sets them).
        `draft_proposer`: proposes drafts for requests with speculation 'draft' (a draft model's)."""
        if runner.block_size != config.block_size:
            raise ValueError(
                f"the model runner's KV blocks hold {runner.block_size} tokens but config.block_size is "
                f"{config.block_size}; they must match"
            )
        if adapter_slots is not None:
            if admission is None:
                admission = AdapterAdmission(adapter_slots)
            elif not (isinstance(admission, AdapterAdmission) and admission.slots is adapter_slots):
                raise ValueError("with adapter_slots, the admission policy must be an AdapterAdmission over them")
        # Set when adapters are served; its slots also get every new adapter request's load started.
        self._adapters = admission if isinstance(admission, AdapterAdmission) else None
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.pool = BlockPool(runner.num_blocks, runner.block_size)
        # Chosen once: requests speculate with the proposers this engine has (the n-gram lookup needs no model; a
        # draft model is the runtime's, when one was loaded).
        proposers: dict[str, Proposer] = {"ngram": NgramProposer(config.ngram_min, config.ngram_max)}
        if draft_proposer is not None:
            proposers["draft"] = draft_proposer
        if config.speculation == "draft" and draft_proposer is None:
            raise ValueError("speculation='draft' needs a draft model (--draft-model): this engine has none")
        self.speculator = Speculator(config.speculation, config.max_draft_tokens, config.speculative_max_step_tokens,
                                     proposers, config.draft_token_cost)
        self.scheduler = Scheduler(
            config, KVCacheManager.create(self.pool, config.enable_prefix_caching), runner.max_model_len, admission,
            self.speculator,
        )
        self._vocab_size: int | None = getattr(runner, "vocab_size", None)
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._requests: dict[str, Request] = {}  # unfinished requests
        self._detok: dict[str, Detokenizer] = {}
        self._pending: list[RequestOutput] = []  # final outputs of aborts, returned by the next step
        # min-heap of (deadline, tie-break, request id, its arrival_seq): no reference to the request itself, so
        # a finished request is not kept alive until its deadline passes
        self._deadlines: list[tuple[float, int, str, int]] = []
        self._clock = clock
        self._ids = itertools.count()
        self._steps = 0
        self._prompt_tokens_computed = 0
        self._generation_tokens = 0

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, spec: RequestSpec, arrival_time: float | None = None) -> Request:
        """Queue a request. ValueError for input this engine cannot serve, QueueFullError when the queue is
        at its bound. The spec itself was validated when it was built. `arrival_time` (time.monotonic()): when it
        arrived, if before now (its queue time and TTFT count from there)."""
        if not isinstance(spec, RequestSpec):
            raise TypeError(f"add_request takes a RequestSpec, not {type(spec).__name__}")
        if spec.request_id in self._requests:
            raise ValueError(f"request_id={spec.request_id!r} is already in use by an unfinished request")
        if spec.adapter_version is not None and self._adapters is None:
            raise ValueError("this engine serves no adapters")
        if self._vocab_size is not None and max(spec.prompt_token_ids) >= self._vocab_size:
            raise ValueError(f"prompt token id {max(spec.prompt_token_ids)} is outside the vocabulary of "
                             f"{self._vocab_size} tokens")
        request = Request(spec, arrival_time)
        self.speculator.attach(request)
        self.scheduler.add(request)
        if spec.adapter_version is not None and self._adapters is not None:
            # Load while the request queues, not once it reaches the head of the queue.
            self._adapters.slots.ensure_loading(spec.adapter_version)
        self._requests[spec.request_id] = request
        self._detok[spec.request_id] = Detokenizer(self.tokenizer, request.prompt_token_ids, spec.sampling)
        if spec.deadline is not None:
            heapq.heappush(self._deadlines, (spec.deadline, next(self._ids), spec.request_id, request.arrival_seq))
        return request

    def abort_request(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED,
                      error: RequestError | None = None) -> bool:
        """End an unfinished request now (cancelled by its caller, or failed with `error`): its blocks
        return at once, and the next `step()` (or `take_pending()`) returns its final output. False if no
        such unfinished request exists."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._pending.append(self._finish(request, reason, error))
        return True

    def take_pending(self) -> list[RequestOutput]:
        """The final outputs of requests ended by `abort_request` since the last step."""
        outputs, self._pending = self._pending, []
        return outputs

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of requests that got a token or finished."""
        if self._deadlines:
            self._expire_deadlines()
        outputs = self.take_pending()
        if not self.scheduler.has_unfinished():
            return outputs
        out = self.scheduler.schedule()
        outputs.extend(self._finish(request, FinishReason.ERROR, error) for request, error in out.failed)
        if not out.chunks:
            return outputs
        self._steps += 1
        t0 = time.perf_counter()
        try:
            results = self.runner.execute(out)
            if len(results) != len(out.chunks):
                raise RuntimeError(f"the model runner returned {len(results)} results for {len(out.chunks)} chunks")
            sampled = self.scheduler.update_from_output(out, results)
        except Exception:
            # A failed step must not take the engine down: its requests fail, everyone else goes on.
            logger.exception("model step failed; finishing its %d requests with ERROR", len(out.chunks))
            error = RequestError(ErrorKind.INTERNAL, "internal error: the model step failed")
            outputs.extend(self._finish(c.request, FinishReason.ERROR, error)
                           for c in out.chunks if not c.request.is_finished)
            return outputs
        self._count_computed(out)
        self._charge_time(out, time.perf_counter() - t0)
        finished: list[tuple[Request, FinishReason, RequestOutput]] = []
        for request, results in sampled:
            try:
                output, reason = self._post_process(request, results)
            except FormatDeadEnd as e:  # the caller's format, not our failure
                outputs.append(self._finish(request, FinishReason.ERROR, RequestError(ErrorKind.FORMAT_DEAD_END, str(e))))
                continue
            except Exception:
                # e.g. the tokenizer rejects a token: only this request fails
                logger.exception("post-processing request %r failed; finishing it with ERROR", request.request_id)
                error = RequestError(ErrorKind.INTERNAL, "internal error: decoding the output failed")
                outputs.append(self._finish(request, FinishReason.ERROR, error))
                continue
            self._generation_tokens += len(output.new_token_ids)
            if reason is not None:
                finished.append((request, reason, output))
            outputs.append(output)
        if finished:
            self.scheduler.finish_requests((request, reason) for request, reason, _ in finished)
            for request, _, output in finished:
                output.final = final_output(request, self._detok[request.request_id].text)
                self._forget(request)
        return outputs

    def _expire_deadlines(self) -> None:
        """Stop every request whose deadline has passed (its final output comes with this step's)."""
        now = self._clock()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, rid, seq = heapq.heappop(heap)
            request = self._requests.get(rid)
            if request is not None and request.arrival_seq == seq:  # not a later request reusing the id
                error = RequestError(ErrorKind.DEADLINE_EXCEEDED, "the deadline passed before the request "
                                     "finished; it was stopped")
                self._pending.append(self._finish(request, FinishReason.CANCELLED, error))
        if not self._requests:
            heap.clear()  # entries of requests that finished otherwise

    @staticmethod
    def _charge_time(out: SchedulerOutput, seconds: float) -> None:
        total = sum(c.num_tokens for c in out.chunks)
        for c in out.chunks:
            c.request.engine_seconds += seconds * c.num_tokens / total

    def _count_computed(self, out: SchedulerOutput) -> None:
        for c in out.chunks:
            self._prompt_tokens_computed += max(0, min(c.start + c.num_tokens, c.request.num_prompt_tokens) - c.start)

    def _post_process(self, request: Request, results: list[SampleResult]) -> tuple[RequestOutput, FinishReason | None]:
        """Detokenize the new tokens (already appended to the request: several after a verify pass) one by one and
        decide whether the request stops; a token that stops it drops the ones after it."""
        sp = request.sampling
        detok = self._detok[request.request_id]
        n_before = request.num_output_tokens - len(results)
        reason: FinishReason | None = None
        deltas = []
        kept = 0
        for result in results:
            token = result.token_id
            kept += 1
            n_out = n_before + kept  # this token included
            # min_tokens: n_out counts this token, so `n_out > min_tokens` is the sampler's rule (it masks EOS / stop
            # ids at output indices [0, min_tokens)); these checks guard a runner that does not mask. A stop string
            # may complete on the min_tokens-th token (n_out == min_tokens).
            if request.grammar is not None and _advance_grammar(request, token, n_out):
                reason = FinishReason.STOP  # the format is complete: its end token was the only one allowed
            elif n_out > sp.min_tokens and token in self._eos and not sp.ignore_eos:
                reason = FinishReason.EOS
            elif n_out > sp.min_tokens and token in sp.stop_token_ids:
                reason = FinishReason.STOP
            if reason is None:
                # Control tokens that end the request add no text; every other token does.
                deltas.append(detok.add_token(token, check_stop=n_out >= sp.min_tokens))
                if detok.stopped:
                    reason = FinishReason.STOP
                elif n_out >= sp.max_tokens or request.num_prompt_tokens + n_out >= self.scheduler.max_num_tokens:
                    reason = FinishReason.LENGTH
            if reason is not None:
                deltas.append(detok.finish())
                break
        if kept < len(results):
            request.truncate_output(n_before + kept)
        tokens = [r.token_id for r in results[:kept]]
        out = RequestOutput(request.request_id, tokens, "".join(deltas),
                            list(results[:kept]) if sp.logprobs is not None else [])
        if n_before == 0 and sp.prompt_logprobs is not None:
            out.prompt_logprobs = list(request.prompt_logprobs)
        return out, reason

    def _finish(self, request: Request, reason: FinishReason, error: RequestError | None = None) -> RequestOutput:
        """End a request outside the normal stop checks (abort, deadline, failure) and build its last output."""
        try:
            self.scheduler.finish_requests([(request, reason)])
        except Exception:  # the caller still gets its final output; the idle integrity check reports the rest
            logger.exception("finishing request %r failed: the scheduler's state may be inconsistent",
                             request.request_id)
            request.finish_reason, request.finished_time = reason, time.monotonic()
        detok = self._detok[request.request_id]
        try:
            tail = detok.finish()
        except Exception:
            logger.exception("flushing the text of request %r failed", request.request_id)
            tail = ""
        final = final_output(request, detok.text, error)
        self._forget(request)
        return RequestOutput(request.request_id, [], tail, final=final)

    def _forget(self, request: Request) -> None:
        del self._requests[request.request_id]
        del self._detok[request.request_id]

    # ---- convenience --------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams],
                 adapter_versions: list[str | None] | None = None,
                 grammars: list[CompiledGrammarLike | None] | None = None) -> list[FinalOutput]:
        """Run prompts to completion (offline use), each with its adapter version (None: the base model)
        and its compiled response format (None: free text); final outputs in input order. Needs an idle
        engine, since outputs of other requests produced meanwhile would be lost."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drive step() yourself instead")
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        versions = adapter_versions if adapter_versions is not None else [None] * len(prompts)
        formats = grammars if grammars is not None else [None] * len(prompts)
        if not len(params) == len(versions) == len(formats) == len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters, {len(versions)} "
                             f"adapter versions and {len(formats)} grammars")
        specs = [RequestSpec(f"generate-{next(self._ids)}", tuple(p), sp, adapter_version=v, grammar=g)
                 for p, sp, v, g in zip(prompts, params, versions, formats, strict=True)]
        todo = specs[::-1]  # pop() from the end = submit in input order
        finals: dict[str, FinalOutput] = {}
        while todo or self.has_unfinished():
            while todo:
                try:
                    self.add_request(todo[-1])
                except QueueFullError:
                    break  # more room after the next step
                except Exception:
                    for spec in specs:
                        self.abort_request(spec.request_id)
                    self._pending.clear()
                    raise
                todo.pop()
            for o in self.step():
                if o.final is not None:
                    finals[o.request_id] = o.final
        return [finals[spec.request_id] for spec in specs]

    # ---- fair sharing -------------------------------------------------------------------
    def set_tenant_weights(self, weight_of: Callable[[str], float]) -> None:
        """Each tenant's share weight under the `vtc` policy (e.g. from the tenants file); call before
        serving. Tenants it does not know should get 1."""
        self.scheduler.fair.weight_of = weight_of

    # ---- observability ------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Model steps run so far."""
        return self._steps

    @property
    def stats(self) -> EngineStats:
        adapters = self._adapters
        running = frozenset(r.extra_key for r in self.scheduler.running if r.extra_key is not None)
        return EngineStats(
            steps=self._steps,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens_computed=self._prompt_tokens_computed,
            generation_tokens=self._generation_tokens,
            prefix_cache_queried_tokens=self.pool.prefix_queried_tokens,
            prefix_cache_hit_tokens=self.pool.prefix_hit_tokens,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.pool.usage,
            max_active_adapters=adapters.slots.max_active if adapters else 0,
            num_active_adapters=len(running),
            running_adapters=running,
            waiting_adapters=frozenset(r.extra_key for r in self.scheduler.waiting if r.extra_key is not None),
            adapter_loads_waited=adapters.num_load_waits if adapters else 0,
            spec_draft_tokens=self.speculator.draft_tokens,
            spec_accepted_tokens=self.speculator.accepted_tokens,
            spec_accepted_lengths=tuple(self.speculator.accepted_hist),
        )

    def check_integrity(self) -> None:
        """Pool consistent and referenced exactly by the running requests, adapter slot users too
        (AssertionError if not)."""
        self.scheduler.check_integrity()
        if self._adapters is not None:
            self._adapters.check_integrity(self.scheduler.running)

    def check_idle_integrity(self) -> None:
        """For the loop when nothing runs: the pool is whole, no block is in use, no slot held."""
        self.check_integrity()
        assert not self.scheduler.running, f"not idle: {self.scheduler.num_running} requests running"
        assert self.pool.num_in_use == 0, f"{self.pool.num_in_use} blocks still in use with nothing running"


def _advance_grammar(request: Request, token: int, n_out: int) -> bool:
    """Advance the request's matcher over its sampled token; True when that ended the format. The sampler only
    lets the format's tokens through, so a refused token is a bug: it fails this request (RuntimeError)."""
    grammar = request.grammar
    assert grammar is not None
    if not grammar.accept_token(token):
        if not grammar.allows_any_token():
            raise FormatDeadEnd(f"{request.spec.grammar.format.field} allows no token of this model's vocabulary after "
                                f"{n_out - 1} output tokens: the model cannot spell what it asks for")
        raise RuntimeError(f"token {token} of request {request.request_id!r} is not allowed by its response format")
    return grammar.is_terminated()
