"""The device-generic runtime on the Triton backend, proven on the CPU through the Triton interpreter: the
whole engine (continuous batching, chunked prefill, prefix-cache hits, preemption, two adapters of different
ranks beside base-model rows, seeded sampling) gives exactly the torch backend's tokens, and `loraserve serve`
on the Triton backend answers over a real socket."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.runtime.graphs import eager_capture
from tests.tiny_models import VOCAB, make_tiny_model

pytestmark = pytest.mark.interpreter

BLOCK = 4
KV_BLOCKS = 24  # 96 tokens for ~130 tokens of requests: some are preempted and recomputed


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-engine")
    path, hf = make_tiny_model(root, "llama-gqa", layers=2)
    dirs = []
    for i, kw in enumerate([dict(r=8, target_modules="all-linear"), dict(r=16, target_modules=["q_proj", "v_proj"])]):
        torch.manual_seed(40 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(lora_alpha=16, init_lora_weights=False, **kw))
        pm.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return path, dirs


def run(path, dirs, backend: str, monkeypatch, graphs: bool = False) -> tuple[dict[str, list[int]], dict]:
    """`graphs`: decode steps run at fixed shapes through the replay path CUDA graphs use (here each replay calls
    the captured step again)."""
    monkeypatch.setenv("LORASERVE_KERNELS", backend)
    monkeypatch.setattr("service.builder._decode_capture", lambda *a: eager_capture if graphs else None)
    per_block = 2 * 2 * BLOCK * 2 * 16 * 4  # layers x (K, V) x block x kv heads x head_dim x float32
    rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", quantize="int4",
                                     kv_cache_gib=KV_BLOCKS * per_block / 2**30,
                                     max_model_len=64, threads=1),
                       EngineConfig(block_size=BLOCK, max_num_seqs=6, max_num_batched_tokens=16),
                       AdapterConfig(max_active_adapters=2, host_cache_max_count=4))
    assert rt.model.kernels.name == backend and rt.runner.num_blocks == KV_BLOCKS - graphs  # graphs: a scratch block
    versions = [rt.add_local_adapter(d) for d in dirs]
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, VOCAB, (12,), generator=g).tolist()  # 3 full blocks: prefix-cache hits
    jobs = []
    for i in range(7):
        prompt = (shared if i % 2 == 0 else []) + torch.randint(3, VOCAB, (3 + 2 * i,), generator=g).tolist()
        version = [versions[0], None, versions[1]][i % 3]
        sp = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0 if i % 2 else 0.9, seed=100 + i)
        jobs.append(RequestSpec(f"r{i}", prompt, sp, adapter_version=version))
    engine = rt.engine
    finals = {}
    for spec in jobs[:4]:
        engine.add_request(spec)
    engine.step()  # the rest arrive while the first ones run
    for spec in jobs[4:]:
        engine.add_request(spec)
    while engine.has_unfinished():
        for out in engine.step():
            if out.final is not None:
                finals[out.request_id] = out.final
    engine.check_idle_integrity()
    stats = engine.stats
    return {rid: list(f.token_ids) for rid, f in finals.items()}, {
        "preemptions": stats.preemptions, "hits": stats.prefix_cache_hit_tokens, "steps": stats.steps,
        "chunked": any(f.usage.input_tokens > 16 for f in finals.values()),
        "graph_steps": dict(rt.runner.graphs.steps) if rt.runner.graphs is not None else {}}


def test_the_full_engine_on_the_triton_backend_gives_the_torch_backends_tokens(model_and_adapters, monkeypatch):
    path, dirs = model_and_adapters
    want, seen = run(path, dirs, "torch", monkeypatch)
    # the workload really exercises what it claims to
    assert seen["preemptions"] > 0 and seen["hits"] > 0 and seen["chunked"], seen
    got, _ = run(path, dirs, "triton", monkeypatch)
    assert got == want and len(want) == 7 and all(len(t) == 10 for t in want.values())


def test_decode_steps_replayed_at_fixed_shapes_give_the_torch_backends_tokens(model_and_adapters, monkeypatch):
    """What a CUDA graph replays, run on the CPU: decodes padded up to a batch-size bucket (padding rows write to
    a scratch block), every per-step value read from fixed buffers, LoRA through fixed tiles and slot tables."""
    path, dirs = model_and_adapters
    want, _ = run(path, dirs, "torch", monkeypatch)
    got, seen = run(path, dirs, "triton", monkeypatch, graphs=True)
    # with 6 seats the buckets are 1, 2, 4, 6: padded buckets ran, and so did the preemptions and cache hits
    assert set(seen["graph_steps"]) - {1, 2} and sum(seen["graph_steps"].values()) > 10, seen
    assert seen["preemptions"] > 0 and seen["hits"] > 0, seen
    assert got == want


def test_serve_on_the_triton_backend_answers_over_a_socket(model_and_adapters, monkeypatch):
    from service.client import LoraServeClient
    from tests.api.serve_process import ServeProcess

    path, dirs = model_and_adapters
    monkeypatch.setenv("LORASERVE_KERNELS", "triton")  # the process inherits it, and TRITON_INTERPRET=1
    proc = ServeProcess("--model", str(path), "--dtype", "float32", "--kv-cache-gib", "0.004", "--threads", "1",
                        "--adapter", f"tiny={dirs[0]}")
    try:
        ready = next(e for e in proc.events() if e.get("event") == "model_ready")
        assert ready["kernels"] == "triton" and ready["device"] == "cpu" and ready["matmul_dtype"] == "float32"
        with LoraServeClient(proc.address, timeout=120) as c:
            r = c.generate("t5 t6 t7", adapter="tiny", temperature=0, max_tokens=4, ignore_eos=True)
        assert len(r.token_ids) == 4 and r.adapter_version
    finally:
        proc.stop()
