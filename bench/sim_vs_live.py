"""Does the simulator predict the live cluster? The same trace window replayed on a live `splitwise up` cluster and
simulated with the profile `splitwise profile` measured of its workers, side by side.

For each configuration (splitwise: 1 prompt + 1 token worker; colocated: 2 mixed workers), on this machine:
1. start the cluster and measure it idle (each request size alone): the live path's cost beside the engine's
   steps, as two numbers the simulator takes (request overhead: TTFT alone less the profile's prefill; step
   overhead: TBT alone less the profile's one-sequence decode step). Nothing is fitted to the replay itself;
2. replay the trace window open loop (`splitwise bench replay`'s code) and simulate the same requests;
3. print P50/P90/P99 TTFT, TBT (every gap) and E2E, live and simulated, and the ratio.

    python -m bench.sim_vs_live [--model tiny-llama] [--profile bench/profiles/tiny-llama-cpu.csv]
        [--trace conv] [--requests 80] [--length-scale 8] [--rate-scale 4] [--engine real|mock]

With `--engine mock --mock-profile NAME`, the live cluster is mock-engine workers of that profile (then the
profile is NAME too, and --prompt-workers/--token-workers size it: the 40-worker comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from splitwise.replay import baseline_lengths, cluster_model, load_trace, measure_idle_baseline, replay
from splitwise.slo import PERCENTILES, RequestResult, percentile, write_csv
from splitwise.launcher import Cluster, UpOptions, on_free_ports, start_healthy
from splitwise.sim.designs import ClusterDesign, Pool
from splitwise.sim.machines import resolve_profile
from splitwise.sim.simulator import SimConfig, simulate
from splitwise.sim.workload import SimRequest

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start(args, prompt_workers: int, token_workers: int, mixed_workers: int) -> Cluster:
    options = on_free_ports(UpOptions(
        model=args.model, device="cpu", run_dir=Path(tempfile.mkdtemp(prefix="sw-simlive-")),
        prompt_workers=prompt_workers, token_workers=token_workers, mixed_workers=mixed_workers,
        startup_timeout_s=600, pin_workers=args.pin, engine=args.engine, mock_profile=args.mock_profile,
        mock_time_factor=args.time_factor, mock_kv_scale=args.kv_scale,
        extra_env={"SPLITWISE_NUM_THREADS": "1", "SPLITWISE_LOG_LEVEL": "WARNING", "SPLITWISE_KV_KEEP": "false",
                   "SPLITWISE_POOL_BORROW_PROMPT_TOKENS": "0"}))
    cluster = start_healthy(options)
    if cluster.credentials:  # this process's clients (replay, status) take the cluster's keys
        os.environ["SPLITWISE_API_KEY"] = cluster.credentials.api_key
        os.environ["SPLITWISE_ADMIN_KEY"] = cluster.credentials.admin_key
    return cluster


def _stats(results: list[RequestResult]) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    values = {"ttft": [r.ttft_s for r in ok], "tbt": [g for r in ok for g in r.tbt_s], "e2e": [r.e2e_s for r in ok]}
    return {f"{m}_p{q}": percentile(v, q) for m, v in values.items() if v for q in PERCENTILES}


async def one_setup(name: str, args, prompt_workers: int, token_workers: int, mixed_workers: int,
                    out: Path) -> dict:
    cluster = start(args, prompt_workers, token_workers, mixed_workers)
    try:
        model, vocab, context = await cluster_model(cluster.address)
        requests = load_trace(args.trace, rate_scale=args.rate_scale, length_scale=args.length_scale,
                              max_requests=args.requests, max_context_tokens=context, start_s=args.start)
        profile = resolve_profile(args.profile)
        if args.engine == "mock" and args.time_factor != 1:  # the mock workers' steps are this much slower
            profile = replace(profile, perf=profile.perf.scaled(args.time_factor, args.time_factor))
        log(f"{name}: measuring the idle cluster")
        idle = await measure_idle_baseline(cluster.address, vocab, context, baseline_lengths(requests),
                                           output_tokens=16, repeats=3)
        request_overhead = statistics.median(
            max(ttft - profile.perf.prefill_s(length), 0.0) for length, ttft in idle.ttft_points)
        step_overhead = statistics.median(
            max(tbt - profile.perf.decode_s(1), 0.0) for _, tbt in idle.tbt_points)
        log(f"{name}: request overhead {request_overhead * 1e3:.1f} ms, step overhead {step_overhead * 1e3:.2f} ms; "
            f"replaying {len(requests)} requests ({len(requests) / max(requests[-1].arrival_s, 1e-9):.2f} req/s)")
        live = await replay(cluster.address, requests, vocab, seed=0, timeout_s=600)
    finally:
        cluster.stop()
    write_csv(live, out / f"{name}-live.csv")
    pools = tuple(Pool(profile, role, n) for role, n in
                  (("prompt", prompt_workers), ("token", token_workers), ("mixed", mixed_workers)) if n)
    design = ClusterDesign(f"{name}:{prompt_workers}P+{token_workers}T+{mixed_workers}M", pools)
    config = SimConfig.live_defaults(request_overhead_s=request_overhead, step_overhead_s=step_overhead)
    sim_requests = [SimRequest(f"replay-{r.index}", r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
    simulated = simulate(design, sim_requests, config)
    write_csv(simulated.requests, out / f"{name}-sim.csv")
    live_stats, sim_stats = _stats(live), _stats(simulated.requests)
    return {"name": name, "requests": len(requests), "live_failed": sum(not r.ok for r in live),
            "request_overhead_ms": request_overhead * 1e3, "step_overhead_ms": step_overhead * 1e3,
            "live": live_stats, "sim": sim_stats}


def table(rows: list[dict]) -> str:
    lines = ["| configuration | metric | live P50 / P90 / P99 (ms) | simulated P50 / P90 / P99 (ms) | sim / live P50 | P90 | P99 |",
             "|---|---|---|---|---:|---:|---:|"]
    for row in rows:
        for metric in ("ttft", "tbt", "e2e"):
            live = [row["live"].get(f"{metric}_p{q}") for q in PERCENTILES]
            sim = [row["sim"].get(f"{metric}_p{q}") for q in PERCENTILES]
            if None in live or None in sim:
                continue
            ratios = [s / l if l else float("nan") for s, l in zip(sim, live)]
            lines.append(f"| {row['name']} | {metric.upper()} | {' / '.join(f'{v * 1e3:.1f}' for v in live)} | "
                         f"{' / '.join(f'{v * 1e3:.1f}' for v in sim)} | "
                         + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--profile", default=str(ROOT / "bench" / "profiles" / "tiny-llama-cpu.csv"))
    parser.add_argument("--engine", choices=("real", "mock"), default="real")
    parser.add_argument("--mock-profile", default="llama2-70b@dgx-a100")
    parser.add_argument("--time-factor", type=float, default=1.0, help="mock engine: modelled step times x this")
    parser.add_argument("--kv-scale", type=float, default=64.0, help="mock engine: KV bytes sent / this")
    parser.add_argument("--trace", default="conv")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--length-scale", type=float, default=8.0)
    parser.add_argument("--rate-scale", type=float, default=4.0)
    parser.add_argument("--prompt-workers", type=int, default=1)
    parser.add_argument("--token-workers", type=int, default=1)
    parser.add_argument("--setups", default="splitwise,colocated")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "sim-vs-live")
    args = parser.parse_args(argv)
    if args.engine == "mock":
        args.model = f"mock:{args.mock_profile}"
        args.profile = args.mock_profile
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    total = args.prompt_workers + args.token_workers
    for name in args.setups.split(","):
        if name == "splitwise":
            rows.append(asyncio.run(one_setup(name, args, args.prompt_workers, args.token_workers, 0, args.out)))
        elif name == "colocated":
            rows.append(asyncio.run(one_setup(name, args, 0, 0, total, args.out)))
        log(json.dumps(rows[-1]))
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n\n" + json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
