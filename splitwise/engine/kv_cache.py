"""Per-request KV storage drawn from a worker's token budget, with exact accounting."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from splitwise.model.llama import LlamaConfig


class KVCapacityError(Exception):
    """The request does not fit in the KV budget now (or ever, when `ever` is set)."""

    def __init__(self, message: str, ever: bool):
        super().__init__(message)
        self.ever = ever


@dataclass
class RequestKV:
    """One request's KV cache: keys and values [num_layers, num_kv_heads, capacity, head_dim]."""

    request_id: str
    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0  # positions filled

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class KVPool:
    """Hands out RequestKV tensors while the sum of reserved tokens stays within capacity_tokens."""

    def __init__(self, config: LlamaConfig, capacity_tokens: int, device: str, dtype: torch.dtype):
        self.config = config
        self.capacity_tokens = capacity_tokens
        self.device = device
        self.dtype = dtype
        self._held: dict[str, RequestKV] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element

    @property
    def used_tokens(self) -> int:
        with self._lock:
            return sum(kv.capacity for kv in self._held.values())

    @property
    def num_requests(self) -> int:
        with self._lock:
            return len(self._held)

    def reserve(self, request_id: str, tokens: int) -> RequestKV:
        if tokens > self.capacity_tokens:
            raise KVCapacityError(
                f"request needs KV for {tokens} tokens but this worker holds at most {self.capacity_tokens}",
                ever=True,
            )
        with self._lock:
            if request_id in self._held:
                raise ValueError(f"request {request_id!r} already holds KV here")
            used = sum(kv.capacity for kv in self._held.values())
            if used + tokens > self.capacity_tokens:
                raise KVCapacityError(
                    f"KV budget full: {used}/{self.capacity_tokens} tokens in use, {tokens} needed", ever=False
                )
            c = self.config
            shape = (c.num_layers, c.num_kv_heads, tokens, c.head_dim)
            kv = RequestKV(
                request_id,
                torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device),
            )
            self._held[request_id] = kv
            return kv

    def free(self, request_id: str) -> bool:
        with self._lock:
            return self._held.pop(request_id, None) is not None
