"""Does phase splitting pay off on this machine? Splitwise against colocated serving, on the Azure traces.

Same machine, same total cores (one compute thread per worker, each worker pinned to its own share of the
cores unless --no-pin): (a) splitwise, 1 prompt worker + 1 token worker; (b) colocated, 2 mixed workers with
continuous batching; (c) splitwise with the mixed pool (a busy pool borrows the other's worker). For each
configuration and trace: the idle baseline (each request size alone), then a sweep of arrival rates (open
loop), each checked against the paper's nine SLOs; goodput is the highest rate at which all nine hold. Each
worker's engine steps (from its metrics endpoint) show where the time went.

Run: .venv/bin/python -m bench.splitwise_vs_colocated [--traces conv code] [--rates 0.25 0.5 1 2]
     [--requests 60] [--length-scale 8] [--model smollm2-135m-instruct] [--kv-keep]
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from splitwise.replay import baseline_lengths, load_trace, measure_idle_baseline, replay
from splitwise.slo import IdleBaseline, goodput, read_csv, slo_attainment, summarize, write_csv
from bench.slo_plots import plot_goodput, plot_latency_cdfs
from splitwise.launcher import Cluster, UpOptions, on_free_ports, start_healthy
from splitwise.model.weights import read_hf_config, resolve_model

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    name: str
    prompt_workers: int
    token_workers: int
    mixed_workers: int = 0
    env: dict = field(default_factory=dict)


# Colocated first: its idle baseline (each request alone on one idle worker) is every configuration's reference.
SETUPS = [
    Setup("colocated", 0, 0, 2),
    Setup("splitwise", 1, 1, env={"SPLITWISE_POOL_BORROW_PROMPT_TOKENS": "0"}),
    Setup("splitwise+mixed", 1, 1,
          env={"SPLITWISE_POOL_BORROW_PROMPT_TOKENS": "512", "SPLITWISE_POOL_COOLDOWN_S": "1"}),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start(setup: Setup, args, run_dir: Path) -> Cluster:
    options = on_free_ports(UpOptions(
        model=args.model, device="cpu", run_dir=run_dir, prompt_workers=setup.prompt_workers,
        token_workers=setup.token_workers, mixed_workers=setup.mixed_workers, startup_timeout_s=600,
        pin_workers=args.pin, extra_env={"SPLITWISE_NUM_THREADS": "1", "SPLITWISE_LOG_LEVEL": "WARNING",
                                         "SPLITWISE_KV_KEEP": str(args.kv_keep).lower(), **setup.env}))
    cluster = start_healthy(options)
    for child in cluster.children:
        if child.cores:
            log(f"  {child.name} on cores {sorted(child.cores)}")
    return cluster


def engine_steps(cluster: Cluster) -> dict[str, dict[str, float]]:
    """Each worker's engine steps so far, from its metrics endpoint: count, seconds and tokens by phase."""
    found = {}
    for child in cluster.children:
        if not child.name.startswith(("prompt_worker", "token_worker", "mixed_worker")):
            continue
        text = urllib.request.urlopen(f"http://{child.metrics_address}/metrics", timeout=10).read().decode()
        steps = {f"{phase}_{what}": 0.0 for phase in ("prefill", "decode") for what in ("steps", "s", "tokens")}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                phase = sample.labels.get("phase")
                if sample.name == "splitwise_engine_step_duration_seconds_count":
                    steps[f"{phase}_steps"] = sample.value
                elif sample.name == "splitwise_engine_step_duration_seconds_sum":
                    steps[f"{phase}_s"] = sample.value
                elif sample.name == "splitwise_engine_step_tokens_total":
                    steps[f"{phase}_tokens"] = sample.value
        found[child.name] = steps
    return found


def steps_during(before: dict, after: dict, wall_s: float) -> dict[str, dict[str, float]]:
    """What each worker's engine did between two readings: busy share of the wall time per phase, mean step time
    and decode batch size."""
    work = {}
    for worker, end in after.items():
        delta = {k: v - before.get(worker, {}).get(k, 0.0) for k, v in end.items()}
        work[worker] = {
            "prefill_busy": delta["prefill_s"] / wall_s, "decode_busy": delta["decode_s"] / wall_s,
            "prefill_tokens": delta["prefill_tokens"], "decode_tokens": delta["decode_tokens"],
            "decode_step_ms": 1e3 * delta["decode_s"] / delta["decode_steps"] if delta["decode_steps"] else None,
            "decode_batch": delta["decode_tokens"] / delta["decode_steps"] if delta["decode_steps"] else None,
            "prefill_tok_s": delta["prefill_tokens"] / delta["prefill_s"] if delta["prefill_s"] else None,
        }
    return work


