"""Turns one scheduler step into tensors, runs the model over the paged KV arena, samples."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kernels.ops import AttentionPlan, LoraSegments
from service.engine.types import SampleResult, SchedulerOutput
from service.runtime.lora import LoraSlots
from service.runtime.model import KVCache, LlamaModel, LoraStep
from service.runtime.sampler import sample


class ModelRunner:
    """Implements the engine's `ModelRunnerLike` protocol on one `LlamaModel`.

    `eos_token_ids`: the ids that end a request, the engine's (the tokenizer's) EOS set; the sampler
    keeps them, and each request's stop ids, from being sampled while it is below min_tokens. Required,
    since a runner without them would let a request below min_tokens emit EOS.
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, max_model_len: int,
                 lora_slots: LoraSlots | None = None, *, eos_token_ids: Iterable[int]) -> None:
        if max_model_len > model.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's rope table ({model.max_model_len})")
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = model.arch.vocab_size
        self.kv = KVCache(model.arch, num_blocks, block_size, model.dtype)
        self.lora_slots = lora_slots
        self.eos_token_ids = frozenset(eos_token_ids)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[SampleResult | None]:
        chunks = out.chunks
        # Single-token chunks (decodes) first: they share one batched attention call. Within each
        # kind, chunks of one adapter slot are adjacent, so each adapter's tokens form one LoRA segment.
        order = sorted(range(len(chunks)), key=lambda i: (chunks[i].num_tokens != 1, chunks[i].request.lora_slot))
        token_slots: list[int] = []
        ids: list[int] = []
        positions: list[int] = []
        tables, starts, lens = [], [], []
        last_row: dict[int, int] = {}
        for i in order:
            c = chunks[i]
            r = c.request
            tokens = r.all_token_ids[c.start : c.start + c.num_tokens]
            ids.extend(tokens)
            positions.extend(range(c.start, c.start + c.num_tokens))
            tables.append(r.block_ids)
            starts.append(c.start)
            lens.append(c.num_tokens)
            token_slots.extend([r.lora_slot] * c.num_tokens)
            if c.sample:
                last_row[i] = len(ids) - 1
        plan = AttentionPlan.build(tables, starts, lens, self.block_size)
        lora = None
        if self.lora_slots is not None:
            segments = LoraSegments.from_token_slots(token_slots)
            if segments.any_lora:
                lora = LoraStep(segments, self.lora_slots.table)
        hidden = self.model.forward(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                                    plan, self.kv, lora)
        results: list[SampleResult | None] = [None] * len(chunks)
        if last_row:
            idx = list(last_row)
            logits = self.model.compute_logits(hidden[torch.tensor([last_row[i] for i in idx])])
            for i, res in zip(idx, sample(logits, [chunks[i].request for i in idx], self.eos_token_ids)):
                results[i] = res
        return results
