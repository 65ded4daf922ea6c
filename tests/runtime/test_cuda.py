"""The CUDA-only code (service/runtime/cuda.py) and the runtime on a GPU. Skipped without CUDA, with the
reason; `make gpu-check` runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (pinned staging, side-stream copies, GPU memory "
                                       "sizing); run `make gpu-check` on a GPU machine")


def test_pinned_upload_lands_on_the_device():
    from service.runtime.cuda import PinnedBuffer

    buf = PinnedBuffer(torch.device("cuda"), capacity=4)
    ids, pos = buf.upload([[1, 2, 3], [4, 5, 6, 7]])  # larger than the buffer: it grows
    assert ids.is_cuda and ids.tolist() == [1, 2, 3] and pos.tolist() == [4, 5, 6, 7]


def test_side_stream_copies_are_ordered_before_the_reader():
    from service.runtime.cuda import SideStream

    side = SideStream(torch.device("cuda"))
    host = torch.arange(1 << 20, dtype=torch.float32)
    dev = side.copy(host)
    side.wait()
    assert torch.equal(dev.cpu(), host)


def test_kv_arena_from_the_memory_fraction():
    from service.runtime.cuda import kv_cache_bytes

    free, total = torch.cuda.mem_get_info()
    got = kv_cache_bytes(torch.device("cuda"), 0.5, 1 << 20)
    assert got <= total * 0.5 and got > 0 or free < total * 0.5


def test_a_synthetic_model_generates_on_the_gpu_like_the_triton_interpreter_would():
    from service.builder import build_runtime
    from service.config import EngineConfig, RuntimeConfig
    from service.engine.sampling import SamplingParams

    rt = build_runtime(RuntimeConfig(model="synthetic:smollm2-135m", device="cuda", max_model_len=512),
                       EngineConfig())
    assert rt.model.kernels.name == "triton" and rt.runner.kv.arena.is_cuda
    outs = rt.engine.generate([[1, 10, 11, 12]] * 4, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs) and len({o.token_ids for o in outs}) == 1
