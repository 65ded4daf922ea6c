"""Adapters through the whole runtime: tiers, slots, admission, prefix caching, against peft."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from service.builder import build_runtime
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from tests.tiny_models import VOCAB, make_tiny_model

NEW = 8
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
TARGETS = [["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"], ["gate_proj", "up_proj", "k_proj"]]


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """A tiny model and 8 peft-written adapters of ranks 2..64 over different target sets."""
    root = tmp_path_factory.mktemp("lora8")
    path, hf = make_tiny_model(root, "llama-gqa", layers=2)
    dirs = []
    for i in range(8):
        torch.manual_seed(1000 + i)
        cfg = peft.LoraConfig(r=[2, 4, 8, 16, 32, 64, 8, 16][i], lora_alpha=16, init_lora_weights=False,
                              target_modules=TARGETS[i % len(TARGETS)], use_rslora=i % 3 == 0)
        pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
        d = root / f"a{i}"
        pm.save_pretrained(d)
        dirs.append(d)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), dirs[0], adapter_name="a0").eval()
    for i in range(1, 8):
        ref.load_adapter(dirs[i], adapter_name=f"a{i}")
    return path, hf, ref, dirs


def peft_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def runtime(path, **ac):
    return build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=0.01),
                         EngineConfig(block_size=4, max_num_seqs=32, max_num_batched_tokens=128),
                         AdapterConfig(**ac))


def test_eight_adapters_two_slots_tiny_host_cache_each_gets_its_own_output(eight):
    path, hf, ref, dirs = eight
    rt = runtime(path, max_active_adapters=2, host_cache_max_count=3)
    versions = [rt.add_local_adapter(d) for d in dirs]
    g = torch.Generator().manual_seed(3)
    jobs = []  # (adapter index or None, prompt): 2 requests per adapter + 4 base requests, interleaved
    for k in range(20):
        a = None if k % 5 == 4 else (k * 3) % 8
        jobs.append((a, torch.randint(3, VOCAB, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()))
    for i, (a, p) in enumerate(jobs):
        rt.engine.add_request(RequestSpec(f"r{i}", p, GREEDY, adapter_version=None if a is None else versions[a]))
    outs = {}
    max_active_seen = 0
    while rt.engine.has_unfinished():
        for o in rt.engine.step():
            if o.finished:
                outs[o.request_id] = o.final
        max_active_seen = max(max_active_seen, len(rt.adapters.active_versions()))
    assert max_active_seen <= 2
    for i, (a, p) in enumerate(jobs):
        o = outs[f"r{i}"]
        assert o.error is None, o.error
        if a is None:
            expect = peft_greedy(hf, p)
        else:
            ref.set_adapter(f"a{a}")
            expect = peft_greedy(ref, p)
        assert list(o.token_ids) == expect, f"request {i} with adapter {a}"
    stats = rt.adapters.cache.stats()
    assert stats.evictions > 0  # the host tier (3 of 8) really evicted and reloaded
    assert rt.adapters.activations > 2  # slots rotated through more adapters than they hold
    rt.engine.check_idle_integrity()


def test_prefix_cache_keyed_by_adapter_version(eight):
    path, _, ref, dirs = eight
    rt = runtime(path, max_active_adapters=4)
    v1, v2 = rt.add_local_adapter(dirs[1]), rt.add_local_adapter(dirs[5])
    assert rt.add_local_adapter(dirs[1]) == v1  # content-derived: the same files give the same version
    eng = rt.engine
    prompt = list(range(10, 30))  # 20 tokens = 5 full blocks of 4

    def run(version: str | None):
        return eng.generate([prompt], GREEDY) if version is None else _run_one(eng, prompt, version)

    base1 = run(None)[0]
    a = run(v1)
    assert a.usage.cached_input_tokens == 0  # the base model's KV is never served to an adapter
    b = run(v2)
    assert b.usage.cached_input_tokens == 0  # nor one adapter's KV to another
    a_again = run(v1)
    assert a_again.usage.cached_input_tokens == 16 and list(a_again.token_ids) == list(a.token_ids)
    base2 = run(None)[0]
    assert base2.usage.cached_input_tokens == 16 and list(base2.token_ids) == list(base1.token_ids)
    ref.set_adapter("a1")
    assert list(a.token_ids) == peft_greedy(ref, prompt)
    ref.set_adapter("a5")
    assert list(b.token_ids) == peft_greedy(ref, prompt)


def _run_one(eng, prompt: list[int], version: str):
    rid = f"req-{version}-{eng.stats.steps}"
    eng.add_request(RequestSpec(rid, prompt, GREEDY, adapter_version=version))
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished and o.request_id == rid:
                out = o.final
    return out


def test_bad_adapter_directory_is_refused_and_nothing_registered(eight, tmp_path):
    path, _, _, dirs = eight
    rt = runtime(path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((dirs[0] / "adapter_config.json").read_text())
    (bad / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match=r"\.bin"):
        rt.add_local_adapter(bad)
    assert rt.local_adapters == {}


def test_repointed_name_serves_the_new_version_never_the_old_kv(eight, tmp_path):
    """store -> registry -> host cache -> slots: promote a name to new weights mid-stream."""
    from adapters.cache import LoaderFromStore
    from adapters.identity import adapter_version_id
    from adapters.peft_format import parse_adapter, read_adapter_files
    from adapters.registry import AdapterRegistry, VersionMeta
    from adapters.store import FilesystemStore
    from service.runtime.loader import load_model

    path, _, ref, dirs = eight
    loaded = load_model(path)
    store = FilesystemStore(tmp_path / "store")
    registry = AdapterRegistry(tmp_path / "registry.db", store=store)
    rt = build_runtime(RuntimeConfig(model=str(path), dtype="float32", kv_cache_gib=0.01),
                       EngineConfig(block_size=4), AdapterConfig(max_active_adapters=2),
                       adapter_loader=LoaderFromStore(store, loaded.arch, loaded.model_id))
    ids = []
    for d in (dirs[2], dirs[6]):  # two trainings published under one name
        cfg, weights = read_adapter_files(d)
        parsed = parse_adapter(d, loaded.arch)
        vid = adapter_version_id(parsed, loaded.model_id)
        store.put(vid, {"adapter_config.json": cfg, "adapter_model.safetensors": weights})
        registry.register_version("team-a", "support-bot", vid, VersionMeta.of(parsed, loaded.model_id, len(weights)),
                                  promote=False)
        ids.append(vid)
    prompt = list(range(40, 64))  # 6 full blocks

    def serve() -> tuple[str, object]:
        version = registry.resolve("team-a", "support-bot").version_id
        return version, _run_one(rt.engine, prompt, version)

    registry.promote("team-a", "support-bot", ids[0])
    v_old, old = serve()
    registry.promote("team-a", "support-bot", ids[1])
    v_new, new = serve()
    assert (v_old, v_new) == (ids[0], ids[1])
    assert new.usage.cached_input_tokens == 0  # the old version's blocks are not reused under the same name
    ref.set_adapter("a2")
    assert list(old.token_ids) == peft_greedy(ref, prompt)
    ref.set_adapter("a6")
    assert list(new.token_ids) == peft_greedy(ref, prompt)
    registry.promote("team-a", "support-bot", ids[0])  # rollback: the old KV is valid again and reused
    _, again = serve()
    assert again.usage.cached_input_tokens == 20 and list(again.token_ids) == list(old.token_ids)
