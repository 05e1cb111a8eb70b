"""What the OpenAI-compatible HTTP gateway costs: the same requests over gRPC (straight to the scheduler) and over
HTTP (through the gateway), side by side in one run, on a launched mock-engine cluster (real scheduler, workers,
batching and KV transport; modelled step times, so the host's cores go to the front doors, not to a model).

1. Latency, one request at a time, the two front doors alternating: the time to first token and each token gap, as
   the client sees them; the gateway's added P50 and P99 (HTTP minus gRPC).
2. Load: CONCURRENCY streams at once through each front door in turn: tokens per second, and the gateway's CPU
   seconds (from /proc) per 1,000 streamed tokens, and its share of one core.

    python -m bench.openai_gateway [--requests 40] [--concurrency 64] [--out bench-results/openai-gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from splitwise.replay import OpenAIClient, TraceRequest, _one, synthetic_prompt
from splitwise.client import SplitwiseClient
from splitwise.launcher import UpOptions, cluster_model_name, on_free_ports, start_healthy
from splitwise.model import DEFAULT_MOCK_PROFILE
from splitwise.model.mock import MOCK_VOCAB_SIZE

TIMEOUT_S = 300.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(grpc_client, http_client, args) -> dict:
    """One request at a time, gRPC and HTTP alternating, the same prompt for both."""
    out = {"grpc": {"ttft": [], "tbt": []}, "openai": {"ttft": [], "tbt": []}}
    for i in range(args.requests):
        request = TraceRequest(i, 0.0, args.prompt_tokens, args.output_tokens)
        prompt = synthetic_prompt(request, MOCK_VOCAB_SIZE, seed=i)
        order = ("grpc", "openai") if i % 2 == 0 else ("openai", "grpc")
        for api in order:
            if api == "grpc":
                result = await _one(grpc_client, TraceRequest(2 * i, 0.0, args.prompt_tokens, args.output_tokens), prompt,
                                    TIMEOUT_S)
            else:
                result = await http_client.one(TraceRequest(2 * i + 1, 0.0, args.prompt_tokens, args.output_tokens),
                                              prompt, TIMEOUT_S)
            if result.error:
                raise RuntimeError(f"{api} request failed: {result.error}")
            out[api]["ttft"].append(result.ttft_s)
            out[api]["tbt"] += result.tbt_s
    return out


async def load(send, args, first_index: int) -> tuple[int, float]:
    """args.load_requests streams, args.concurrency at once; (tokens received, seconds)."""
    slots = asyncio.Semaphore(args.concurrency)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        request = TraceRequest(first_index + i, 0.0, args.prompt_tokens, args.load_output_tokens)
        async with slots:
            result = await send(request, synthetic_prompt(request, MOCK_VOCAB_SIZE, seed=i), TIMEOUT_S)
        if result.error:
            raise RuntimeError(f"request failed under load: {result.error}")
        tokens += result.output_tokens

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.load_requests)))
    return tokens, time.monotonic() - started


def report(lat: dict, loads: dict, args) -> tuple[str, dict]:
    rows, summary = [], {}
    for metric in ("ttft", "tbt"):
        for q, name in ((0.5, "P50"), (0.9, "P90"), (0.99, "P99")):
            g, h = percentile(lat["grpc"][metric], q), percentile(lat["openai"][metric], q)
            summary[f"{metric}_{name.lower()}_added_ms"] = 1000 * (h - g)
            rows.append(f"| {metric.upper()} {name} | {1000 * g:.2f} | {1000 * h:.2f} | {1000 * (h - g):+.2f} |")
    lines = [f"mock engine {args.profile}, {args.prompt_tokens}-token prompts; latency: {args.requests} requests "
             f"of {args.output_tokens} tokens through each front door, one at a time, alternating", "",
             "| client-side | gRPC ms | HTTP ms | gateway adds ms |", "|---|---|---|---|", *rows, "",
             f"load: {args.load_requests} streams of {args.load_output_tokens} tokens, {args.concurrency} at once", "",
             "| front door | tokens/s | gateway CPU ms per 1,000 tokens | gateway share of one core |",
             "|---|---|---|---|"]
    for api, m in loads.items():
        cpu = f"{1e6 * m['gateway_cpu_s'] / m['tokens']:.1f}" if api == "openai" else "-"
        share = f"{100 * m['gateway_cpu_s'] / m['seconds']:.0f}%" if api == "openai" else "-"
        lines.append(f"| {api} | {m['tokens'] / m['seconds']:.0f} | {cpu} | {share} |")
    ratio = (loads["openai"]["tokens"] / loads["openai"]["seconds"]) / (loads["grpc"]["tokens"] / loads["grpc"]["seconds"])
    lines.append(f"\nHTTP / gRPC throughput under load: {ratio:.2f}x")
    summary.update({"throughput_ratio_http_over_grpc": ratio, "loads": loads,
                    "gateway_cpu_ms_per_1000_tokens": 1e6 * loads["openai"]["gateway_cpu_s"] / loads["openai"]["tokens"]})
    return "\n".join(lines), summary


async def run(args) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="openai-gateway-"))
    options = on_free_ports(UpOptions(
        model="", engine="mock", mock_profile=args.profile, mock_kv_scale=args.kv_scale, http_port=1, run_dir=run_dir,
        startup_timeout_s=300, extra_env={"SPLITWISE_LOG_LEVEL": "WARNING"}))
    print(f"starting a mock cluster with the gateway (logs in {run_dir})...", file=sys.stderr)
    cluster = await asyncio.to_thread(start_healthy, options)
    try:
        gateway_pid = next(c.proc.pid for c in cluster.children if c.name == "gateway")
        model = cluster_model_name(options)
        key = cluster.credentials.api_key
        async with SplitwiseClient(cluster.address, api_key=key) as grpc_client, \
                OpenAIClient(cluster.http_address, model, api_key=key) as http_client:
            await latency(grpc_client, http_client, argparse.Namespace(**{**vars(args), "requests": 2}))  # warm-up
            print(f"latency: {args.requests} requests through each front door...", file=sys.stderr)
            lat = await latency(grpc_client, http_client, args)
            loads = {}
            for api, send in (("grpc", lambda r, p, t: _one(grpc_client, r, p, t)), ("openai", http_client.one)):
                print(f"load: {args.load_requests} streams over {api}...", file=sys.stderr)
                before = cpu_seconds(gateway_pid)
                tokens, seconds = await load(send, args, 100_000 if api == "grpc" else 200_000)
                loads[api] = {"tokens": tokens, "seconds": seconds, "gateway_cpu_s": cpu_seconds(gateway_pid) - before}
    finally:
        cluster.stop()
    text, summary = report(lat, loads, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openai_gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=DEFAULT_MOCK_PROFILE, help="the machine profile the mock workers model")
    parser.add_argument("--kv-scale", type=float, default=1024.0, help="KV bytes sent = modelled / this")
    parser.add_argument("--requests", type=int, default=40, help="latency: requests through each front door")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--load-requests", type=int, default=192)
    parser.add_argument("--load-output-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench-results/openai-gateway"))
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
