"""The KV layout two workers must agree on before KV moves between them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from splitwise.model.llama import LlamaConfig

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    model_fingerprint: str

    @classmethod
    def of(cls, config: LlamaConfig, dtype: torch.dtype, fingerprint: str) -> "KVLayout":
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, DTYPE_NAMES[dtype], fingerprint)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @functools.cached_property
    def bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    def mismatch(self, other: "KVLayout") -> str | None:
        """Why KV in `other` cannot be used here, or None when it can."""
        if self.model_fingerprint != other.model_fingerprint:
            return f"model mismatch: sender serves {other.model_fingerprint}, receiver {self.model_fingerprint}"
        if self != other:
            return f"KV layout mismatch: sender {other}, receiver {self}"
        return None


class KVLayoutMismatch(Exception):
    """The sender's KV cannot be used by the receiver (another model, dtype or shape)."""
