"""Runs the model for one request at a time on a dedicated compute thread, off the event loop."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from splitwise.engine.kv_cache import RequestKV
from splitwise.engine.sampling import SampledToken, SamplingParams, sample
from splitwise.model.llama import LayerKVCallback
from splitwise.model.weights import LoadedModel


class Cancelled(Exception):
    """Raised inside compute when the request was cancelled between layers."""


@dataclass
class PrefillResult:
    first: SampledToken
    started_ns: int  # wall clock when compute began (after waiting in the compute queue)
    prefill_s: float


class ModelRunner:
    def __init__(self, loaded: LoadedModel, device: str, num_threads: int | None = None):
        self.loaded = loaded
        self.device = device
        self.model = loaded.model
        self.dtype = next(self.model.parameters()).dtype
        self._num_threads = num_threads
        # One thread: compute is serialised and the event loop never runs torch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute", initializer=self._init_thread)

    def _init_thread(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def prefill(
        self,
        token_ids: Sequence[int],
        params: SamplingParams,
        kv: RequestKV,
        on_layer_kv: LayerKVCallback | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> PrefillResult:
        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if is_cancelled():
                raise Cancelled()
            if on_layer_kv is not None:
                on_layer_kv(layer, k, v)

        started_ns = time.time_ns()
        start = time.perf_counter()
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        logits = self.model(ids, 0, kv.keys, kv.values, on_layer)
        kv.length = len(token_ids)
        first = sample(logits, params, step=0)
        return PrefillResult(first, started_ns, time.perf_counter() - start)

    def decode_step(self, token_id: int, kv: RequestKV, params: SamplingParams, step: int) -> SampledToken:
        """Feeds the previous token at position kv.length and samples output number `step`."""
        ids = torch.tensor([token_id], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv.length, kv.keys, kv.values)
        kv.length += 1
        return sample(logits, params, step)
