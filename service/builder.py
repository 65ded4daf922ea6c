"""Assemble a ready engine from configuration: weights, tokenizer, model, KV arena, runner, adapter versions,
scheduler. The one place that sets process-wide torch settings (threads), once, at start."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch

from adapters.identity import adapter_version_id
from adapters.lifecycle import AdapterVersions
from adapters.peft_format import ParsedAdapter, parse_adapter
from kernels import native
from kernels.cpu_features import matmul_dtype
from kernels.ops import Kernels, select_kernels
from service.config import AdapterConfig, EngineConfig, RuntimeConfig
from service.engine.adapters import AdapterAdmission
from service.engine.engine import LLMEngine
from service.runtime.arch import ModelArch
from service.runtime.device import describe, resolve_device
from service.runtime.draft import DraftModelProposer
from service.runtime.gguf_loader import open_gguf
from service.runtime.loader import LoadedModel, default_model_path, load_model
from service.runtime.lora import LoraSlots, fused_loader
from service.runtime.model import KVCache, LlamaModel
from service.runtime.model_runner import ModelRunner
from service.runtime.synthetic import is_synthetic, load_synthetic, synthetic_tokenizer
from service.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from service.runtime.graphs import Capture
    from service.runtime.structured import StructuredOutput

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
    # Compiles response formats for this model's vocabulary (built once, here); None without xgrammar.
    structured: StructuredOutput | None = None
    # Reads a stored adapter by version id (the server's store); settable after the model is loaded,
    # since what validates an adapter (the architecture, the base model id) is only known then.
    adapter_loader: Callable[[str], ParsedAdapter] | None = None

    def add_local_adapter(self, path: str | Path) -> str:
        """Register a PEFT adapter directory for offline use; returns its version id (the request's extra key)."""
        parsed = parse_adapter(Path(path), self.loaded.arch, max_rank=self.adapter_config.max_lora_rank)
        vid = adapter_version_id(parsed, self.loaded.model_id)
        self.local_adapters[vid] = parsed
        return vid


def _structured_output(tokenizer: Tokenizer, vocab_size: int) -> StructuredOutput | None:
    """xgrammar over this vocabulary. It is a dependency of the package; only a bare environment (the GPU check's,
    which carries the checkout alone) lacks it, and serves without response formats."""
    try:
        from service.runtime.structured import StructuredOutput
    except ImportError as e:
        log.warning("structured_output_unavailable", reason=str(e))
        return None
    return StructuredOutput(tokenizer, vocab_size)


def load_tokenizer(path: Path, gguf_reader: object | None = None) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_reader or path) if path.is_file() else Tokenizer.from_dir(path)


def _load(rc: RuntimeConfig, device: torch.device, source: str | None = None) -> tuple[LoadedModel, Tokenizer]:
    """The model `source` names (default: rc.model), and its tokenizer."""
    source = rc.model if source is None else source
    if is_synthetic(source):
        return load_synthetic(source, device), synthetic_tokenizer(source)
    path = Path(source) if source else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist: expected a .gguf file or an HF directory "
                                "with config.json + *.safetensors, or synthetic:NAME")
    reader = open_gguf(path) if path.is_file() else None  # parsed once, for weights and tokenizer
    return load_model(path, quantize=rc.quantize, gguf_reader=reader), load_tokenizer(path, reader)


def _kv_bytes(rc: RuntimeConfig, ec: EngineConfig, arch: ModelArch, device: torch.device) -> int:
    """The KV arena's size: kv_cache_gib when given; else 1 GiB on the CPU, and on a GPU what its memory
    fraction leaves after the weights (already there) and a step's activations."""
    if rc.kv_cache_gib is not None or device.type != "cuda":
        return int((rc.kv_cache_gib or 1.0) * 2**30)
    from service.runtime.cuda import kv_cache_bytes

    # A step's activations, generously: float32 rows of the widest layer outputs for its token budget, and
    # logits for every sequence.
    per_token = 4 * (arch.q_size + 2 * arch.kv_size + 4 * arch.intermediate_size + 4 * arch.hidden_size)
    activations = 2 * (ec.max_num_batched_tokens * per_token + ec.max_num_seqs * arch.vocab_size * 8)
    return kv_cache_bytes(device, rc.gpu_memory_fraction, activations)


