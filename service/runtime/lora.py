"""LoRA weights in the layout the model consumes, and the active-slot table the batch reads from.

The model fuses q/k/v into one matmul and gate/up into another, so an adapter is laid out per layer
and per fused group: `A^T = [A_q^T | A_k^T | A_v^T]` ([in, r_q + r_k + r_v]) and a block-diagonal
`B^T` ([r_total, out_q + out_k + out_v]) with each module's scale folded in, held as `SlicedWeights` so
a kernel can skip the zero blocks. One shrink and one expand per group then apply every targeted module
of that group at once; untargeted modules simply have no rows. Heterogeneous ranks cost nothing extra:
each slot keeps its own rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapters.peft_format import ParsedAdapter
from kernels.lora import SlicedWeights, SlotWeights
from service.runtime.arch import ModelArch

# fused group -> the projections it holds, in the model's output order
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class FusedLora:
    """One adapter version in model layout: per layer, per group, (A^T, B^T) or None."""

    version_id: str
    layers: list[dict[str, SlotWeights]]
    nbytes: int


def fuse_adapter(parsed: ParsedAdapter, arch: ModelArch, version_id: str, dtype: torch.dtype) -> FusedLora:
    shapes = arch.linear_shapes()
    layers: list[dict[str, SlotWeights]] = []
    nbytes = 0
    for layer in range(arch.num_layers):
        groups: dict[str, SlotWeights] = {}
        for group, mods in GROUPS.items():
            present = [(m, parsed.weights.get((layer, m))) for m in mods]
            if all(w is None for _, w in present):
                groups[group] = None
                continue
            in_dim = shapes[mods[0]][1]
            out_total = sum(shapes[m][0] for m in mods)
            r_total = sum(w.A.shape[0] for _, w in present if w is not None)
            a_t = torch.zeros(in_dim, r_total, dtype=torch.float32)
            b_t = torch.zeros(r_total, out_total, dtype=torch.float32)
            r_off = out_off = 0
            ranks = []
            for m, w in present:
                out_m = shapes[m][0]
                ranks.append(0 if w is None else w.A.shape[0])
                if w is not None:
                    r = w.A.shape[0]
                    a_t[:, r_off : r_off + r] = w.A.T
                    b_t[r_off : r_off + r, out_off : out_off + out_m] = (w.B * w.scale).T
                    r_off += r
                out_off += out_m
            a_t, b_t = a_t.to(dtype).contiguous(), b_t.to(dtype).contiguous()
            nbytes += a_t.nbytes + b_t.nbytes
            # the slices let a kernel skip B^T's zero blocks (the torch path reads the pair as is)
            groups[group] = SlicedWeights(a_t, b_t, ranks, [shapes[m][0] for m in mods])
        layers.append(groups)
    return FusedLora(version_id, layers, nbytes)


class LoraSlots:
    """`max_active` slots; slot i holds one adapter version's fused weights (or nothing). Which version a
    slot holds is decided by `adapters.lifecycle.AdapterVersions`; this is only the table the model reads.

    On the CPU a slot holds references to the host tier's fused tensors, so activation copies nothing;
    a device path would copy into preallocated device buffers here.
    """

    def __init__(self, arch: ModelArch, max_active: int, device: torch.device | str = "cpu") -> None:
        if max_active < 1:
            raise ValueError(f"max_active_adapters={max_active} is invalid: must be >= 1")
        self.arch = arch
        self.max_active = max_active
        self.device = torch.device(device)
        # [layer][group] -> list over slots: what one SGMV call reads
        self.table: list[dict[str, list[SlotWeights]]] = [
            {g: [None] * max_active for g in GROUPS} for _ in range(arch.num_layers)
        ]
        self.version = 0  # counts loads: what reads the table by address (graph replays) refreshes on a change
        self._copies = None  # on CUDA: adapter copies run on a side stream (service.runtime.cuda)
        if self.device.type == "cuda":
            from service.runtime.cuda import SideStream

            self._copies = SideStream(self.device)

    def load(self, slot: int, fused: FusedLora) -> None:
        """Put `fused` into `slot`: on the CPU by reference; on a device as copies (issued without waiting:
        the next step's `ready()` orders them before the model reads them)."""
        for layer, groups in enumerate(fused.layers):
            for g, w in groups.items():
                self.table[layer][g][slot] = w if w is None or self.device.type == "cpu" else self._to_device(w)
        self.version += 1

    def _to_device(self, w: SlicedWeights) -> SlicedWeights:
        copy = self._copies.copy if self._copies is not None else (lambda t: t.to(self.device))
        return SlicedWeights(copy(w[0]), copy(w[1]), w.ranks, w.outs)

    def ready(self) -> None:
        """Before a step reads the slots: the device waits for the adapter copies issued so far."""
        if self._copies is not None:
            self._copies.wait()


def fused_loader(load: Callable[[str], ParsedAdapter], arch: ModelArch, dtype: torch.dtype = torch.float32,
                 *, pin: bool = False) -> Callable[[str], FusedLora]:
    """Wrap a version-id -> ParsedAdapter loader so the host tier holds model-layout weights in `dtype`
    (`service.builder.lora_weight_dtype`); `pin`: in pinned memory, for asynchronous copies to a GPU. Runs on the
    host cache's loader threads."""
    def _load(version_id: str) -> FusedLora:
        fused = fuse_adapter(load(version_id), arch, version_id, dtype)
        if pin:
            for groups in fused.layers:
                for g, w in groups.items():
                    if w is not None:
                        groups[g] = SlicedWeights(w[0].pin_memory(), w[1].pin_memory(), w.ranks, w.outs)
        return fused
    return _load
