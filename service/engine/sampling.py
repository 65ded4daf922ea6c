"""Sampling parameters of one request, validated on construction (torch-free)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from adapters.errors import quote
from service.engine.speculative import MAX_DRAFT_TOKENS, SPECULATION_MODES

MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
# Entries of stop_token_ids (duplicates count). The engine tests each new token against them once per step
# and the sampler masks them below min_tokens: a small bound keeps both O(1) per token.
MAX_STOP_TOKEN_IDS = 64
# Entries of logit_bias, each a bias in [-MAX_LOGIT_BIAS_VALUE, MAX_LOGIT_BIAS_VALUE] (OpenAI's range: -100 in
# effect bans a token, +100 all but forces it). The sampler adds them in one scatter per step.
MAX_LOGIT_BIAS = 1024
MAX_LOGIT_BIAS_VALUE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k 0 and top_p 1 disable those filters. The penalties follow the
    usual conventions: `repetition_penalty` divides positive (multiplies negative) logits of every
    token already seen in prompt or output; `presence_penalty` / `frequency_penalty` subtract from
    logits of tokens generated so far (once, and per occurrence).

    min_tokens, as in vLLM: output tokens [0, min_tokens) are never an EOS id or one of
    `stop_token_ids` (the sampler masks them, `ignore_eos` or not; logprobs stay the raw model's), so
    neither can end the request before it. `ignore_eos`: EOS never ends the request; from min_tokens
    on it may be sampled, and generation goes on after it.

    `stop_token_ids` may be given as any collection of at most MAX_STOP_TOKEN_IDS ids and is kept as a
    frozenset: the engine tests every new token for membership. A value quoted in an error message is cut short
    (`adapters.errors.quote`), so a huge stop string never makes a huge message.

    `logit_bias`: token id -> a bias added to that token's logit after the penalties and before the stop-token
    mask, a response format's mask, temperature and the filters, greedy or random alike (as OpenAI's and vLLM's
    `logit_bias`); logprobs stay the raw model's. Given as a mapping or (id, bias) pairs, kept as pairs sorted by
    id. Ids at or past the vocabulary are refused by the API (it knows the vocabulary); the sampler skips them.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    # The log-probability of each prompt token after the first (given the tokens before it) and of this many most
    # likely alternatives, as vLLM's `prompt_logprobs`; None: none. Such a request takes no prefix-cache hit for
    # the positions whose logprobs it still needs (their logits must be computed).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it (vLLM's flag)
    # Speculative decoding: "off", "ngram" (prompt lookup) or "draft"; None: the server's default. Outputs are the
    # same either way (service.engine.speculative); only the speed changes.
    speculation: str | None = None
    max_draft_tokens: int | None = None  # drafts per step, at most; None: the server's default

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"{name}={quote(value)} is invalid: {allowed}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0 (0 disables top-k)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1] (1 disables top-p)")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1] (0 disables min-p)")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be a number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not -2 <= v <= 2:
                raise bad(name, v, "must be in [-2, 2] (0 disables it)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "must be an integer in [0, 2**63)")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must be an integer in [0, max_tokens={self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, v, f"must be an integer in [0, {MAX_LOGPROBS}] or unset")
        if len(self.stop) > MAX_STOP_SEQUENCES:  # counted before any per-string work
            raise ValueError(f"stop has {len(self.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
        stop = tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        for s in stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
                raise bad("stop", s, f"each stop sequence must be a non-empty string of at most {MAX_STOP_LENGTH} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:  # counted before any per-id work
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} entries; at most "
                             f"{MAX_STOP_TOKEN_IDS} are allowed")
        ids = frozenset(self.stop_token_ids)
        object.__setattr__(self, "stop_token_ids", ids)
        for t in ids:
            if not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", t, "each stop token id must be an integer >= 0")

        self._check_logit_bias()

        if self.speculation is not None and self.speculation not in SPECULATION_MODES:
            raise bad("speculation", self.speculation, f"must be one of {', '.join(SPECULATION_MODES)} or unset")
        if self.max_draft_tokens is not None and (isinstance(self.max_draft_tokens, bool) or not isinstance(
                self.max_draft_tokens, int) or not 1 <= self.max_draft_tokens <= MAX_DRAFT_TOKENS):
            raise bad("max_draft_tokens", self.max_draft_tokens, f"must be an integer in [1, {MAX_DRAFT_TOKENS}] or unset")

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if len(bias) > MAX_LOGIT_BIAS:  # counted before any per-entry work
            raise ValueError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        out: dict[int, float] = {}
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"logit_bias entry {quote(pair)} is invalid: give token id -> bias")
            t, v = pair
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias key {quote(t)} is invalid: each key must be a token id, an integer "
                                 ">= 0")
            if t in out:
                raise ValueError(f"logit_bias has token id {t} twice")
            if not _finite(v) or not -MAX_LOGIT_BIAS_VALUE <= v <= MAX_LOGIT_BIAS_VALUE:
                raise ValueError(f"logit_bias[{t}]={quote(v)} is invalid: each bias must be a number in "
                                 f"[-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]")
            if v:
                out[t] = float(v)
        object.__setattr__(self, "logit_bias", tuple(sorted(out.items())))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