def _cpu_kernels(device: torch.device, dtype: torch.dtype, kernels: str) -> str:
    """Builds the C decode kernels now (not in the first step) where the model would use them; says which ops
    the decode step runs."""
    if device.type != "cpu" or kernels != "torch" or dtype != torch.bfloat16:
        return "n/a"
    if native.library() is None:
        log.warning("cpu_kernels_unavailable", reason=native.unavailable_reason(),
                    effect="the decode step runs torch ops only (slower)")
        return "torch"
    return "c"


def _decode_capture(rc: RuntimeConfig, device: torch.device, kernels: str) -> Capture | None:
    """How decode steps are replayed at fixed shapes: CUDA graphs on a GPU with the Triton kernels (unless
    cuda_graphs is off); None elsewhere (each step launches its kernels as it goes)."""
    if device.type != "cuda" or kernels != "triton" or not rc.cuda_graphs:
        return None
    from service.runtime.cuda import CudaGraphCapture

    return CudaGraphCapture(device)


TOKENIZER_PROBE = "Speculative drafts: the same tokens, 1234 times. ¿Qué tal? 中文"


def lora_weight_dtype(kernels_name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapters' weights are held in. A decode step's LoRA work is streaming every active adapter's
    weights for a few rows each, so fewer bytes is what counts: the Triton kernels read the model's dtype, and
    so does the CPU's C kernel (bfloat16 weights, float32 sums) when the CPU is on bfloat16 activations. Without
    the C kernels the CPU's torch path computes the small products in float32 (small bfloat16 matrix products
    cost several times more per call there), so it keeps its weights in float32."""
    if kernels_name != "torch":
        return model_dtype
    return torch.bfloat16 if model_dtype == torch.bfloat16 and native.library() is not None else torch.float32


def _draft_proposer(rc: RuntimeConfig, ec: EngineConfig, device: torch.device, dtype: torch.dtype,
                    kernels: Kernels, tokenizer: Tokenizer, vocab_size: int, max_len: int,
                    kv_tokens: int) -> DraftModelProposer | None:
    """The draft model's proposer (rc.draft_model), its KV arena holding as many tokens as the target's; None
    without a draft model. ValueError when it cannot draft for this model (another vocabulary or tokenizer, a
    shorter context)."""
    if not rc.draft_model:
        return None
    loaded, draft_tokenizer = _load(rc, device, rc.draft_model)
    arch = loaded.arch
    if arch.vocab_size != vocab_size:
        raise ValueError(f"draft model {rc.draft_model}: vocabulary of {arch.vocab_size} tokens, the served model's "
                         f"has {vocab_size}: a draft model must share the tokenizer")
    if draft_tokenizer.encode(TOKENIZER_PROBE) != tokenizer.encode(TOKENIZER_PROBE):
        raise ValueError(f"draft model {rc.draft_model}: its tokenizer splits text differently from the served "
                         "model's: a draft model must share the tokenizer")
    if arch.max_position_embeddings < max_len:
        raise ValueError(f"draft model {rc.draft_model}: context of {arch.max_position_embeddings} tokens, less "
                         f"than max_model_len={max_len}")
    model = LlamaModel(arch, loaded.tensors, dtype=dtype, max_model_len=max_len, device=device, kernels=kernels,
                       dense_weights_bytes=rc.dense_weights_mib * 2**20)
    proposer = DraftModelProposer(model, kv_tokens // ec.block_size, ec.block_size, max_len)
    log.info("draft_model_ready", source=loaded.source, quantization=loaded.quantization,
             weights_mib=round(model.nbytes() / 2**20, 1), kv_blocks=proposer.free_blocks)
    return proposer


def build_runtime(rc: RuntimeConfig | None = None, ec: EngineConfig | None = None,
                  ac: AdapterConfig | None = None,
                  adapter_loader: Callable[[str], ParsedAdapter] | None = None) -> Runtime:
    """`adapter_loader(version_id)` reads and validates a stored adapter (the service's store); without
    one, only adapters registered with `Runtime.add_local_adapter` can be used."""
    rc = rc or RuntimeConfig()
    ec = ec or EngineConfig()
    ac = ac or AdapterConfig()
    torch.set_num_threads(rc.threads or os.cpu_count() or 1)
    device = resolve_device(rc.device)
    dtype = getattr(torch, rc.dtype)
    loaded, tokenizer = _load(rc, device)
    max_len = rc.max_model_len or loaded.arch.max_position_embeddings
    if max_len > loaded.arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len={max_len} exceeds the model's context length {loaded.arch.max_position_embeddings}"
        )
    kernels = select_kernels(device)  # chosen once, here; the model keeps it
    model = LlamaModel(loaded.arch, loaded.tensors, dtype=dtype, max_model_len=max_len, device=device,
                       kernels=kernels, dense_weights_bytes=rc.dense_weights_mib * 2**20)
    loaded.tensors = {}  # the model holds (fused) weights now; don't keep a second copy alive
    per_block = KVCache.bytes_per_block(loaded.arch, ec.block_size, dtype)
    num_blocks = _kv_bytes(rc, ec, loaded.arch, device) // per_block
    if num_blocks * ec.block_size < max_len:
        raise ValueError(
            f"the KV arena ({num_blocks} blocks) holds {num_blocks * ec.block_size} tokens, less than one full "
            f"context of max_model_len={max_len}: raise kv_cache_gib (or gpu_memory_fraction) or lower "
            "max_model_len"
        )
    lora_slots = LoraSlots(loaded.arch, ac.max_active_adapters, device)
    # The sampler masks the same EOS ids the engine stops on (the tokenizer's), below min_tokens.
    capture = _decode_capture(rc, device, kernels.name)
    if capture is not None:
        num_blocks -= 1  # the arena's last block takes the padding rows of fixed-shape decode steps
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=ec.block_size, max_model_len=max_len,
                         lora_slots=lora_slots, eos_token_ids=tokenizer.eos_token_ids, decode_capture=capture,
                         max_decode_batch=ec.max_num_seqs, max_lora_rank=ac.max_lora_rank)
    local: dict[str, ParsedAdapter] = {}
    runtime: Runtime | None = None

    def load(version_id: str) -> ParsedAdapter:
        if version_id in local:
            return local[version_id]
        loader = runtime.adapter_loader if runtime is not None else None
        if loader is None:
            raise KeyError(f"adapter version {version_id} is not known to this process")
        return loader(version_id)

    lora_dtype = lora_weight_dtype(kernels.name, dtype)
    versions = AdapterVersions(fused_loader(load, loaded.arch, lora_dtype, pin=device.type == "cuda"), lora_slots,
                               max_bytes=ac.host_cache_mib * 2**20, max_count=ac.host_cache_max_count,
                               workers=ac.load_workers)
    draft = _draft_proposer(rc, ec, device, dtype, kernels, tokenizer, loaded.arch.vocab_size, max_len,
                            num_blocks * ec.block_size)
    engine = LLMEngine(runner, tokenizer, ec, adapter_slots=versions,
                       admission=AdapterAdmission(versions, ac.max_overtake_steps), draft_proposer=draft)
    if runner.graphs is not None:
        t0 = time.perf_counter()
        runner.graphs.capture_all()
        log.info("decode_graphs_captured", buckets=runner.graphs.buckets, lora=lora_slots is not None,
                 seconds=round(time.perf_counter() - t0, 1))
    cpu_kernels = _cpu_kernels(device, dtype, kernels.name)
    log.info("model_ready", source=loaded.source, quantization=loaded.quantization, dtype=rc.dtype,
             device=describe(device), kernels=kernels.name, cpu_kernels=cpu_kernels,
             weights_mib=round(model.nbytes() / 2**20, 1), dense_weights=model.dense_weights,
             matmul_dtype=str(matmul_dtype(torch.empty(0, dtype=dtype, device=device))).removeprefix("torch."),
             kv_blocks=num_blocks, decode_graphs=runner.graphs.buckets if runner.graphs is not None else None,
             kv_cache_mib=round(num_blocks * per_block / 2**20, 1), max_model_len=max_len,
             threads=torch.get_num_threads())
    runtime = Runtime(engine, tokenizer, model, runner, loaded, versions, ac, local,
                      _structured_output(tokenizer, loaded.arch.vocab_size), adapter_loader)
    return runtime
