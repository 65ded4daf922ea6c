"""Content hashes of full KV blocks, the keys of the prefix cache (torch-free).

A block's KV depends on every token before it, on its own tokens and on the adapter that produced
it, so its key chains the parent block's hash, the block's token ids and the extra key (the adapter
version id). The encoding is explicit bytes hashed with blake2b: stable across processes and Python
versions (never `hash()`, which is salted per process, and never pickle).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from hashlib import blake2b

BlockHash = bytes

_DIGEST_SIZE = 16  # 128 bits: collisions are negligible for any cache this process can hold
_NO_PARENT = b""
_NO_EXTRA_KEY = b"\x00"  # one tag byte keeps None distinct from "" and from any real key


def _encode_extra_key(extra_key: str | None) -> bytes:
    if extra_key is None:
        return _NO_EXTRA_KEY
    raw = extra_key.encode("utf-8")
    return b"\x01" + struct.pack("<I", len(raw)) + raw


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int], extra_key: str | None) -> BlockHash:
    """H(parent, tokens, extra_key); the field lengths are encoded so no two inputs share bytes."""
    h = blake2b(digest_size=_DIGEST_SIZE)
    p = _NO_PARENT if parent is None else parent
    h.update(struct.pack("<B", len(p)))
    h.update(p)
    h.update(_encode_extra_key(extra_key))
    h.update(struct.pack(f"<I{len(token_ids)}Q", len(token_ids), *token_ids))
    return h.digest()
