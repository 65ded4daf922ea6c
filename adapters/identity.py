"""Content-derived, immutable adapter version ids.

The id keys prefix-cache blocks and in-memory copies, so it must change with anything that changes what
the adapter computes, and with nothing else: it hashes the resolved config (rank and scale per module) and
the fp32 weights, never the file bytes. Re-saving the same adapter (other tensor order in the file,
safetensors metadata, config key order or formatting, the `.default` tensor-name variant) keeps its id.
"""

from __future__ import annotations

import hashlib
import json

import torch

from adapters.peft_format import ParsedAdapter

ID_PREFIX = "v-"
ID_HEX_CHARS = 24  # 96 bits: collisions are out of reach for any registry size


def adapter_version_id(parsed: ParsedAdapter, base_model_id: str) -> str:
    """`v-` + 24 hex chars of sha256 over the base model id, canonical config and every weight tensor."""
    h = hashlib.sha256()

    def feed(data: bytes) -> None:
        # Length-prefix every field so that no two different field sequences give the same byte stream.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    feed(b"loraserve-adapter-version/1")
    feed(base_model_id.encode())
    feed(json.dumps(parsed.config.canonical(), sort_keys=True, separators=(",", ":")).encode())
    for (layer, module), w in sorted(parsed.weights.items()):
        for part, t in (("A", w.A), ("B", w.B)):
            # ParsedAdapter weights are fp32; "<f4" pins little-endian bytes whatever the host.
            arr = t.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
            header = {"layer": layer, "module": module, "part": part, "dtype": "float32", "shape": list(arr.shape)}
            feed(json.dumps(header, sort_keys=True).encode())
            feed(arr.tobytes())
    return ID_PREFIX + h.hexdigest()[:ID_HEX_CHARS]
