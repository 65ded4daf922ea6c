"""Pieces both weight loaders share: the quantize-on-load policy and cheap content fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

from kernels.quant import QuantizedTensor, quantize_int4, quantize_int8

Weight = Tensor | QuantizedTensor
QUANTIZE_CHOICES = ("int8", "int4")
INT4_GROUP = 32
EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported: use one of {', '.join(QUANTIZE_CHOICES)} or None")


def is_matrix_weight(name: str) -> bool:
    """2-D weights that quantize-on-load applies to: projections, the LM head and the embeddings."""
    return name.endswith("_proj.weight") or name in (EMBED_NAME, LM_HEAD_NAME)


def convert_plain(name: str, t: Tensor, quantize: str | None, dtype: torch.dtype) -> Weight:
    """A float tensor as loaded -> what we keep: norms and biases float32, matrices in `dtype` or quantized.

    quantize="int8": per-channel int8 for every matrix. quantize="int4": int4 group 32 for projections and
    an untied LM head; the embedding table stays int8 per channel (it is only gathered, and when tied
    it also serves as the LM head).
    """
    if t.dim() != 2 or not is_matrix_weight(name):
        return t.to(torch.float32, copy=True)
    if quantize is None:
        return t.to(dtype, copy=True)
    if quantize == "int8" or name == EMBED_NAME:
        return quantize_int8(t.float(), None)
    if t.shape[1] % INT4_GROUP:
        raise ValueError(
            f"cannot quantize {name} of shape {list(t.shape)} to int4: its input dimension {t.shape[1]} is not "
            f"a multiple of the group size {INT4_GROUP}; use quantize='int8'"
        )
    return quantize_int4(t.float(), INT4_GROUP)


def weight_nbytes(tensors: Iterable[Weight]) -> int:
    """Bytes held by these weights, each storage counted once (tied weights share one object)."""
    seen: set[int] = set()
    total = 0
    for w in tensors:
        if id(w) in seen:
            continue
        seen.add(id(w))
        total += w.nbytes if isinstance(w, QuantizedTensor) else w.numel() * w.element_size()
    return total


def sample_digest(h: hashlib._Hash, data: memoryview | bytes, start: int, end: int, samples: int = 64,
                  chunk: int = 4096) -> None:
    """Feed `samples` evenly spaced `chunk`-byte slices of data[start:end] into h.

    Headers alone name shapes and types; sampled weight bytes tell apart two fine-tunes with the same
    header, without hashing gigabytes. Reads ~256 KiB whatever the file size.
    """
    span = max(0, end - start)
    h.update(span.to_bytes(8, "little"))
    if span <= samples * chunk:
        h.update(bytes(data[start:end]))
        return
    step = (span - chunk) // (samples - 1)
    for i in range(samples):
        off = start + i * step
        h.update(bytes(data[off : off + chunk]))
