"""Choosing the device (everywhere) and the synthetic models (random weights of a named shape)."""

from __future__ import annotations

import pytest
import torch

from service.builder import build_runtime
from service.config import EngineConfig, RuntimeConfig
from service.engine.sampling import SamplingParams
from service.runtime.device import StepStager, resolve_device
from service.runtime.synthetic import SHAPES, load_synthetic, shape_of


def test_device_names_resolve_or_say_what_is_wrong():
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match="device 'tpu' is invalid: use cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for CUDA, but this torch build .* sees no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device is empty"):
        RuntimeConfig(device=" ")
    with pytest.raises(ValueError, match="gpu_memory_fraction=1.5 is invalid"):
        RuntimeConfig(gpu_memory_fraction=1.5)
    with pytest.raises(ValueError, match="cuda_graphs='yes' is invalid: must be true or false"):
        RuntimeConfig(cuda_graphs="yes")  # a string where the config file wants a boolean


def test_cuda_graph_flags_reach_the_config_and_leave_the_cpu_path_alone(capsys):
    from service.cli import build_parser, runtime_config

    parser = build_parser()
    assert runtime_config(parser.parse_args(["generate", "--prompt", "x"])).cuda_graphs is True
    assert runtime_config(parser.parse_args(["generate", "--prompt", "x", "--no-cuda-graphs"])).cuda_graphs is False
    assert runtime_config(parser.parse_args(["generate", "--prompt", "x", "--draft-model", "d.gguf"])).draft_model \
        == "d.gguf"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "--cuda-graphs, --no-cuda-graphs" in capsys.readouterr().out
    # on the CPU decode steps are never captured: the torch backend launches as it goes, no scratch block
    rt = build_runtime(RuntimeConfig(model="synthetic:smollm2-135m", dtype="float32", kv_cache_gib=0.05,
                                     max_model_len=256, threads=1, cuda_graphs=True), EngineConfig())
    assert rt.runner.graphs is None and rt.runner.kv.num_blocks == rt.runner.num_blocks


def test_the_cpu_stager_builds_the_tensors_in_place():
    ids, pos = StepStager(torch.device("cpu")).int64([5, 6], [0, 1])
    assert ids.tolist() == [5, 6] and pos.tolist() == [0, 1] and ids.dtype == torch.int64


def test_synthetic_weights_have_the_named_shape_and_are_quantized_as_a_gguf_load():
    loaded = load_synthetic("synthetic:smollm2-135m")
    arch = loaded.arch
    assert arch == SHAPES["smollm2-135m"] and loaded.quantization == "synthetic:int4"
    q = loaded.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.kind, q.shape, q.group_size) == ("int4", (arch.q_size, arch.hidden_size), 32)
    assert loaded.tensors["model.embed_tokens.weight"].kind == "int8" and "lm_head.weight" not in loaded.tensors
    assert load_synthetic("synthetic:smollm2-135m").model_id == loaded.model_id  # seeded: the same weights
    with pytest.raises(ValueError, match="synthetic models are synthetic:smollm2-135m, synthetic:llama-3-8b"):
        shape_of("synthetic:gpt-5")


def test_a_synthetic_model_serves_through_the_whole_runtime():
    rt = build_runtime(RuntimeConfig(model="synthetic:smollm2-135m", dtype="float32", kv_cache_gib=0.05,
                                     max_model_len=256, threads=1), EngineConfig())
    ids = rt.tokenizer.encode("t10 t11 t12")
    assert ids[-3:] == [10, 11, 12]
    (out,) = rt.engine.generate([ids], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.text.split() == [f"t{i}" for i in out.token_ids]
