"""Batched token sampling with per-request parameters.

Reproducibility: a request's random draw at output index n uses a generator seeded from
(request seed, n) alone, so a seeded request samples the same tokens whatever else shares its batch,
and after a preemption (which recomputes but never re-samples earlier tokens).

logit_bias: added after the penalties and before everything else (the min_tokens mask, a response format's
mask, temperature, the filters), so a bias never lifts a masked token; logprobs stay the raw model's.

min_tokens: while a request has fewer than `min_tokens` output tokens, its EOS ids (the tokenizer's
whole EOS set, under `ignore_eos` too, as in vLLM) and its `stop_token_ids` get logit -inf after the
penalties and before temperature and the filters, greedy or random alike, so output tokens
[0, min_tokens) are never one of them. Logprobs stay those of the raw model: a masked id can still
appear in `top_logprobs`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Collection, Sequence

import torch

from kernels import native
from service.engine.sampling import SamplingParams
from service.engine.types import SampleResult


def step_seed(seed: int, index: int) -> int:
    """A 63-bit seed for draw number `index` of a request seeded with `seed`."""
    digest = hashlib.blake2b(seed.to_bytes(8, "little") + index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SamplingRow:
    """What the sampler needs from one request (the engine's Request satisfies it)."""

    sampling: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class DraftRow:
    """A request as it would be with some drafts accepted: what one position of its verify pass samples under
    (penalties over those output tokens, min_tokens and the seeded draw at that output index), so each position's
    target is exactly the token decoding without speculation would pick there."""

    __slots__ = ("sampling", "seed", "prompt_token_ids", "output_token_ids")
    grammar = None  # requests with a response format do not speculate

    def __init__(self, request: SamplingRow, output_token_ids: list[int]) -> None:
        self.sampling = request.sampling
        self.seed = request.seed
        self.prompt_token_ids = request.prompt_token_ids
        self.output_token_ids = output_token_ids


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow], idx: list[int]) -> None:
    """In place on logits[idx]. repetition: prompt+output tokens; presence/frequency: output tokens."""
    vocab = logits.shape[1]
    for i in idx:
        sp = rows[i].sampling
        row = logits[i]
        out = torch.tensor(rows[i].output_token_ids, dtype=torch.int64, device=logits.device)
        if sp.repetition_penalty != 1:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(rows[i].prompt_token_ids, dtype=torch.int64, device=logits.device)] = True
            if out.numel():
                seen[out] = True
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        if out.numel() and (sp.presence_penalty or sp.frequency_penalty):
            counts = torch.bincount(out, minlength=vocab).to(row.dtype)
            row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)


@functools.lru_cache(maxsize=256)
def _bias_table(bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """A request's (id, bias) pairs as a [k, 2] float64 table (ids exact below 2**53), built once per distinct
    bias: a request's rows meet it every step."""
    return torch.tensor(bias, dtype=torch.float64)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow], idx: list[int]) -> Callable[[], None] | None:
    """In place: each of rows[idx]'s `logit_bias` added to its logits, in one scatter for the batch (ids outside the
    vocabulary skipped: the API refuses them, and indexing them would fail the step). Returns what puts the biased
    logits back as they were (None: nothing was biased), as `mask_stop_tokens` does."""
    vocab = logits.shape[1]
    row_ids, pairs = [], []
    for i in idx:
        table = _bias_table(rows[i].sampling.logit_bias)
        row_ids.append(torch.full((len(table),), i, dtype=torch.int64))
        pairs.append(table)
    table = torch.cat(pairs)
    ids = table[:, 0].to(torch.int64)
    keep = ids < vocab
    dev = logits.device
    at = (torch.cat(row_ids)[keep].to(dev), ids[keep].to(dev))
    if at[1].numel() == 0:
        return None
    saved = logits[at]
    logits.index_put_(at, table[keep, 1].to(dtype=logits.dtype, device=dev), accumulate=True)

    def unbias() -> None:
        logits.index_put_(at, saved)

    return unbias


