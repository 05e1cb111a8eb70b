"""What the worker service builds on: loading the engine and keeping the worker's registry entry alive."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from splitwise.cluster.registry import Heartbeat, WorkerInfo, WorkerRegistry, connect
from splitwise.config import cache_dir_of, default_worker_id, resolve_device
from splitwise.engine.llm_engine import Engine, EngineConfig, StepRecord
from splitwise.engine.mock_runner import MockModelRunner
from splitwise.kv.layout import KVLayout
from splitwise.kv.transport.shm import remove_stale_segments
from splitwise.kv.transport.registry import WorkerTransports
from splitwise.model.mock import is_mock, load_mock_model, mock_tokenizer, served_model_name
from splitwise.model.weights import load_model, load_tokenizer
from splitwise.rpc.calls import WORKER_CALLS_VERSION
from splitwise.security.keys import load_cluster_key
from splitwise.telemetry import metrics
from splitwise.telemetry.metrics import GaugeSource

log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    engine: Engine
    layout: KVLayout


def load_engine(config) -> LoadedEngine:
    """The engine of `config.engine`: the model's (real), or the mock profile's modelled time (mock)."""
    engine_config = EngineConfig(
        kv_memory_bytes=config.kv_memory_bytes, block_size=config.block_size,
        max_batch_tokens=config.max_batch_tokens, max_decode_batch=config.max_decode_batch,
        max_queued_prompt_tokens=config.max_queued_prompt_tokens, num_threads=config.num_threads,
        mixed_batches=config.mixed_batches,
    )
    start = time.perf_counter()
    if is_mock(served_model_name(config)):
        loaded = load_mock_model(config.mock_profile, config.mock_time_factor, config.mock_kv_scale)
        engine = Engine(loaded, "cpu", engine_config, MockModelRunner, tokenizer=mock_tokenizer())
        log.info("mock engine %s; %d blocks of %d tokens", loaded.describe(), engine.blocks.num_blocks,
                 engine.blocks.block_size)
    else:
        device = resolve_device(config.device)
        loaded = load_model(config.model, device=device, dtype=config.dtype, cache_dir=cache_dir_of(config))
        engine = Engine(loaded, device, engine_config, tokenizer=load_tokenizer(loaded.folder))
        log.info("loaded %s on %s (%s) in %.1fs; KV cache %d blocks of %d tokens", loaded.name, device, config.dtype,
                 time.perf_counter() - start, engine.blocks.num_blocks, engine.blocks.block_size)
    engine.on_step = record_step
    return LoadedEngine(engine, KVLayout.of(loaded.config, engine.runner.dtype, loaded.fingerprint))


def record_step(step: StepRecord) -> None:
    phase = {"phase": "prefill" if step.prefill else "decode"}
    metrics.engine_step_duration.record(step.seconds, phase)
    metrics.engine_step_tokens.add(step.num_tokens, phase)


def worker_id_of(config, role: str) -> str:
    return config.worker_id or default_worker_id(role)


def engine_gauges(engine: Engine, worker_id: str, pool: str) -> GaugeSource:
    """This worker's KV blocks and queues, for the metrics endpoint."""

    def observe():
        worker = {"splitwise.worker_id": worker_id, "splitwise.pool": pool}
        waiting, running = engine.queue_depths
        used = engine.blocks.num_used
        yield "splitwise.kv.blocks", used, {**worker, "state": "used"}
        yield "splitwise.kv.blocks", engine.blocks.num_blocks - used, {**worker, "state": "free"}
        yield "splitwise.queue.depth", waiting, worker
        yield "splitwise.requests.running", running, worker

    return observe


def start_kv_transports(config, address: str) -> WorkerTransports:
    if "shm" in config.kv_transports.split(","):
        stale = remove_stale_segments()
        if stale:
            log.info("removed %d KV staging segments of dead processes from /dev/shm", stale)
    return WorkerTransports.start(config.kv_transports, address.rsplit(":", 1)[0], config.kv_mooncake_protocol)


def start_heartbeat(config, worker_id: str, role: str, address: str, engine: Engine,
                    transports: WorkerTransports) -> Heartbeat:
    """A heartbeat announcing this worker with its current load, signed with the cluster key."""
    registry = WorkerRegistry(connect(config.redis_url), load_cluster_key(config.tls_dir), ttl_s=config.registry_ttl_s)
    loaded = engine.loaded
    blocks = engine.blocks

    def describe() -> WorkerInfo:
        return WorkerInfo(
            worker_id, role, address, loaded.name, loaded.fingerprint,
            pending_tokens=engine.pending_tokens, active_requests=engine.num_requests,
            kv_capacity_tokens=blocks.capacity_tokens, kv_used_tokens=blocks.num_used * blocks.block_size,
            kv_transports=",".join(transports.transports), host_id=transports.host_id,
            worker_calls=WORKER_CALLS_VERSION,
        )

    return Heartbeat(registry, describe, config.heartbeat_s)


async def drain(engine: Engine, grace_s: float, receivers: dict | None = None) -> bool:
    """Waits until the requests in flight here have finished (their KV transfers included), at most grace_s.

    The gRPC server keeps serving meanwhile (a reserved request's KV must still be able to arrive); new work
    is refused by the servicers' draining flag. Returns whether everything finished in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while engine.num_requests or receivers:
        if loop.time() > deadline:
            log.warning("drain: %d requests still in flight after %.0fs; cancelling them", engine.num_requests, grace_s)
            return False
        await asyncio.sleep(0.05)
    return True
