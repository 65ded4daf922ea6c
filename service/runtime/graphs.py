"""Decode steps at fixed shapes, captured once and replayed: CUDA graphs on a GPU.

Once every value a decode step reads sits in a buffer of fixed address (token ids, positions, K/V slots, each
sequence's context length and block table, the LoRA tiles, the adapter slots' tables), the kernels a step
launches depend on its batch size alone. `DecodeGraphs` keeps those buffers sized for the largest batch,
pads a step's sequences up to the next bucket size and runs the model's forward pass and logits over the
bucket by *replaying* what was captured for that (bucket, with or without LoRA): on CUDA a CUDA graph
(`service.runtime.cuda.CudaGraphCapture`: one launch for the whole step instead of a few thousand from
Python); elsewhere the captured function is simply called again (`eager_capture`), which is how the CPU
proves, through the Triton interpreter, that the padded fixed-shape step computes the dynamic step's tokens.

Padding rows decode token 0 at position 0 with no adapter; their K/V go to a scratch block of the arena that
no sequence owns, and their logits are never read. Prefill, mixed and speculative steps run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog
import torch

from kernels.attention import AttentionPlan
from kernels.triton.attention import static_decodes
from kernels.triton.common import MIN_DOT, float_dtype
from kernels.triton.sgmv import SlotTables, static_tile_capacity, static_tiles
from service.runtime.lora import GROUPS, LoraSlots
from service.runtime.model import KVCache, LlamaModel, LoraStep

log = structlog.get_logger(__name__)

StepFn = Callable[[], torch.Tensor]
# Turns a step function into its replay: called once per (bucket, LoRA or not), before the first replay.
Capture = Callable[[StepFn], StepFn]


def eager_capture(fn: StepFn) -> StepFn:
    """Replay by calling again: the same fixed-shape step, without a graph (the CPU, the tests)."""
    return fn


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes captured: powers of two below `max_batch`, and `max_batch`."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    """Fixed-shape decode steps of `model` over `kv`, whose last block (`scratch_block`) is kept for padding
    rows and owned by no sequence. `max_lora_rank` bounds an adapter module's rank (the slots' tables are
    sized for it)."""

    def __init__(self, model: LlamaModel, kv: KVCache, scratch_block: int, block_size: int, max_model_len: int,
                 max_batch: int, capture: Capture, lora_slots: LoraSlots | None = None,
                 max_lora_rank: int = 0) -> None:
        if model.kernels.name != "triton":
            raise ValueError(f"fixed-shape decode steps need the Triton kernels, the model has {model.kernels.name}")
        if not 0 <= scratch_block < kv.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is outside the arena of {kv.num_blocks} blocks")
        if lora_slots is not None and max_lora_rank < 1:
            raise ValueError(f"max_lora_rank={max_lora_rank}: LoRA slots need a rank bound to size their tables")
        self.model, self.kv, self.capture = model, kv, capture
        self.block_size, self.scratch_block = block_size, scratch_block
        self.buckets = decode_buckets(max_batch)
        self.max_batch = max_batch
        self.lora_slots = lora_slots
        dev = model.device
        width = -(-max_model_len // block_size)
        slots = lora_slots.max_active if lora_slots is not None else 0
        self._tile_cap = {b: static_tile_capacity(b, slots) for b in self.buckets}
        b = max_batch
        # One int64 buffer for every per-step value (one copy to the device per step), and its fields.
        self._sizes = {"ids": b, "positions": b, "slots": b, "seqs": 3 * b, "tables": width * b,
                       "tiles": 3 * self._tile_cap[b]}
        total = sum(self._sizes.values())
        self._dev = torch.zeros(total, dtype=torch.int64, device=dev)
        self._host = self._dev if dev.type == "cpu" else torch.zeros(total, dtype=torch.int64, pin_memory=True)
        self._fields_host = self._fields(self._host, width)
        self._fields_dev = self._fields(self._dev, width)
        for fields in (self._fields_host, self._fields_dev):  # until a step fills them: every row is padding
            fields["slots"].fill_(scratch_block * block_size)
            fields["tables"][:, 0] = scratch_block
        rows = torch.arange(b, dtype=torch.int64)
        self._decode_tiles = torch.stack([rows, torch.zeros_like(rows)], 1).to(dev)  # (row, first token)
        self._tables = self._slot_tables(lora_slots, max_lora_rank) if lora_slots is not None else None
        self._tables_version = -1
        self._replays: dict[tuple[int, bool], StepFn] = {}
        self.steps: dict[int, int] = {}  # bucket -> steps replayed

    def _fields(self, flat: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
        parts = dict(zip(self._sizes, flat.split(list(self._sizes.values())), strict=True))
        parts["seqs"] = parts["seqs"].view(-1, 3)
        parts["tables"] = parts["tables"].view(-1, width)
        parts["tiles"] = parts["tiles"].view(-1, 3)
        return parts

    def _slot_tables(self, lora_slots: LoraSlots, max_rank: int) -> list[dict[str, SlotTables]]:
        """Per layer and group, the slots' tables in one device buffer (rewritten when the slots change)."""
        arch, slots = self.model.arch, lora_slots.max_active
        shapes = arch.linear_shapes()
        outs = {g: tuple(shapes[m][0] for m in mods) for g, mods in GROUPS.items()}
        sizes = [sum(SlotTables.sizes(slots, len(outs[g]))) for g in GROUPS]
        flat = torch.zeros(arch.num_layers * sum(sizes), dtype=torch.int64, device=self.model.device)
        w_dtype = float_dtype(torch.empty(0, dtype=self.model.dtype), "LoRA weights")
        per_layer = flat.split(sum(sizes))
        return [{g: SlotTables.views(part, slots, outs[g], max_rank * len(GROUPS[g]), MIN_DOT, MIN_DOT, w_dtype)
                 for g, part in zip(GROUPS, layer_flat.split(sizes), strict=True)}
                for layer_flat in per_layer]

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def capture_all(self) -> None:
        """Capture every bucket now (at start), rather than on its first step; the largest first, so that the
        smaller ones reuse its memory in the shared pool."""
        for b in reversed(self.buckets):
            for lora in (False, True) if self._tables is not None else (False,):
                self._replay(b, lora)

    def run(self, ids: Sequence[int], positions: Sequence[int], slot_mapping: Sequence[int],
            tables: Sequence[Sequence[int]], token_slots: Sequence[int]) -> torch.Tensor:
        """One decode step of `len(ids)` sequences (sequence i: token ids[i] at positions[i], K/V to
        slot_mapping[i], blocks tables[i], adapter slot token_slots[i], -1 for none; sequences of one slot
        adjacent): the logits of its bucket's rows, [bucket, vocab] float32, valid until the next run."""
        n = len(ids)
        b = self.bucket(n)
        h = self._fields_host
        pad = b - n
        scratch_slot = self.scratch_block * self.block_size
        h["ids"][:b] = torch.tensor([*ids, *[0] * pad], dtype=torch.int64)
        h["positions"][:b] = torch.tensor([*positions, *[0] * pad], dtype=torch.int64)
        h["slots"][:b] = torch.tensor([*slot_mapping, *[scratch_slot] * pad], dtype=torch.int64)
        seqs = [v for i, p in enumerate(positions) for v in (i, 1, p)] + [v for i in range(n, b) for v in (i, 1, 0)]
        h["seqs"][:b] = torch.tensor(seqs, dtype=torch.int64).view(b, 3)
        table = h["tables"]
        bs = self.block_size
        for i, (t, p) in enumerate(zip(tables, positions, strict=True)):
            used = p // bs + 1  # blocks in context; columns past them are never read
            table[i, :used] = torch.tensor(t[:used], dtype=torch.int64)
        table[n:b, 0] = self.scratch_block
        lora = self._tables is not None and any(s >= 0 for s in token_slots)
        if lora:
            segments, start = [], 0
            for i in range(1, n + 1):
                if i == n or token_slots[i] != token_slots[start]:
                    segments.append((start, i, token_slots[start]))
                    start = i
            cap = self._tile_cap[b]
            h["tiles"][:cap] = torch.tensor(static_tiles(segments, cap), dtype=torch.int64).view(cap, 3)
            self._refresh_tables()
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)
        out = self._replay(b, lora)()
        self.steps[b] = self.steps.get(b, 0) + 1
        return out

    def _refresh_tables(self) -> None:
        assert self.lora_slots is not None and self._tables is not None
        if self.lora_slots.version == self._tables_version:
            return
        for layer, groups in enumerate(self._tables):
            for g, t in groups.items():
                t.fill(self.lora_slots.table[layer][g])
        self._tables_version = self.lora_slots.version

    def _replay(self, b: int, lora: bool) -> StepFn:
        hit = self._replays.get((b, lora))
        if hit is None:
            hit = self._replays[(b, lora)] = self.capture(self._step_fn(b, lora))
        return hit

    def _step_fn(self, b: int, lora: bool) -> StepFn:
        """The forward pass and logits of bucket `b`, reading nothing but the fixed buffers."""
        f = self._fields_dev
        plan = AttentionPlan(f["slots"][:b], [], [], [], self.block_size)
        static_decodes(plan, f["seqs"][:b], f["tables"][:b], self._decode_tiles[:b], self.scratch_block)
        step = LoraStep(f["tiles"][: self._tile_cap[b]], self._tables) if lora else None
        model, kv = self.model, self.kv

        def fn() -> torch.Tensor:
            hidden = model.forward(f["ids"][:b], f["positions"][:b], plan, kv, step)
            return model.compute_logits(hidden)

        return fn
