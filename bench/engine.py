"""Engine benchmark: our continuous-batching engine vs transformers generate(), same model, same threads.

Run: .venv/bin/python -m bench.engine [--quick]   (writes docs/benchmarks.md's engine section)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from splitwise.replay import trace_path
from splitwise.engine.llm_engine import Engine, EngineConfig, Finished
from splitwise.engine.sampling import SamplingParams
from splitwise.model.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


# -- ours -----------------------------------------------------------------------------------------


def run_engine(engine: Engine, prompts: list[list[int]], outputs: list[int]) -> float:
    """Submits everything at once; returns seconds until the last request finishes."""

    async def main() -> float:
        start = time.perf_counter()
        handles = [engine.submit(f"b{i}-{time.monotonic_ns()}", p, SamplingParams(max_tokens=o, ignore_eos=True))
                   for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))]
        for handle in handles:
            while not isinstance(await handle.next_event(), Finished):
                pass
        return time.perf_counter() - start

    return asyncio.run(main())


# -- transformers ---------------------------------------------------------------------------------


def run_hf(model, prompts: list[list[int]], outputs: list[int], pad_id: int) -> float:
    """One static batch: left-padded prompts, generating until the longest output is done."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=max(outputs), min_new_tokens=max(outputs),
                       do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - start


def hf_prefill_s(model, ids: list[int]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(torch.tensor([ids]), use_cache=True)
        return time.perf_counter() - start


def hf_decode_step_s(model, batch: int, context: int, vocab: int, steps: int = 8) -> float:
    from transformers import DynamicCache

    ids = torch.tensor(random_prompts(batch, context, vocab, seed=batch))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps


def engine_decode_step_s(engine: Engine, batch: int, context: int, vocab: int, steps: int = 8) -> float:
    """Median decode step once the whole batch is decoding (prefills of later requests interleave
    with decodes of earlier ones, so requests generate enough tokens to overlap)."""
    engine.steps.clear()
    run_engine(engine, random_prompts(batch, context, vocab, seed=batch), [steps + 48] * batch)
    decode = [s.seconds for s in engine.steps if not s.prefill and s.num_seqs == batch]
    if not decode:
        raise RuntimeError(f"no decode step ran the whole batch of {batch}")
    return statistics.median(decode)


def engine_prefill_s(engine: Engine, ids: list[int]) -> float:
    engine.steps.clear()
    run_engine(engine, [ids], [1])
    return sum(s.seconds for s in engine.steps if s.prefill)


def conv_requests(n: int, scale: int) -> tuple[list[int], list[int]]:
    with trace_path("conv").open() as f:
        rows = list(csv.DictReader(f))[:n]
    return ([max(1, int(r["ContextTokens"]) // scale) for r in rows],
            [max(1, int(r["GeneratedTokens"]) // scale) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the program runs")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    loaded = load_model("smollm2-135m-instruct")
    vocab = loaded.config.vocab_size
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=torch.float32).eval()
    engine = Engine(loaded, "cpu", EngineConfig(kv_memory_bytes=2 << 30))
    rows: list[tuple[str, str, str, str]] = []  # (what, ours, transformers, ratio)

    def add(row: tuple[str, str, str, str]) -> None:
        rows.append(row)
        log("  | " + " | ".join(row) + " |")

    sizes = [1, 4] if args.quick else [1, 8, 32, 64]
    prompt_len, out_len = (64, 16) if args.quick else (256, 64)
    for n in sizes:
        prompts = random_prompts(n, prompt_len, vocab, seed=n)
        log(f"throughput N={n}: ours...")
        ours = run_engine(engine, prompts, [out_len] * n)
        log(f"throughput N={n}: transformers...")
        theirs = run_hf(hf, prompts, [out_len] * n, pad_id=0)
        tokens = n * out_len
        add((f"{n} x {prompt_len} -> {out_len} tokens, output tok/s",
                     f"{tokens / ours:.1f}", f"{tokens / theirs:.1f}", f"{theirs / ours:.2f}x"))

    n_hetero = 8 if args.quick else 64
    lengths, outputs = conv_requests(n_hetero, 4 if not args.quick else 16)
    rng = random.Random(1)
    prompts = [[rng.randrange(100, vocab) for _ in range(n)] for n in lengths]
    log(f"heterogeneous batch of {n_hetero} (conv trace / 4): ours...")
    ours = run_engine(engine, prompts, outputs)
    log("heterogeneous batch: transformers...")
    theirs = run_hf(hf, prompts, outputs, pad_id=0)
    add((f"conv trace, {n_hetero} requests at once (lengths / 4), useful output tok/s",
                 f"{sum(outputs) / ours:.1f}", f"{sum(outputs) / theirs:.1f}", f"{theirs / ours:.2f}x"))

    for length in ([64, 128] if args.quick else [128, 512, 1024, 2048]):
        ids = random_prompts(1, length, vocab, seed=length)[0]
        engine_prefill_s(engine, ids)  # warm
        ours = statistics.median(engine_prefill_s(engine, ids) for _ in range(3))
        theirs = statistics.median(hf_prefill_s(hf, ids) for _ in range(3))
        log(f"prefill {length}: ours {ours * 1e3:.0f} ms, transformers {theirs * 1e3:.0f} ms")
        add((f"prefill latency, {length} tokens (ms)", f"{ours * 1e3:.0f}", f"{theirs * 1e3:.0f}",
                     f"{theirs / ours:.2f}x"))

    for batch in ([1, 4] if args.quick else [1, 8, 32, 64]):
        ours = engine_decode_step_s(engine, batch, prompt_len, vocab)
        theirs = hf_decode_step_s(hf, batch, prompt_len, vocab)
        log(f"decode step batch {batch}: ours {ours * 1e3:.1f} ms, transformers {theirs * 1e3:.1f} ms")
        add((f"decode step, batch {batch}, context {prompt_len} (ms)", f"{ours * 1e3:.1f}",
                     f"{theirs * 1e3:.1f}", f"{theirs / ours:.2f}x"))
    engine.stop()

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, "
               f"float32, SmolLM2-135M-Instruct")
    table = ["| benchmark | ours | transformers | ours vs transformers (higher is better) |", "|---|---|---|---|"]
    table += [f"| {what} | {a} | {b} | {r} |" for what, a, b, r in rows]
    text = "\n".join(table)
    print(f"\nmachine: {machine}\n\n{text}")
    if not args.no_write and not args.quick:
        write_section("Engine", f"Machine: {machine}. Run `python -m bench.engine`.\n\n{text}\n")


def write_section(title: str, body: str) -> None:
    """Replaces (or appends) the section `## title` of docs/benchmarks.md."""
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    header = f"## {title}\n"
    start = existing.find(header)
    if start == -1:
        existing = existing.rstrip("\n") + "\n\n" + header + "\n" + body
    else:
        end = existing.find("\n## ", start + len(header))
        existing = existing[:start] + header + "\n" + body + ("" if end == -1 else existing[end:])
    RESULTS.write_text(existing)


if __name__ == "__main__":
    main()
