"""Which device the runtime runs on, and moving a step's small metadata there.

`--device cpu | cuda | cuda:N | auto` (auto: the first CUDA device when there is one, else the CPU). Every
tensor the model reads lives there: weights, the KV arena, rope tables, LoRA slots, the sampler's tensors and
each step's metadata. What only CUDA can run (pinned staging, side streams, memory sizing) is in
`service.runtime.cuda`, imported only for a CUDA device.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(spec: str) -> torch.device:
    """The torch device `spec` names; ValueError naming what is wrong (no CUDA, no such GPU, a typo)."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is invalid: use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {spec!r} is not supported: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asks for CUDA, but this torch build ({torch.__version__}) sees no CUDA "
                         "device: use --device cpu, or install a CUDA build of torch on a GPU machine")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """A name for logs and bench results: "cpu" or the GPU's name."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


class StepStager:
    """Turns a step's integer lists (token ids, positions, slot mapping) into tensors on the device with one
    host-to-device copy: on the CPU they are built in place; on CUDA they go through a pinned buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = None
        if device.type == "cuda":
            from service.runtime.cuda import PinnedBuffer

            self._pinned = PinnedBuffer(device)

    def int64(self, *lists: list[int]) -> list[torch.Tensor]:
        if self._pinned is None:
            return [torch.tensor(v, dtype=torch.int64) for v in lists]
        return self._pinned.upload(lists)
