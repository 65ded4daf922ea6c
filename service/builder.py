"""Assemble a ready engine from configuration: weights, tokenizer, model, KV arena, runner, adapter versions,
scheduler. The one place that sets process-wide torch settings (threads), once, at start."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from adapters.identity import adapter_version_id
from adapters.lifecycle import AdapterVersions
from adapters.peft_format import ParsedAdapter, parse_adapter
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.adapters import AdapterAdmission
from service.engine.engine import LLMEngine
from service.runtime.gguf_loader import open_gguf
from service.runtime.loader import LoadedModel, default_model_path, load_model
from service.runtime.lora import LoraSlots, fused_loader
from service.runtime.model import KVCache, LlamaModel
from service.runtime.model_runner import ModelRunner
from service.runtime.tokenizer import Tokenizer

log = structlog.get_logger(__name__)


@dataclass
class Runtime:
    engine: LLMEngine
    tokenizer: Tokenizer
    model: LlamaModel
    runner: ModelRunner
    loaded: LoadedModel
    adapters: AdapterVersions
    adapter_config: AdapterConfig
    local_adapters: dict[str, ParsedAdapter]  # version id -> adapters registered from local directories
    # Reads a stored adapter by version id (the server's store); settable after the model is loaded,
    # since what validates an adapter (the architecture, the base model id) is only known then.
    adapter_loader: Callable[[str], ParsedAdapter] | None = None

    def add_local_adapter(self, path: str | Path) -> str:
        """Register a PEFT adapter directory for offline use; returns its version id (the request's extra key)."""
        parsed = parse_adapter(Path(path), self.loaded.arch, max_rank=self.adapter_config.max_lora_rank)
        vid = adapter_version_id(parsed, self.loaded.model_id)
        self.local_adapters[vid] = parsed
        return vid


def load_tokenizer(path: Path, gguf_reader: object | None = None) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_reader or path) if path.is_file() else Tokenizer.from_dir(path)


def build_runtime(rc: RuntimeConfig | None = None, ec: EngineConfig | None = None,
                  ac: AdapterConfig | None = None,
                  adapter_loader: Callable[[str], ParsedAdapter] | None = None) -> Runtime:
    """`adapter_loader(version_id)` reads and validates a stored adapter (the service's store); without
    one, only adapters registered with `Runtime.add_local_adapter` can be used."""
    rc = rc or RuntimeConfig()
    ec = ec or EngineConfig()
    ac = ac or AdapterConfig()
    torch.set_num_threads(rc.threads or os.cpu_count() or 1)
    path = Path(rc.model) if rc.model else default_model_path()
    dtype = getattr(torch, rc.dtype)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist: expected a .gguf file or an HF directory "
                                "with config.json + *.safetensors")
    reader = open_gguf(path) if path.is_file() else None  # parsed once, for weights and tokenizer
    loaded = load_model(path, quantize=rc.quantize, gguf_reader=reader)
    tokenizer = load_tokenizer(path, reader)
    del reader
    max_len = rc.max_model_len or loaded.arch.max_position_embeddings
    if max_len > loaded.arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_len} exceeds the model's context length {loaded.arch.max_position_embeddings}"
        )
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=dtype, max_model_len=max_len)
    loaded.tensors = {}  # the model holds (fused) weights now; don't keep a second copy alive
    per_block = KVCache.bytes_per_block(loaded.arch, ec.block_size, dtype)
    num_blocks = int(rc.kv_cache_gib * 2**30) // per_block
    if num_blocks * ec.block_size < max_len:
        raise ValueError(
            f"kv_cache_gib={rc.kv_cache_gib} holds {num_blocks * ec.block_size} tokens, less than one full "
            f"context of max_model_len={max_len}: raise kv_cache_gib or lower max_model_len"
        )
    lora_slots = LoraSlots(loaded.arch, ac.max_active_adapters)
    # The sampler masks the same EOS ids the engine stops on (the tokenizer's), below min_tokens.
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=ec.block_size, max_model_len=max_len,
                         lora_slots=lora_slots, eos_token_ids=tokenizer.eos_token_ids)
    local: dict[str, ParsedAdapter] = {}
    runtime: Runtime | None = None

    def load(version_id: str) -> ParsedAdapter:
        if version_id in local:
            return local[version_id]
        loader = runtime.adapter_loader if runtime is not None else None
        if loader is None:
            raise KeyError(f"adapter version {version_id} is not known to this process")
        return loader(version_id)

    versions = AdapterVersions(fused_loader(load, loaded.arch), lora_slots, max_bytes=ac.host_cache_mib * 2**20,
                               max_count=ac.host_cache_max_count, workers=ac.load_workers)
    engine = LLMEngine(runner, tokenizer, ec, adapter_slots=versions,
                       admission=AdapterAdmission(versions, ac.max_overtake_steps))
    log.info("model_ready", source=loaded.source, quantization=loaded.quantization, dtype=rc.dtype,
             weights_mib=round(model.nbytes() / 2**20, 1), kv_blocks=num_blocks,
             kv_cache_mib=round(num_blocks * per_block / 2**20, 1), max_model_len=max_len,
             threads=torch.get_num_threads())
    runtime = Runtime(engine, tokenizer, model, runner, loaded, versions, ac, local, adapter_loader)
    return runtime
