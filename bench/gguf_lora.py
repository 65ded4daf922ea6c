"""A PEFT LoRA adapter written as a GGUF LoRA adapter for llama.cpp (the peer in the benchmarks).

llama.cpp reads `blk.N.<tensor>.weight.lora_a` ([r, in]) and `.lora_b` ([out, r]) and scales each pair by
`alpha / rank`, or by the request's scale alone when alpha is 0: we write alpha 0 and fold PEFT's own scale of
each module into its B, so per-module ranks and alphas come out exact. The q and k rows of llama-layout models
are stored permuted for llama.cpp's interleaved rope (see service/runtime/gguf_loader.py), so their B rows are
permuted the same way.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch

from adapters.peft_format import parse_adapter
from service.runtime.arch import ModelArch
from service.runtime.gguf_loader import unpermute_index

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf_lora(adapter_dir: Path, arch: ModelArch, out: Path) -> Path:
    parsed = parse_adapter(adapter_dir, arch)
    writer = gguf.GGUFWriter(str(out), arch=arch.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scale folded into B
    for (layer, proj), w in sorted(parsed.weights.items()):
        b = w.B * w.scale
        if proj in ("q_proj", "k_proj") and arch.arch in ("llama", "mistral"):
            heads = arch.num_heads if proj == "q_proj" else arch.num_kv_heads
            b = b[torch.argsort(unpermute_index(b.shape[0], heads))]  # HF row order -> llama.cpp's
        name = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        writer.add_tensor(name + ".lora_a", w.A.float().contiguous().numpy())
        writer.add_tensor(name + ".lora_b", b.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
