"""The CUDA-only code (service/runtime/cuda.py) and the runtime on a GPU. Skipped without CUDA, with the
reason; `make gpu-check` runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (pinned staging, side-stream copies, GPU memory sizing, CUDA "
                                       "graphs); run `make gpu-check` on a GPU machine")


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


def test_decode_steps_replayed_as_cuda_graphs_give_the_eager_tokens(tmp_path):
    """CUDA graphs of the decode buckets (captured at start) against eager launches, on the tiny model with two
    adapters of different ranks beside base rows, greedy and seeded sampling."""
    import copy

    import peft

    from service.builder import build_runtime
    from service.config import AdapterConfig, EngineConfig, RuntimeConfig
    from service.engine.request import RequestSpec
    from service.engine.sampling import SamplingParams
    from tests.tiny_models import VOCAB, make_tiny_model

    path, hf = make_tiny_model(tmp_path, "llama-gqa", layers=2)
    dirs = []
    for i, r in enumerate((8, 16)):
        torch.manual_seed(40 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=r, lora_alpha=16, init_lora_weights=False,
                                                                    target_modules="all-linear"))
        pm.save_pretrained(tmp_path / f"a{i}")
        dirs.append(tmp_path / f"a{i}")

    def tokens(graphs: bool):
        rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", quantize="int4", device="cuda",
                                         kv_cache_gib=0.01, max_model_len=64, cuda_graphs=graphs),
                           EngineConfig(block_size=4, max_num_seqs=6), AdapterConfig(max_active_adapters=2))
        assert (rt.runner.graphs is not None) == graphs
        versions = [rt.add_local_adapter(d) for d in dirs]
        g = torch.Generator().manual_seed(5)
        for i in range(5):
            prompt = torch.randint(3, VOCAB, (3 + 2 * i,), generator=g).tolist()
            sp = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0 if i % 2 else 0.9, seed=100 + i)
            rt.engine.add_request(RequestSpec(f"r{i}", prompt, sp, adapter_version=[versions[0], None,
                                                                                   versions[1]][i % 3]))
        finals = {}
        while rt.engine.has_unfinished():
            for out in rt.engine.step():
                if out.final is not None:
                    finals[out.request_id] = list(out.final.token_ids)
        return finals, dict(rt.runner.graphs.steps) if graphs else {}

    want, _ = tokens(False)
    got, steps = tokens(True)
    assert sum(steps.values()) > 5, steps
    assert got == want
