"""`splitwise profile`: our engine's step times on this machine, measured on the engine a worker loads, written as a
profile CSV in the paper's columns with its sidecar (splitwise.sim.measured), for the simulator.

Each row is a batch of `batch_size` prompts of `prompt_size` tokens: `prompt_time` the prefill of the whole batch
(one engine step while it fits the max batch tokens; beyond, its chunked steps summed), `token_time` one decode step
of those `batch_size` sequences at a context of `token_size` (= prompt_size) tokens, as a token worker runs them
once their KV has arrived. Both are medians of the repeats, in ms.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from splitwise.config import TokenWorkerConfig, parse_worker_config
from splitwise.engine.llm_engine import Engine, Finished
from splitwise.engine.model_runner import ModelRunner
from splitwise.engine.sampling import SampledToken, SamplingParams
from splitwise.sim.measured import MeasuredMachine, sidecar_path
from splitwise.sim.perf_model import write_profile_rows
from splitwise.sim.profile_options import (BATCH_SIZES, PROMPT_SIZES, QUICK_BATCH_SIZES, QUICK_PROMPT_SIZES,
                                          WORKER_OPTIONS)

@dataclass(frozen=True)
class ProfilePoint:
    prompt_size: int
    batch_size: int


def plan(prompt_sizes, batch_sizes, max_context_tokens: int, kv_capacity_tokens: int, decode_steps: int,
         max_decode_batch: int) -> list[ProfilePoint]:
    """The points a worker can run: a prompt longer than the context window (with its decode steps) is profiled at
    the longest that fits; batches whose KV passes the worker's capacity, or beyond its decode batch, are left out."""
    longest = max_context_tokens - decode_steps - 1
    sizes = sorted({min(p, longest) for p in prompt_sizes if longest > 0})
    return [ProfilePoint(p, b) for b in sorted(set(batch_sizes)) for p in sizes
            if b * (p + decode_steps) <= kv_capacity_tokens and b <= max_decode_batch]


class EngineProfiler:
    """Runs prefill batches and decode batches of known sizes on an engine and reads its step records."""

    def __init__(self, engine: Engine, seed: int = 0):
        self.engine = engine
        self.vocab_size = engine.loaded.config.vocab_size
        self.rng = random.Random(seed)
        self._ids = 0

    def _prompts(self, point: ProfilePoint) -> list[tuple[str, list[int]]]:
        self._ids += 1
        return [(f"profile-{self._ids}-{i}", [self.rng.randrange(self.vocab_size) for _ in range(point.prompt_size)])
                for i in range(point.batch_size)]

    async def prefill_s(self, point: ProfilePoint) -> float:
        """The whole prefill of the batch, its prompts submitted together as a prompt worker queues them."""
        engine = self.engine
        engine.steps.clear()
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        with engine.step_together():
            handles = [engine.submit(rid, ids, params, prefill_only=True) for rid, ids in self._prompts(point)]
        await _finished(handles)
        steps = [s for s in engine.steps if s.prefill]
        tokens = sum(s.num_tokens for s in steps)
        if tokens != point.prompt_size * point.batch_size:
            raise RuntimeError(f"prefill of {point} computed {tokens} tokens in {len(steps)} steps")
        return sum(s.seconds for s in steps)

    async def decode_s(self, point: ProfilePoint, steps: int) -> list[float]:
        """`steps` decode steps of the whole batch, each sequence reserved with its prompt's KV in place and
        started, as a token worker does once the KV has arrived (the KV's values do not change the cost)."""
        engine = self.engine
        engine.steps.clear()
        params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        with engine.step_together():
            handles = [engine.reserve(rid, ids, params) for rid, ids in self._prompts(point)]
            for handle in handles:
                engine.start_decoding(handle, SampledToken(handle.seq.prompt_ids[-1], 0.0))
        await _finished(handles)
        times = [s.seconds for s in engine.steps if not s.prefill and s.num_seqs == point.batch_size]
        if len(times) != steps:
            raise RuntimeError(f"decode of {point}: {len(times)} of {steps} steps ran the whole batch")
        return times


async def _finished(handles) -> None:
    for handle in handles:
        while not isinstance(await handle.next_event(), Finished):
            pass


def hardware_label(device: str, num_threads: int) -> str:
    if device.startswith("cuda"):
        return "cuda-" + torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "-")
    return f"cpu-{num_threads}core{'s' if num_threads != 1 else ''}"


