"""Does phase splitting pay off on this machine? Splitwise against colocated serving, on the Azure traces.

Same machine, same total cores (one compute thread per worker): (a) splitwise, 1 prompt worker + 1 token
worker; (b) colocated, 2 mixed workers with continuous batching; (c) splitwise with the mixed pool (a busy
pool borrows the other's worker). For each configuration and trace: the idle baseline (each request size
alone), then a sweep of arrival rates (open loop), each checked against the paper's nine SLOs; goodput is the
highest rate at which all nine hold.

Run: .venv/bin/python -m bench.splitwise_vs_colocated [--traces conv code] [--rates 0.25 0.5 1 2]
     [--requests 60] [--length-scale 8] [--model smollm2-135m-instruct]
Writes bench-results/splitwise-vs-colocated/ (CSV per run, report, plots) and prints the table for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.replay import baseline_lengths, load_trace, measure_idle_baseline, replay
from bench.slo import IdleBaseline, goodput, read_csv, slo_attainment, summarize, write_csv
from bench.slo_plots import plot_goodput, plot_latency_cdfs
from splitwise.launcher import Cluster, UpOptions
from splitwise.model.weights import read_hf_config, resolve_model

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    name: str
    prompt_workers: int
    token_workers: int
    env: dict = field(default_factory=dict)


# Colocated first: its idle baseline (each request alone on one idle worker) is every configuration's reference.
SETUPS = [
    Setup("colocated", 0, 2, {"SPLITWISE_TOKEN_WORKER_ROLE": "mixed"}),
    Setup("splitwise", 1, 1, {"SPLITWISE_POOL_BORROW_PROMPT_TOKENS": "0"}),
    Setup("splitwise+mixed", 1, 1, {"SPLITWISE_POOL_BORROW_PROMPT_TOKENS": "512", "SPLITWISE_POOL_COOLDOWN_S": "1"}),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start(setup: Setup, model: str, run_dir: Path, base_port: int) -> Cluster:
    options = UpOptions(
        model=model, device="cpu", run_dir=run_dir, scheduler_port=base_port, prompt_port=base_port + 10,
        token_port=base_port + 20, kv_store_port=base_port + 30, redis_port=base_port + 40, metrics_port=0,
        prompt_workers=setup.prompt_workers, token_workers=setup.token_workers, startup_timeout_s=600,
        extra_env={"SPLITWISE_NUM_THREADS": "1", "SPLITWISE_LOG_LEVEL": "WARNING", **setup.env})
    cluster = Cluster(options)
    cluster.start()
    cluster.wait_healthy()
    return cluster


async def measure(setup: Setup, args, traces: list[str], vocab: int, context: int, out: Path,
                  baseline: IdleBaseline | None) -> tuple[dict, IdleBaseline]:
    """Rate sweep of one configuration on each trace (measuring the idle baseline first if none is given).

    A run whose CSV is in `out` already is read back, not repeated (an interrupted experiment resumes)."""
    csv_of = {(trace, rate_scale): out / f"{setup.name}-{trace}-x{rate_scale}.csv"
              for trace in traces for rate_scale in args.rates}
    cluster = None
    if baseline is None or not all(path.exists() for path in csv_of.values()):
        cluster = start(setup, args.model, Path(tempfile.mkdtemp(prefix=f"sw-{setup.name}-")), args.base_port)
    address = cluster.address if cluster else ""
    found: dict = {}
    try:
        if baseline is None:
            log(f"{setup.name}: measuring the idle baseline (each request size alone)")
            everything = [r for trace in traces for rate_scale in args.rates[:1]
                          for r in load_trace(trace, rate_scale=rate_scale, length_scale=args.length_scale,
                                              max_requests=args.requests, max_context_tokens=context)]
            baseline = await measure_idle_baseline(address, vocab, context, baseline_lengths(everything),
                                                   output_tokens=16, repeats=2)
            (out / "baseline.json").write_text(json.dumps(baseline.to_dict(), indent=1))
        for trace in traces:
            sweep = []
            for rate_scale in args.rates:
                requests = load_trace(trace, rate_scale=rate_scale, length_scale=args.length_scale,
                                      max_requests=args.requests, max_context_tokens=context)
                rate = len(requests) / max(requests[-1].arrival_s, 1e-9)
                log(f"{setup.name} / {trace}: x{rate_scale} ({rate:.2f} req/s, {len(requests)} requests)")
                if csv_of[trace, rate_scale].exists():
                    results = read_csv(csv_of[trace, rate_scale])
                else:
                    results = await replay(address, requests, vocab, seed=args.seed, timeout_s=args.timeout_s)
                    write_csv(results, csv_of[trace, rate_scale])
                report = slo_attainment(results, baseline)
                summary = summarize(results)
                sweep.append({"rate_scale": rate_scale, "rate": rate, "all_met": report.all_met,
                              "summary": summary, "report": report, "results": results})
                log(f"  all nine SLOs {'met' if report.all_met else 'NOT met'} ({summary['failed']} failed); "
                    f"P99 TBT {_ms(summary['tbt_p99_s'])} ms, P99 TTFT {_ms(summary['ttft_p99_s'])} ms")
            found[trace] = sweep
    finally:
        if cluster:
            cluster.stop()
    return found, baseline


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}"


def table(measured: dict[str, dict], traces: list[str]) -> str:
    lines = []
    for trace in traces:
        lines += [f"**{trace}** trace", "",
                  "| configuration | goodput (req/s) | vs colocated | P99 TBT at the highest rate met (ms) | "
                  "P99 TBT at the top rate (ms) | P99 TTFT at the top rate (ms) |",
                  "|---|---|---|---|---|---|"]
        good = {name: goodput([(p["rate"], p["all_met"]) for p in sweeps[trace]]) for name, sweeps in measured.items()}
        for name, sweeps in measured.items():
            sweep = sweeps[trace]
            met = [p for p in sweep if p["all_met"] and good[name] is not None and p["rate"] <= good[name]]
            top = sweep[-1]["summary"]
            ratio = (f"{good[name] / good['colocated']:.2f}x" if good.get("colocated") and good[name] is not None
                     else "n/a")
            at_good = _ms(met[-1]["summary"]["tbt_p99_s"]) if met else "n/a"
            rate = f"{good[name]:.2f}" if good[name] is not None else "none met"
            lines.append(f"| {name} | {rate} | {ratio} | {at_good} | {_ms(top['tbt_p99_s'])} | "
                         f"{_ms(top['ttft_p99_s'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", nargs="+", default=["conv", "code"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0],
                        help="rate scales of the sweep (x the trace's arrival rate)")
    parser.add_argument("--requests", type=int, default=60, help="requests per run")
    parser.add_argument("--length-scale", type=float, default=8.0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--setups", nargs="+", default=[s.name for s in SETUPS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--base-port", type=int, default=52000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "splitwise-vs-colocated")
    args = parser.parse_args(argv)
    args.rates = sorted(args.rates)
    args.out.mkdir(parents=True, exist_ok=True)
    hf = read_hf_config(resolve_model(args.model)[1])
    vocab, context = hf["vocab_size"], hf["max_position_embeddings"]
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model}")
    saved = args.out / "baseline.json"  # the reference of an earlier, interrupted run
    measured, baseline = {}, IdleBaseline.from_dict(json.loads(saved.read_text())) if saved.exists() else None
    for setup in SETUPS:
        if setup.name in args.setups:
            measured[setup.name], baseline = asyncio.run(measure(setup, args, args.traces, vocab, context, args.out,
                                                                 baseline))
    for trace in args.traces:
        top = {name: sweeps[trace][-1]["results"] for name, sweeps in measured.items()}
        plot_latency_cdfs(top, args.out / f"latency-cdf-{trace}.png")
        plot_goodput({name: [(p["rate"], p["all_met"], p["report"].slowdown("tbt", 99)) for p in sweeps[trace]]
                      for name, sweeps in measured.items()}, args.out / f"goodput-{trace}.png")
    text = table(measured, args.traces)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
