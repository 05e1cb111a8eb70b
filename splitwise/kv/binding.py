"""What a KV cache is of: a hash binding it to the model, the KV layout and the exact token ids it was computed from.

Kept KV is only reused by a request whose hash is the same: a request id says whose KV it was meant to be, never
what it is (ids are chosen by clients). The wire carries KV per token, so block size is not part of it.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

from splitwise.kv.layout import KVLayout, KVLayoutMismatch

KV_HASH_VERSION = b"splitwise-kv-hash/1"


def prompt_digest(token_ids: Sequence[int]) -> str:
    """SHA-256 of the token ids as little-endian int32, hex."""
    return hashlib.sha256(struct.pack(f"<{len(token_ids)}i", *token_ids)).hexdigest()


def kv_hash(layout: KVLayout, token_ids: Sequence[int]) -> str:
    """The hash of the KV that `layout`'s model computes for exactly `token_ids`, hex."""
    digest = hashlib.sha256(KV_HASH_VERSION)
    for part in (layout.model_fingerprint, layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype,
                 prompt_digest(token_ids)):
        data = str(part).encode()
        digest.update(len(data).to_bytes(8, "big") + data)  # length-prefixed: no two descriptions run together
    return digest.hexdigest()


class KVBindingMismatch(KVLayoutMismatch):
    """The KV offered was computed from other tokens (or by another model) than the ones it is wanted for."""
