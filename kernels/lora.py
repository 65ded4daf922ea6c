"""Segmented LoRA (SGMV): the torch implementation (CPU path and test oracle).

The tokens of a step are grouped so that each adapter's tokens form contiguous segments
`[start, end)`; segment slot -1 means "no adapter" and is skipped. For one (possibly fused) projection
with per-slot weights `A^T: [in, r_slot]` and `B^T: [r_slot, out]` (the LoRA scale already folded into
B), every segment gets `y[start:end] += (x[start:end] @ A^T) @ B^T`: a shrink then an expand, each at
the slot's own rank, so a batch of mixed ranks does no work for ranks it does not have.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import native
from kernels.cpu_features import matmul_dtype, native_bf16

SlotWeights = tuple[torch.Tensor, torch.Tensor] | None  # (A^T [in, r], B^T [r, out]) or no LoRA
FEW_SEGMENTS = 4  # more short segments than this run their products on one thread
SHORT_SEGMENT_ROWS = 16  # a segment of at most this many tokens is "short" (decode-sized)
# Where the CPU multiplies bf16 natively and the C build has no kernel for prompt-sized segments, the C kernel
# takes segments up to this many rows (its threads split rows, so one adapter's whole decode batch is one call) and
# longer ones (prefill chunks) are torch's bf16 matrix products. Elsewhere it takes every segment: its
# register-tiled blocks of a prefill chunk (AVX2: 6 rows by 16 ranks or columns, B^T's zero blocks skipped, one
# rounding) ran a 2,048-token step of 32 adapters' LoRA 3.3x faster than torch's float32 products on the bf16
# weights converted for each; with AVX512-BF16 its entry gives segments of more than 24 rows with bf16 weights to
# the kernel for prompt-sized segments (1.7x torch's bf16 products on 32 adapters' segments of 288 rows).
NATIVE_SEGMENT_ROWS = 64


def native_segment_rows() -> int:
    """The longest segment `sgmv_cpu_` gives the C kernel on this CPU: every one where the kernel has its vector
    tiles (AVX2 or AVX-512) and either bf16 is not native or the build has the kernel for prompt-sized segments
    (AVX512-BF16); its plain-C loops, and a bf16 CPU without that kernel, leave prefill chunks to torch's matmuls."""
    if native.sgmv_path() in (None, "portable") or (native_bf16() and not native.sgmv_long_available()):
        return NATIVE_SEGMENT_ROWS
    return sys.maxsize


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

    Each segment's delta is computed in the weights' dtype and added to its own rows of y, so rows without an
    adapter cost nothing. On bfloat16 activations with bfloat16 weights (the CPU path with its C kernels, the
    GPU) the shrink and the expand-and-add are one bfloat16 product and one `addmm_` (for a prefill segment of
    128-2,048 rows on the CPU, 2-7x faster than float32 products); the CPU without C kernels holds float32
    weights (small bfloat16 matrix products cost several times more per call than float32 ones there).
    Short segments (decode) are a few microseconds of work each: a parallel region per product costs more than
    it saves, so when there are many they run on one thread; long ones (prefill chunks) keep every thread.
    """
    todo = [(s0, s1, weights[slot]) for s0, s1, slot in zip(seg.starts, seg.ends, seg.slots)
            if slot >= 0 and s1 > s0 and weights[slot] is not None]
    short = [t for t in todo if t[1] - t[0] <= SHORT_SEGMENT_ROWS]
    threads = torch.get_num_threads()
    if threads > 1 and len(short) > FEW_SEGMENTS:
        long = [t for t in todo if t[1] - t[0] > SHORT_SEGMENT_ROWS]
        torch.set_num_threads(1)
        try:
            _apply(y, x, short)
        finally:
            torch.set_num_threads(threads)
        _apply(y, x, long)
    else:
        _apply(y, x, todo)
    return y


def sgmv_cpu_(y: torch.Tensor, x: torch.Tensor, seg: LoraSegments, weights: Sequence[SlotWeights]) -> torch.Tensor:
    """The CPU path: on bfloat16 activations, segments of up to `native_segment_rows()` rows with float32 or
    bfloat16 weights go through the C kernel (`kernels.native.sgmv_`: one call for all of them, B^T's zero blocks
    skipped; with bfloat16 weights and AVX512-BF16 its segments of more than 24 rows through the kernel for
    prompt-sized segments); longer segments (prefill chunks where the CPU multiplies bf16 natively and the build has
    no such kernel) and everything the kernel cannot take go through `sgmv_torch_`. The C kernel's result is within
    one bf16 rounding of y; a long segment's with bfloat16 weights also rounds its rank-sized intermediate to
    bfloat16."""
    if y.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or native.library() is None:
        return sgmv_torch_(y, x, seg, weights)
    to_c, rest_slots = [], []
    limit = native_segment_rows()
    for s0, s1, slot in zip(seg.starts, seg.ends, seg.slots):
        w = weights[slot] if slot >= 0 else None
        if w is None or s1 <= s0:
            continue
        if s1 - s0 <= limit and w[0].dtype == w[1].dtype in (torch.float32, torch.bfloat16):
            to_c.append((s0, s1, w))
        else:
            rest_slots.append((s0, s1, slot))
    if to_c:
        outs = [w.outs if isinstance(w, SlicedWeights) else (y.shape[1],) for _, _, w in to_c]
        ranks = [w.ranks if isinstance(w, SlicedWeights) else (w[0].shape[1],) for _, _, w in to_c]
        done = len(set(outs)) == 1 and native.sgmv_(y, x, [(s0, s1) for s0, s1, _ in to_c],
                                                     [w[0] for _, _, w in to_c], [w[1] for _, _, w in to_c],
                                                     ranks, outs[0])
        if not done:
            return sgmv_torch_(y, x, seg, weights)
    if rest_slots:
        _apply(y, x, [(s0, s1, weights[slot]) for s0, s1, slot in rest_slots])
    return y


FUSED_GROUPS = ("qkv", "o", "gate_up", "down")  # the projection groups of a layer, in the fused layers' order
FUSED_MAX_SLICES = 3  # output slices a group has at most (q/k/v)


def fused_lora(seg: LoraSegments, table: Sequence[dict[str, Sequence[SlotWeights]]]
               ) -> native.FusedLoraArgs | None:
    """A step's LoRA as the fused decode layers read it (`native.FusedLoraArgs`), or None when `sgmv_cpu_` would
    not give every (layer, group) to the C kernel in one call (a segment beyond its rows, weights not contiguous,
    mixed dtypes, a group whose segments' output slices differ): the layers then run op by op. The segments without
    an adapter, or without weights in a layer or group, are left out exactly as `sgmv_cpu_` leaves them out, so
    the fused layers add the same deltas."""
    segs = [(s0, s1, slot) for s0, s1, slot in zip(seg.starts, seg.ends, seg.slots) if slot >= 0 and s1 > s0]
    limit = native_segment_rows()
    if any(s1 - s0 > limit for s0, s1, _ in segs):
        return None
    ptrs: list[int] = []
    ranks: list[int] = []
    outs: list[tuple[int, ...] | None] = [None] * len(FUSED_GROUPS)
    dtypes = set()
    pad = [0] * FUSED_MAX_SLICES
    for layer in table:
        for g, name in enumerate(FUSED_GROUPS):
            ws = layer[name]
            for _, _, slot in segs:
                w = ws[slot]
                if w is None:
                    ptrs += (0, 0)
                    ranks += pad
                    continue
                a_t, b_t = w
                if not (a_t.is_contiguous() and b_t.is_contiguous()):
                    return None
                o = w.outs if isinstance(w, SlicedWeights) else (b_t.shape[1],)
                r = w.ranks if isinstance(w, SlicedWeights) else (a_t.shape[1],)
                if outs[g] is None:
                    outs[g] = o
                elif outs[g] != o:
                    return None
                dtypes.add(a_t.dtype)
                dtypes.add(b_t.dtype)
                ptrs += (a_t.data_ptr(), b_t.data_ptr())
                ranks += (*r, *pad[len(r):])
    if not segs or not dtypes:
        return native.FusedLoraArgs.none()
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16):
        return None
    if any(len(o or ()) > FUSED_MAX_SLICES for o in outs):
        return None
    nslices = [len(o) if o else 1 for o in outs]
    flat_outs = [v for o in outs for v in (*(o or (0,)), *pad[len(o or (0,)):])]
    return native.FusedLoraArgs(
        len(segs), torch.tensor([s0 for s0, _, _ in segs], dtype=torch.int64),
        torch.tensor([s1 for _, s1, _ in segs], dtype=torch.int64), torch.tensor(ptrs, dtype=torch.int64),
        torch.tensor(ranks, dtype=torch.int64), torch.tensor(nslices, dtype=torch.int64),
        torch.tensor(flat_outs, dtype=torch.int64), next(iter(dtypes)) == torch.bfloat16)


def _apply(y: torch.Tensor, x: torch.Tensor, segments: Sequence[tuple[int, int, SlotWeights]]) -> None:
    for s0, s1, w in segments:
        a_t, b_t = w  # type: ignore[misc]  # filtered: never None here
        mm = matmul_dtype(a_t)
        if mm != a_t.dtype:  # bf16 weights on a CPU without native bf16: the products in float32
            y[s0:s1] += ((x[s0:s1].to(mm) @ a_t.to(mm)) @ b_t.to(mm)).to(y.dtype)
            continue
        xs = x[s0:s1].to(a_t.dtype)
        if y.dtype == a_t.dtype:  # shrink [n, in] @ [in, r] -> [n, r]; expand into the rows, fused
            y[s0:s1].addmm_(xs @ a_t, b_t)
        else:
            y[s0:s1] += (xs @ a_t) @ b_t


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