async def measure(engine: Engine, points: list[ProfilePoint], repeats: int, model: str, hardware: str,
                  log=print) -> list[dict]:
    """One profile row per point, in the profile CSV's columns; one progress line per point."""
    profiler = EngineProfiler(engine)
    warm = ProfilePoint(min(p.prompt_size for p in points), 1)
    await profiler.prefill_s(warm)  # first steps allocate and warm caches
    await profiler.decode_s(warm, 2)
    rows = []
    for i, point in enumerate(points, 1):
        prefill_s = statistics.median([await profiler.prefill_s(point) for _ in range(repeats)])
        decode_s = statistics.median(await profiler.decode_s(point, repeats))
        log(f"[{i:>3}/{len(points)}] batch {point.batch_size:>3} x {point.prompt_size:>5} tokens: "
            f"prefill {prefill_s * 1e3:9.2f} ms, decode step {decode_s * 1e3:8.2f} ms")
        rows.append({"model": model, "hardware": hardware, "prompt_size": point.prompt_size,
                     "batch_size": point.batch_size, "token_size": point.prompt_size,
                     "prompt_time": round(prefill_s * 1e3, 4), "token_time": round(decode_s * 1e3, 4), "e2e_time": 0,
                     "peak_power": 0, "average_power": 0, "tensor_parallel": 1})
    return rows


def describe(engine: Engine, config: TokenWorkerConfig, hardware: str, device: str, num_threads: int,
             repeats: int, link_bytes_per_s: float | None, load_average: tuple[float, float]) -> MeasuredMachine:
    loaded = engine.loaded
    c = loaded.config
    dtype_bytes = torch.empty((), dtype=engine.runner.dtype).element_size()
    kv_bytes_per_block = ModelRunner.bytes_per_token(loaded, engine.runner.dtype) * config.block_size
    prompt_kv_bytes = parse_worker_config(["--role", "prompt"]).kv_memory_bytes
    return MeasuredMachine(
        model=loaded.name, hardware=hardware, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=config.dtype, dtype_bytes=dtype_bytes,
        weights_bytes=sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
        max_context_tokens=engine.max_context, kv_memory_bytes=config.kv_memory_bytes,
        kv_capacity_tokens=engine.blocks.capacity_tokens,
        prompt_worker_kv_capacity_tokens=prompt_kv_bytes // kv_bytes_per_block * config.block_size,
        block_size=config.block_size, max_batch_tokens=config.max_batch_tokens,
        max_decode_batch=config.max_decode_batch, num_threads=num_threads, device=device,
        host=socket.gethostname(), cpu_count=os.cpu_count() or 0, platform=platform.platform(),
        torch_version=torch.__version__, repeats=repeats,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), link_bytes_per_s=link_bytes_per_s,
        load_average=load_average,
    )


def run(args) -> int:
    from splitwise.config import resolve_device
    from splitwise.worker import load_engine

    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    config = dataclasses.replace(TokenWorkerConfig(), **{name: getattr(args, name) for name in WORKER_OPTIONS})
    device = resolve_device(config.device)
    started = time.perf_counter()
    engine = load_engine(config).engine
    try:
        num_threads = config.num_threads or torch.get_num_threads()
        hardware = args.hardware or hardware_label(device, num_threads)
        model = engine.loaded.name
        out = Path(args.out or f"profiles/{Path(model).name}-{hardware}.csv")
        points = plan(args.prompt_sizes or (QUICK_PROMPT_SIZES if args.quick else PROMPT_SIZES),
                      args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES),
                      engine.max_context, engine.blocks.capacity_tokens, args.repeats, config.max_decode_batch)
        if not points:
            print("error: no point fits this worker's context window and KV capacity", file=sys.stderr)
            return 2
        print(f"profiling {model} on {hardware} ({device}, {config.dtype}, {num_threads} threads): "
              f"{len(points)} points, {args.repeats} repeats each", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        if load_before > (os.cpu_count() or 1) / 2:
            print(f"warning: this host's load average is {load_before:.1f} on {os.cpu_count()} cores: other work "
                  f"will slow the steps measured (the sidecar records it)", file=sys.stderr, flush=True)
        rows = asyncio.run(measure(engine, points, args.repeats, model, hardware,
                                   log=lambda line: print(line, file=sys.stderr, flush=True)))
        sidecar = describe(engine, config, hardware, device, num_threads, args.repeats, args.link_bytes_per_s,
                           (load_before, os.getloadavg()[0]))
    finally:
        engine.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_profile_rows(out, rows)
    sidecar.write(sidecar_path(out))
    print(f"wrote {out} and {sidecar_path(out)} ({len(rows)} points in {time.perf_counter() - started:.0f} s)")
    return 0
