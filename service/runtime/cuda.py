"""What only CUDA can run: pinned staging of a step's metadata, adapter copies on a side stream, sizing the KV
arena from the GPU's memory, and capturing decode steps as CUDA graphs. Imported only when the runtime's device
is CUDA; its tests run where CUDA exists and are reported as skipped elsewhere (tests/runtime/test_cuda.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class PinnedBuffer:
    """One growing pinned int64 host buffer: lists are packed into it and copied to the device together,
    without blocking the host. Reused every step: the step's sampling reads back its tokens (a sync) before the
    next step packs into it again."""

    def __init__(self, device: torch.device, capacity: int = 1 << 16) -> None:
        self.device = device
        self._host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)

    def upload(self, lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        sizes = [len(v) for v in lists]
        total = sum(sizes)
        if total > self._host.numel():
            self._host = torch.empty(max(total, 2 * self._host.numel()), dtype=torch.int64, pin_memory=True)
        flat = [x for v in lists for x in v]
        self._host[:total] = torch.tensor(flat, dtype=torch.int64)
        device = self._host[:total].to(self.device, non_blocking=True)
        return list(device.split(sizes))


class SideStream:
    """Copies adapter weights to the device on a stream of their own; the model's stream waits for them only
    when a step reads them (`wait`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._event: torch.cuda.Event | None = None

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        host = t if t.is_pinned() else t.pin_memory()
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        self._event = event
        return out

    def wait(self) -> None:
        """The current stream waits for every copy issued so far (no host wait)."""
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None


def kv_cache_bytes(device: torch.device, fraction: float, activation_bytes: int) -> int:
    """Bytes the KV arena may take: `fraction` of the GPU's memory, less what is already used (weights, other
    processes) and an estimate of a step's activations."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return int(total * fraction) - used - activation_bytes


class CudaGraphCapture:
    """Captures a fixed-shape step into a CUDA graph (`service.runtime.graphs.Capture`): the step runs once
    eagerly on a side stream (Triton compiles its kernels, the allocator settles), then is captured; every
    replay launches the whole graph at once and returns the captured output tensor, which the next replay
    overwrites. All graphs share one memory pool: only one runs at a time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        main = torch.cuda.current_stream(self.device)
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(main)
        with torch.cuda.stream(warm):
            fn()
        main.wait_stream(warm)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay
