"""LLMEngine: schedule -> run the model -> post-process, one step at a time (torch-free).

The engine is single-threaded: the serving loop owns it and is the only caller of every method
(the API layer hands it new requests and aborts through its own queue).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

from service.config import EngineConfig
from service.engine.adapters import AdapterAdmission, AdapterSlotsLike
from service.engine.admission import AdmissionPolicy
from service.engine.block_pool import BlockPool
from service.engine.detokenizer import Detokenizer
from service.engine.kv_cache import KVCacheManager
from service.engine.outputs import EngineStats, RequestOutput
from service.engine.request import Request
from service.engine.sampling import SamplingParams
from service.engine.scheduler import QueueFullError, Scheduler
from service.engine.types import FinishReason, ModelRunnerLike, SampleResult, SchedulerOutput, TokenizerLike

logger = logging.getLogger(__name__)


class LLMEngine:
    """Requests in, per-step outputs out. `admission` picks which waiting requests may start each
    step (default: strictly in queue order); it is chosen here, once, never switched per step.

    With `adapter_slots` the engine serves LoRA adapters: requests name an adapter version as their
    `extra_key`, and an `AdapterAdmission` over those slots bounds and rotates the adapters of each
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
    ) -> None:
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
        self.scheduler = Scheduler(
            config, KVCacheManager.create(self.pool, config.enable_prefix_caching), runner.max_model_len, admission
        )
        self._vocab_size: int | None = getattr(runner, "vocab_size", None)
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._requests: dict[str, Request] = {}  # unfinished requests
        self._detok: dict[str, Detokenizer] = {}
        self._pending: list[RequestOutput] = []  # final outputs of aborts, returned by the next step
        self._ids = itertools.count()
        self._steps = 0
        self._prompt_tokens_computed = 0
        self._generation_tokens = 0

    # ---- requests -----------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        extra_key: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> Request:
        """Queue a request. ValueError for bad input, QueueFullError when the queue is at its bound.

        `cache_salt`: requests share prefix-cache blocks only with requests of the same salt (the server
        salts with the tenant, so no tenant can probe another's prompts through cache hits)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r} is invalid: must be a non-empty string")
        if request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use by an unfinished request")
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, not {type(sampling).__name__}")
        if extra_key is not None and not isinstance(extra_key, str):
            raise TypeError(f"extra_key must be a string or None, not {type(extra_key).__name__}")
        if extra_key is not None and self._adapters is None:
            raise ValueError("this engine serves no adapters")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"cache_salt must be a string or None, not {type(cache_salt).__name__}")
        if not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        self._check_token_ids(prompt_token_ids)
        request = Request(request_id, prompt_token_ids, sampling, extra_key, priority, cache_salt)
        self.scheduler.add(request)
        if extra_key is not None and self._adapters is not None:
            # Load while the request queues, not once it reaches the head of the queue.
            self._adapters.slots.ensure_loading(extra_key)
        self._requests[request_id] = request
        self._detok[request_id] = Detokenizer(self.tokenizer, request.prompt_token_ids, sampling)
        return request

    def _check_token_ids(self, ids: Sequence[int]) -> None:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        low, high = min(ids), max(ids)
        if low < 0:
            raise ValueError(f"prompt token id {low} is invalid: token ids are >= 0")
        if self._vocab_size is not None and high >= self._vocab_size:
            raise ValueError(f"prompt token id {high} is outside the vocabulary of {self._vocab_size} tokens")

    def abort_request(self, request_id: str) -> bool:
        """Cancel an unfinished request: its blocks return at once, and the next `step()` returns its
        final output (reason CANCELLED). False if no such unfinished request exists."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._pending.append(self._finish(request, FinishReason.CANCELLED))
        return True

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of requests that got a token or finished."""
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return outputs
        out = self.scheduler.schedule()
        outputs.extend(self._finish(request, FinishReason.ERROR) for request in out.failed)
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
            outputs.extend(
                self._finish(c.request, FinishReason.ERROR, "internal error: the model step failed")
                for c in out.chunks if not c.request.is_finished
            )
            return outputs
        self._count_computed(out)
        self._charge_time(out, time.perf_counter() - t0)
        finished: list[tuple[Request, FinishReason]] = []
        for request, result in sampled:
            try:
                output = self._post_process(request, result)
            except Exception:
                # e.g. the tokenizer rejects a token: only this request fails
                logger.exception("post-processing request %r failed; finishing it with ERROR", request.request_id)
                outputs.append(self._finish(request, FinishReason.ERROR, "internal error: decoding the output failed"))
                continue
            if output.finish_reason is not None:
                finished.append((request, output.finish_reason))
            outputs.append(output)
        if finished:
            self.scheduler.finish_requests(finished)
            for request, _ in finished:
                self._forget(request)
        return outputs

    @staticmethod
    def _charge_time(out: SchedulerOutput, seconds: float) -> None:
        total = sum(c.num_tokens for c in out.chunks)
        for c in out.chunks:
            c.request.engine_seconds += seconds * c.num_tokens / total

    def _count_computed(self, out: SchedulerOutput) -> None:
        for c in out.chunks:
            self._prompt_tokens_computed += max(0, min(c.start + c.num_tokens, c.request.num_prompt_tokens) - c.start)
            self._generation_tokens += c.sample

    def _post_process(self, request: Request, result: SampleResult) -> RequestOutput:
        """Detokenize the new token and decide whether the request stops here."""
        sp = request.sampling
        token = result.token_id
        n_out = request.num_output_tokens
        detok = self._detok[request.request_id]
        reason: FinishReason | None = None
        # min_tokens: n_out already counts this token, so `n_out > min_tokens` is the sampler's rule (it
        # masks EOS / stop ids at output indices [0, min_tokens)); these checks guard a runner that does
        # not mask. A stop string may complete on the min_tokens-th token (n_out == min_tokens).
        if n_out > sp.min_tokens and token in self._eos and not sp.ignore_eos:
            reason = FinishReason.EOS
        elif n_out > sp.min_tokens and token in sp.stop_token_ids:
            reason = FinishReason.STOP
        if reason is None:
            # Control tokens that end the request add no text; every other token does.
            delta = detok.add_token(token, check_stop=n_out >= sp.min_tokens)
            if detok.stopped:
                reason = FinishReason.STOP
            elif n_out >= sp.max_tokens or request.num_tokens >= self.scheduler.max_num_tokens:
                reason = FinishReason.LENGTH
        else:
            delta = ""
        if reason is not None:
            delta += detok.finish()
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            new_text=delta,
            output_token_ids=list(request.output_token_ids),
            text=detok.text,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            new_logprobs=[result] if sp.logprobs is not None else [],
        )

    def _finish(self, request: Request, reason: FinishReason, error: str | None = None) -> RequestOutput:
        """End a request outside the normal stop checks (abort, error) and build its final output.
        `error` explains an ERROR unless the request already carries its own reason."""
        if error is not None and request.error is None:
            request.error = error
        self.scheduler.finish_requests([(request, reason)])
        detok = self._detok[request.request_id]
        try:
            tail = detok.finish()
        except Exception:
            logger.exception("flushing the text of request %r failed", request.request_id)
            tail = ""
        self._forget(request)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[],
            new_text=tail,
            output_token_ids=list(request.output_token_ids),
            text=detok.text,
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            error=request.error,
            error_kind=request.error_kind,
        )

    def _forget(self, request: Request) -> None:
        del self._requests[request.request_id]
        del self._detok[request.request_id]

    # ---- convenience --------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion; final outputs in input order. Needs an idle engine, since
        outputs of other requests produced meanwhile would be lost."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drive step() yourself instead")
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        todo = list(zip(ids, prompts, params, strict=True))
        todo.reverse()  # pop() from the end = submit in input order
        finals: dict[str, RequestOutput] = {}
        while todo or self.has_unfinished():
            while todo:
                rid, prompt, sp = todo[-1]
                try:
                    self.add_request(rid, prompt, sp)
                except QueueFullError:
                    break  # more room after the next step
                except Exception:
                    for rid_added in ids:
                        self.abort_request(rid_added)
                    self._pending.clear()
                    raise
                todo.pop()
            for o in self.step():
                if o.finished:
                    finals[o.request_id] = o
        return [finals[rid] for rid in ids]

    # ---- observability ------------------------------------------------------------------
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