def mask_stop_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], idx: list[int],
                     eos_token_ids: Collection[int]) -> Callable[[], None] | None:
    """In place: logit -inf for EOS and stop token ids of rows[idx] (those still below min_tokens). Returns what
    puts the masked logits back as they were (None: nothing was masked): a few values, where copying the logits to
    keep the caller's would move all of them."""
    vocab = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i in idx:
        # ids outside the vocabulary cannot be sampled anyway; indexing them would fail the step
        banned = [t for t in {*eos_token_ids, *rows[i].sampling.stop_token_ids} if t < vocab]
        row_ids.extend([i] * len(banned))
        token_ids.extend(banned)
    if not token_ids:
        return None
    # one scatter for the whole batch: (row, token) pairs -> -inf
    dev = logits.device
    at = (torch.tensor(row_ids, device=dev), torch.tensor(token_ids, device=dev))
    saved = logits[at]
    logits.index_put_(at, torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))

    def unmask() -> None:
        logits.index_put_(at, saved)

    return unmask


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows [R, V] (none greedy) -> probabilities [R, V]."""
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device).unsqueeze(1)
    logits = logits / temps
    neg = torch.finfo(logits.dtype).min
    top_k = [p.top_k for p in params]
    if any(top_k):
        k = torch.tensor([k if k else logits.shape[1] for k in top_k], device=logits.device).clamp(max=logits.shape[1])
        kth = torch.sort(logits, dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, neg)
    probs = torch.softmax(logits, dim=1)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    if bool((top_p < 1).any()):
        sorted_p, order = torch.sort(probs, dim=1, descending=True)
        # keep a token while the mass before it is < top_p (the top token always stays)
        drop_sorted = (sorted_p.cumsum(1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0)
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(1, keepdim=True).values, 0)
    return probs / probs.sum(1, keepdim=True)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.return_types.topk | None]:
    """Rows of raw logits [R, V] -> each row's logprob of its token in `tokens` [R] and the `k` most likely (None
    for k = 0), left on the logits' device (the caller reads them back when it waits anyway)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return logp.gather(1, tokens.unsqueeze(1)).squeeze(1), (logp.topk(k, dim=1) if k else None)


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Collection[int] = (),
           grammar_mask: Callable[[torch.Tensor], None] | None = None) -> list[SampleResult]:
    """logits: [S, V] float32, one row per request to sample -> one SampleResult per row.
    `eos_token_ids`: the ids that end a request, masked with its stop ids while it is below min_tokens.
    A row's `logit_bias` is added after its penalties, before everything else.
    `grammar_mask(logits)`: sets -inf, in place, on every token the response format of a constrained row does not
    allow; it runs after the penalties and before greedy and random choice alike (logprobs stay the model's)."""
    raw = logits
    params = [r.sampling for r in rows]
    pen = [i for i, p in enumerate(params) if p.needs_penalties]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    # rows below min_tokens: usually none, so the common step builds no mask at all
    short = [i for i, p in enumerate(params) if len(rows[i].output_token_ids) < p.min_tokens]
    # raw stays the model's, for logprobs and the caller; the logit biases and the stop-token mask of rows below
    # min_tokens (often every row: a copy of all the logits would cost more than the rest of sampling) are put back
    # after the draws instead
    if pen or (grammar_mask is not None and any(p.logprobs is not None for p in params)):
        logits = logits.clone()
    if pen:
        apply_penalties(logits, rows, pen)
    unbias = apply_logit_bias(logits, rows, biased) if biased else None
    unmask = mask_stop_tokens(logits, rows, short, eos_token_ids) if short else None
    if grammar_mask is not None:
        grammar_mask(logits)
    tokens = native.argmax_rows(logits) if logits.is_cpu else None  # one C pass (torch's: ~5x longer)
    if tokens is None:
        tokens = logits.argmax(1)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        probs = filter_logits(logits[rand], [params[i] for i in rand])
        for j, i in enumerate(rand):
            gen = torch.Generator(device=probs.device).manual_seed(step_seed(rows[i].seed, len(rows[i].output_token_ids)))
            # Exponential race: argmax p / E with E ~ Exp(1) draws a token with probability p.
            noise = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=gen)
            tokens[i] = (probs[j] / noise).argmax()
    if logits is raw:  # in the reverse order: the stop mask saved biased values
        if unmask is not None:
            unmask()
        if unbias is not None:
            unbias()
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:  # computed batched on the logits' device, read back after the tokens (no sync per row)
        chosen, top = token_logprobs(raw[want], tokens[want], max(params[i].logprobs for i in want))
    token_list = tokens.tolist()  # the step's one wait on the device
    results = [SampleResult(t) for t in token_list]
    if want:
        chosen_list = chosen.tolist()
        top_vals, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        for j, i in enumerate(want):
            res = results[i]
            res.logprob = chosen_list[j]
            n = params[i].logprobs
            if n:
                res.top_logprobs = list(zip(top_ids[j][:n], top_vals[j][:n]))
    return results
