"""Segmented LoRA (SGMV): the torch implementation (CPU path and test oracle).

The tokens of a step are grouped so that each adapter's tokens form contiguous segments
`[start, end)`; segment slot -1 means "no adapter" and is skipped. For one (possibly fused) projection
with per-slot weights `A^T: [in, r_slot]` and `B^T: [r_slot, out]` (the LoRA scale already folded into
B), every segment gets `y[start:end] += (x[start:end] @ A^T) @ B^T`: a shrink then an expand, each at
the slot's own rank, so a batch of mixed ranks does no work for ranks it does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SlotWeights = tuple[torch.Tensor, torch.Tensor] | None  # (A^T [in, r], B^T [r, out]) or no LoRA
FEW_SEGMENTS = 4  # more segments than this run their small products on one thread


class SlicedWeights(tuple):
    """(A^T, B^T) of a fused projection group (q/k/v, gate/up), knowing its block-diagonal layout.

    Output slice i is columns `[sum(outs[:i]), sum(outs[:i + 1]))` of B^T; it is fed by the next `ranks[i]`
    rank rows (0: that projection has no LoRA). Every other entry of B^T is zero, so an expand that knows
    the slices reads only the diagonal blocks. Unpacks like a plain `(A^T, B^T)` pair.
    """

    ranks: tuple[int, ...]
    outs: tuple[int, ...]

    def __new__(cls, a_t: torch.Tensor, b_t: torch.Tensor, ranks: Sequence[int], outs: Sequence[int]
                ) -> SlicedWeights:
        self = super().__new__(cls, (a_t, b_t))
        self.ranks, self.outs = tuple(int(r) for r in ranks), tuple(int(o) for o in outs)
        if len(self.ranks) != len(self.outs) or min(self.ranks, default=-1) < 0 or min(self.outs, default=0) <= 0:
            raise ValueError(f"LoRA slices need one rank >= 0 per output size > 0, got ranks {self.ranks}, "
                             f"outputs {self.outs}")
        if (sum(self.ranks), sum(self.outs)) != tuple(b_t.shape) or a_t.shape[-1] != b_t.shape[0]:
            raise ValueError(f"LoRA slices (ranks {self.ranks}, outputs {self.outs}) do not tile A^T "
                             f"{list(a_t.shape)} and B^T {list(b_t.shape)}")
        return self

    def __getnewargs__(self) -> tuple:  # copy and pickle rebuild through __new__, slices included
        return (self[0], self[1], self.ranks, self.outs)


@dataclass(frozen=True)
class LoraSegments:
    """Contiguous token ranges per adapter slot in one step's batch."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    slots: tuple[int, ...]  # -1 = no adapter

    @staticmethod
    def from_token_slots(token_slots: Sequence[int]) -> LoraSegments:
        """Runs of equal slot ids in token order -> segments (slot -1 runs are kept, and skipped later)."""
        starts, ends, slots = [], [], []
        for i, s in enumerate(token_slots):
            if not slots or s != slots[-1]:
                if slots:
                    ends.append(i)
                starts.append(i)
                slots.append(s)
        if slots:
            ends.append(len(token_slots))
        return LoraSegments(tuple(starts), tuple(ends), tuple(slots))

    @property
    def any_lora(self) -> bool:
        return any(s >= 0 for s in self.slots)


def check_segments(seg: LoraSegments, num_tokens: int, num_slots: int) -> None:
    """Validate segment geometry against the batch and slot table (a bad table must not read garbage)."""
    if not (len(seg.starts) == len(seg.ends) == len(seg.slots)):
        raise ValueError("LoRA segments: starts, ends and slots must have the same length")
    prev = 0
    for s0, s1, slot in zip(seg.starts, seg.ends, seg.slots):
        if not prev <= s0 <= s1 <= num_tokens:
            raise ValueError(f"LoRA segment [{s0}, {s1}) is out of order or outside the batch of {num_tokens} tokens")
        if not -1 <= slot < num_slots:
            raise ValueError(f"LoRA segment slot {slot} is out of range: must be -1 or in [0, {num_slots})")
        prev = s1


def sgmv_torch_(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, weights: Sequence[SlotWeights]) -> torch.Tensor:
    """In place: y [T, out] += per-segment LoRA delta of x [T, in]; returns y.

    The deltas are computed in the weights' dtype (float32 on the CPU path: these products are tiny,
    and small bfloat16 matmuls cost several times more per call than float32 ones here), then added
    to y once.
    """
    threads = torch.get_num_threads()
    if threads > 1 and len(seg.slots) > FEW_SEGMENTS:
        # Each product here is a few microseconds of work: a parallel region per call costs more than
        # it saves, so many small segments run on one thread.
        torch.set_num_threads(1)
    try:
        delta = _segment_deltas(y, x, seg, weights)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    if delta is not None and delta is not y:
        y += delta.to(y.dtype)
    return y


def _segment_deltas(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments,
                    weights: Sequence[SlotWeights]) -> torch.Tensor | None:
    """The summed deltas (y itself when dtypes agree, else a new buffer), or None if no segment has LoRA."""
    delta = xw = None
    for s0, s1, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot < 0 or s0 == s1:
            continue
        w = weights[slot]
        if w is None:  # this adapter does not target this projection (or this layer)
            continue
        a_t, b_t = w
        if delta is None:
            xw = x.to(a_t.dtype)
            delta = y if y.dtype == a_t.dtype else torch.zeros(y.shape, dtype=a_t.dtype, device=y.device)
        # shrink [n, in] @ [in, r] -> [n, r]; expand [n, r] @ [r, out] accumulated into the rows
        delta[s0:s1].addmm_(xw[s0:s1] @ a_t, b_t)
    return delta


def sgmv_reference(x: torch.Tensor, seg: LoraSegments, a: Sequence[torch.Tensor | None],
                   b: Sequence[torch.Tensor | None], scales: Sequence[float]) -> torch.Tensor:
    """Plain fp32 oracle in PEFT's own layout: per token, scale * (x @ A.T) @ B.T with A [r, in], B [out, r]."""
    out_dim = next(t.shape[0] for t in b if t is not None)
    y = torch.zeros(x.shape[0], out_dim, dtype=torch.float32)
    for s0, s1, slot in zip(seg.starts, seg.ends, seg.slots):
        if slot < 0 or a[slot] is None:
            continue
        for t in range(s0, s1):
            y[t] = scales[slot] * ((x[t].float() @ a[slot].float().T) @ b[slot].float().T)
    return y
