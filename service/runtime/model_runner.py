"""Turns one scheduler step into tensors on the model's device, runs the model over the paged KV arena,
samples. Host-to-device traffic per step is the step's small integer metadata, in one copy; the sampled
token ids coming back are the step's one wait on the device."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

import torch

from kernels.ops import AttentionPlan, LoraSegments
from service.engine.types import SampleResult, SchedulerOutput
from service.runtime.device import StepStager
from service.runtime.lora import LoraSlots
from service.runtime.model import KVCache, LlamaModel, LoraStep
from service.runtime.sampler import DraftRow, SamplingRow, sample, token_logprobs

if TYPE_CHECKING:
    from service.runtime.graphs import Capture, DecodeGraphs
    from service.runtime.structured import GrammarMasks


class ModelRunner:
    """Implements the engine's `ModelRunnerLike` protocol on one `LlamaModel`.

    `eos_token_ids`: the ids that end a request, the engine's (the tokenizer's) EOS set; the sampler
    keeps them, and each request's stop ids, from being sampled while it is below min_tokens. Required,
    since a runner without them would let a request below min_tokens emit EOS.
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, max_model_len: int,
                 lora_slots: LoraSlots | None = None, *, eos_token_ids: Iterable[int],
                 decode_capture: Capture | None = None, max_decode_batch: int = 0, max_lora_rank: int = 0) -> None:
        """`decode_capture`: run decode steps of up to `max_decode_batch` sequences at fixed shapes, replayed
        through it (`service.runtime.graphs`; the Triton backend); the arena then holds one more block than
        `num_blocks`, for padding rows."""
        if max_model_len > model.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's rope table ({model.max_model_len})")
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = model.arch.vocab_size
        self.device = model.device
        scratch = 1 if decode_capture is not None else 0
        self.kv = KVCache(model.arch, num_blocks + scratch, block_size, model.dtype, device=self.device)
        self.lora_slots = lora_slots
        self.graphs: DecodeGraphs | None = None
        if decode_capture is not None:
            from service.runtime.graphs import DecodeGraphs  # imports the Triton kernels

            self.graphs = DecodeGraphs(model, self.kv, num_blocks, block_size, max_model_len, max_decode_batch,
                                       decode_capture, lora_slots, max_lora_rank)
        self._stage = StepStager(self.device)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._masks: GrammarMasks | None = None  # made on the first step with a constrained row

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[SampleResult | list[SampleResult] | None]:
        chunks = out.chunks
        bs = self.block_size
        # Single-token chunks (decodes) first: they share one batched attention call. Within each
        # kind, chunks of one adapter slot are adjacent, so each adapter's tokens form one LoRA segment.
        # A verify pass (a decode with drafts) counts as decodes: each of its positions is attended as a decode
        # at that position over the same block table (every token's K/V is written before attention reads), so
        # it takes the decode kernels, batched with the other decodes, under its request's adapter segment.
        order = sorted(range(len(chunks)), key=lambda i: (chunks[i].num_tokens != 1 and not chunks[i].draft_token_ids,
                                                          chunks[i].request.lora_slot))
        token_slots: list[int] = []
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []  # where each new token's K/V goes in the arena
        tables, starts, lens = [], [], []
        # Rows of the hidden states to sample, and for each the chunk and the sampling row (a request, or for a
        # verify pass one row per position: the request as if the drafts before it were accepted).
        sample_rows: list[int] = []
        rows: list[SamplingRow] = []
        owners: list[int] = []
        # Prompt positions whose logits give prompt logprobs a request still lacks: (request, rows, next tokens).
        prompt_lp: list[tuple[SamplingRow, list[int], list[int]]] = []
        for i in order:
            c = chunks[i]
            r = c.request
            drafts = c.draft_token_ids
            if r.sampling.prompt_logprobs is not None and not drafts:
                # position p's logits give prompt token p + 1's logprob; it has them for positions below len(...)
                first = max(c.start, len(r.prompt_logprobs))
                last = min(c.start + c.num_tokens, r.num_prompt_tokens - 1)
                if first < last:
                    prompt_lp.append((r, list(range(len(ids) + first - c.start, len(ids) + last - c.start)),
                                      r.prompt_token_ids[first + 1:last + 1]))
            ids.extend(r.all_token_ids[c.start : c.start + c.num_tokens - len(drafts)])
            ids.extend(drafts)
            table = r.block_ids
            for p in range(c.start, c.start + c.num_tokens):
                positions.append(p)
                slot_mapping.append(table[p // bs] * bs + p % bs)
            if drafts:
                tables.extend([table] * c.num_tokens)
                starts.extend(range(c.start, c.start + c.num_tokens))
                lens.extend([1] * c.num_tokens)
            else:
                tables.append(table)
                starts.append(c.start)
                lens.append(c.num_tokens)
            token_slots.extend([r.lora_slot] * c.num_tokens)
            if drafts:
                first = len(ids) - c.num_tokens
                out_ids = r.output_token_ids
                for j in range(c.num_tokens):
                    sample_rows.append(first + j)
                    rows.append(r if j == 0 else DraftRow(r, [*out_ids, *drafts[:j]]))
                    owners.append(i)
            elif c.sample:
                sample_rows.append(len(ids) - 1)
                rows.append(r)
                owners.append(i)
        # Constrained rows' token masks are filled on a worker thread while the forward pass runs.
        filled = self._grammar_masks().start(rows, len(rows)) if any(r.grammar is not None for r in rows) else None
        graphs = self.graphs
        if graphs is not None and graphs.fits(len(chunks)) and len(ids) == len(chunks) and not prompt_lp:  # decodes only
            if self.lora_slots is not None:
                self.lora_slots.ready()
            logits = graphs.run(ids, positions, slot_mapping, tables, token_slots)
            if rows:
                picked = sample_rows == list(range(len(sample_rows)))
                logits = logits[: len(rows)] if picked else logits[self._stage.int64(sample_rows)[0]]
        else:
            ids_t, pos_t, slots_t, rows_t = self._stage.int64(ids, positions, slot_mapping, sample_rows)
            plan = AttentionPlan.build(tables, starts, lens, bs, self.device, slot_mapping=slots_t)
            lora = None
            if self.lora_slots is not None:
                segments = LoraSegments.from_token_slots(token_slots)
                if segments.any_lora:
                    self.lora_slots.ready()
                    lora = LoraStep(segments, self.lora_slots.table, self.lora_slots.version)
            hidden = self.model.forward(ids_t, pos_t, plan, self.kv, lora)
            if rows:
                logits = self.model.compute_logits(hidden[rows_t])
            if prompt_lp:
                self._prompt_logprobs(hidden, prompt_lp)
        results: list[SampleResult | list[SampleResult] | None] = [None] * len(chunks)
        if rows:
            mask = None if filled is None else partial(self._masks.apply, filled=filled)
            for i, res in zip(owners, sample(logits, rows, self.eos_token_ids, mask), strict=True):
                if chunks[i].draft_token_ids:
                    prev = results[i]
                    if prev is None:
                        results[i] = prev = []
                    assert isinstance(prev, list)
                    prev.append(res)
                else:
                    results[i] = res
        return results

    PROMPT_LOGPROB_ROWS = 128  # rows of the LM head per pass: [128, vocab] float32 logits at a time

    def _prompt_logprobs(self, hidden: torch.Tensor, wanted: list[tuple[SamplingRow, list[int], list[int]]]) -> None:
        """Append to each request's `prompt_logprobs` the logprob of the prompt token after each of its positions
        `rows` computed (log-softmax of the model's raw logits there) and its `prompt_logprobs` leading
        alternatives, in passes of PROMPT_LOGPROB_ROWS rows."""
        for r, rows, targets in wanted:
            k = r.sampling.prompt_logprobs
            for at in range(0, len(rows), self.PROMPT_LOGPROB_ROWS):
                sl = slice(at, at + self.PROMPT_LOGPROB_ROWS)
                # (not the step stager: its pinned buffers may still be in flight; this path is rare)
                rows_t = torch.tensor(rows[sl], dtype=torch.int64, device=hidden.device)
                tgt_t = torch.tensor(targets[sl], dtype=torch.int64, device=hidden.device)
                chosen, top = token_logprobs(self.model.compute_logits(hidden[rows_t]), tgt_t, k)
                tops = [list(zip(ids, vals)) for ids, vals in zip(top.indices.tolist(), top.values.tolist())] \
                    if top is not None else [None] * len(rows_t)
                r.prompt_logprobs.extend(SampleResult(t, lp, tp) for t, lp, tp in zip(targets[sl], chosen.tolist(),
                                                                                      tops))

    def _grammar_masks(self) -> GrammarMasks:
        if self._masks is None:
            from service.runtime.structured import GrammarMasks

            self._masks = GrammarMasks(self.vocab_size, self.device)
        return self._masks