async def measure(setup: Setup, args, traces: list[str], vocab: int, context: int, out: Path,
                  baseline: IdleBaseline | None) -> tuple[dict, IdleBaseline]:
    """Rate sweep of one configuration on each trace (measuring the idle baseline first if none is given).

    A run whose CSV is in `out` already is read back, not repeated (an interrupted experiment resumes)."""
    csv_of = {(trace, rate_scale): out / f"{setup.name}-{trace}-x{rate_scale}.csv"
              for trace in traces for rate_scale in args.rates}
    cluster = None
    if baseline is None or not all(path.exists() for path in csv_of.values()):
        cluster = start(setup, args, Path(tempfile.mkdtemp(prefix=f"sw-{setup.name}-")))
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
                engine_json = csv_of[trace, rate_scale].with_suffix(".engine.json")
                if csv_of[trace, rate_scale].exists():
                    results = read_csv(csv_of[trace, rate_scale])
                else:
                    before, started = engine_steps(cluster), time.monotonic()
                    results = await replay(address, requests, vocab, seed=args.seed, timeout_s=args.timeout_s)
                    work = steps_during(before, engine_steps(cluster), time.monotonic() - started)
                    engine_json.write_text(json.dumps(work, indent=1))
                    write_csv(results, csv_of[trace, rate_scale])
                work = json.loads(engine_json.read_text()) if engine_json.exists() else {}
                for worker, w in work.items():
                    log(f"  {worker}: prefill busy {w['prefill_busy']:.0%}, decode busy {w['decode_busy']:.0%}, "
                        f"decode step {_num(w['decode_step_ms'])} ms at batch {_num(w['decode_batch'], 1)}")
                report = slo_attainment(results, baseline)
                summary = summarize(results)
                sweep.append({"rate_scale": rate_scale, "rate": rate, "all_met": report.all_met,
                              "summary": summary, "report": report, "results": results, "engine": work})
                log(f"  all nine SLOs {'met' if report.all_met else 'NOT met'} ({summary['failed']} failed); "
                    f"P99 TBT {_ms(summary['tbt_p99_s'])} ms, P99 TTFT {_ms(summary['ttft_p99_s'])} ms")
            found[trace] = sweep
    finally:
        if cluster:
            cluster.stop()
    return found, baseline


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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


def details(measured: dict[str, dict], traces: list[str]) -> str:
    """Per run: the nine slowdowns (`!` over the paper's limit), P99 TBT and TTFT, and each worker's engine work."""
    lines = []
    for trace in traces:
        lines += [f"**{trace}** trace, per run", "",
                  "| configuration | req/s | TTFT P50/P90/P99 | TBT P50/P90/P99 | E2E P50/P90/P99 | P99 TBT ms | "
                  "P99 TTFT ms | engines: prefill busy / decode busy / decode step ms @ batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, sweeps in measured.items():
            for p in sweeps[trace]:
                report, summary = p["report"], p["summary"]
                cells = []
                for metric in ("ttft", "tbt", "e2e"):
                    marks = []
                    for q in (50, 90, 99):
                        check = report.check(metric, q)
                        marks.append("n/a" if check.slowdown is None
                                     else f"{check.slowdown:.2f}{'' if check.met else '!'}")
                    cells.append(" / ".join(marks))
                engines = "; ".join(
                    f"{worker.replace('_worker', '')}: {w['prefill_busy']:.0%} / {w['decode_busy']:.0%} / "
                    f"{_num(w['decode_step_ms'])} @ {_num(w['decode_batch'], 1)}"
                    for worker, w in sorted(p["engine"].items()))
                lines.append(f"| {name} | {p['rate']:.2f} | {' | '.join(cells)} | {_ms(summary['tbt_p99_s'])} | "
                             f"{_ms(summary['ttft_p99_s'])} | {engines or 'n/a'} |")
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
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the workers float over all cores instead of one share each")
    parser.add_argument("--kv-keep", action="store_true",
                        help="prompt workers also keep a copy of each KV in the kv_store (failure recovery)")
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
    text = table(measured, args.traces) + "\n" + details(measured, args.traces)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
