"""The paper's cluster results, reproduced with `splitwise sim` / `splitwise plan` code: prints the tables of
docs/cluster-design.md and writes its plots.

Run as the paper's simulator measured: the scheduler sees the machines' state exactly, machines batch prompts
and decodes together (mixed batches), TBT is sampled per request as SplitwiseSim samples it, and decode steps are
read from the profile as SplitwiseSim reads them (`--curve splitwisesim`). Each of these is an option of
`splitwise sim` / `plan`.

1. SplitwiseSim's published cluster sizes at their rates (code 130 req/s, conversation 180 req/s): do they meet the
   nine SLOs? (full size, both readings of the decode profile)
2. Iso-power (455 kW: 70 DGX-A100) throughput of each family, best prompt:token split, on both traces, and the
   paper's ratios computed from it.

    python -m bench.paper_results [--scale 0.2] [--duration 60] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from splitwise.sim.designs import baseline, splitwise
from splitwise.sim.plan import Workload, a100_baseline, best_within, paper_slos, write_outputs
from splitwise.sim.simulator import SimConfig, simulate
from splitwise.sim.workload import poisson, trace_lengths

PUBLISHED = {  # SplitwiseSim's cluster sizes (the list) at the rates they were sized for
    ("code", 130): [baseline("dgx-a100", 113), baseline("dgx-h100", 51), splitwise("dgx-a100", 54, "dgx-a100", 10),
                    splitwise("dgx-h100", 23, "dgx-h100", 10)],
    ("conv", 180): [baseline("dgx-a100", 70), baseline("dgx-h100", 40), splitwise("dgx-a100", 45, "dgx-a100", 25),
                    splitwise("dgx-h100", 25, "dgx-h100", 15)],
}
ISO_POWER_KW = 455.0  # 70 DGX-A100
FAMILIES = ("Baseline-A100", "Baseline-H100", "Splitwise-AA", "Splitwise-HH", "Splitwise-HHcap")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _with_curve(design, curve):
    from splitwise.sim.designs import parse_design
    return parse_design(design.name, curve)


def paper_config() -> SimConfig:
    config = SimConfig.live_defaults(view_refresh_s=0.0)
    from dataclasses import replace
    return config.replace(limits=replace(config.limits, mixed_batches=True))


def published_sizes(duration_s: float, curves: tuple[str, ...], tbt: str) -> list[dict]:
    rows = []
    for (trace, rate), designs in PUBLISHED.items():
        lengths = trace_lengths(trace)
        requests = poisson(rate, duration_s, lengths, seed=0)
        for design in designs:
            for curve in curves:
                d = _with_curve(design, curve)
                result = simulate(d, requests, paper_config())
                report = result.slo(a100_baseline(decode_curve=curve), tbt)
                worst = max(report.checks, key=lambda c: (c.slowdown or 0) / c.limit)
                rows.append({"trace": trace, "rate": rate, "design": d.short, "family": d.name.split(":")[0],
                             "machines": d.name, "curve": curve, "tbt": tbt, "met": report.all_met,
                             "worst": f"P{worst.percentile} {worst.metric.upper()} {worst.slowdown:.2f}x/{worst.limit:g}x",
                             "events_per_s": round(result.events_per_s), "wall_s": round(result.wall_s, 1)})
                _log(f"published {trace}@{rate} {d.name} [{curve}]: {'meets' if report.all_met else 'misses'} "
                     f"({rows[-1]['worst']}) in {result.wall_s:.1f}s")
    return rows


def iso_power(trace: str, scale: float, duration_s: float, curve: str, tbt: str, out: Path | None) -> dict[str, dict]:
    workload = Workload(trace_lengths(trace), duration_s, seed=0)
    config, slo = paper_config(), paper_slos(decode_curve=curve, tbt=tbt)
    best, points = {}, []
    for family in FAMILIES:
        evaluated = best_within(family, ISO_POWER_KW, lambda d: d.power_kw, workload, config, slo, scale,
                                "llama2-70b", curve, _log)
        points += evaluated
        top = max(evaluated, key=lambda e: e.throughput_rps)
        best[family] = {"design": top.design.short, "machines": top.design.machines,
                        "throughput_rps": round(top.throughput_rps, 1), "cost_per_hour": top.cost_per_hour,
                        "power_kw": top.power_kw}
    if out:
        write_outputs(points, out / f"plan-iso-power-{trace}-{curve}-{tbt}")
    return best


def ratios(best: dict[str, dict]) -> dict[str, float]:
    t = {f: v["throughput_rps"] for f, v in best.items()}
    per_kw = {f: v["throughput_rps"] / v["power_kw"] for f, v in best.items()}
    per_dollar = {f: v["throughput_rps"] / v["cost_per_hour"] for f, v in best.items()}
    return {
        "AA / Baseline-A100 throughput, equal power (and cost)": t["Splitwise-AA"] / t["Baseline-A100"],
        "AA / Baseline-H100 throughput per $": per_dollar["Splitwise-AA"] / per_dollar["Baseline-H100"],
        "AA / Baseline-H100 throughput, iso-power designs": t["Splitwise-AA"] / t["Baseline-H100"],
        "AA cost / Baseline-H100 cost, iso-power designs": best["Splitwise-AA"]["cost_per_hour"] / best["Baseline-H100"]["cost_per_hour"],
        "HHcap power for Baseline-H100's throughput (linear scaling)": per_kw["Baseline-H100"] / per_kw["Splitwise-HHcap"],
        "AA cost for Baseline-H100's throughput (linear scaling)": per_dollar["Baseline-H100"] / per_dollar["Splitwise-AA"],
        "HH / Baseline-H100 throughput, equal power": t["Splitwise-HH"] / t["Baseline-H100"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--curve", default="splitwisesim")
    parser.add_argument("--tbt", default="request_mean", help="TBT SLO samples: request_mean (the paper's) or gaps")
    parser.add_argument("--skip-published", action="store_true")
    parser.add_argument("--traces", default="code,conv")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    started = time.perf_counter()
    results = {"scale": args.scale, "duration_s": args.duration, "curve": args.curve, "tbt": args.tbt}
    if not args.skip_published:
        results["published"] = published_sizes(args.duration, ("splitwisesim", "batch_size"), args.tbt)
    for trace in args.traces.split(","):
        best = iso_power(trace, args.scale, args.duration, args.curve, args.tbt, out)
        results[f"iso_power_{trace}"] = {"best": best, "ratios": {k: round(v, 3) for k, v in ratios(best).items()}}
        _log(json.dumps(results[f"iso_power_{trace}"], indent=1))
    results["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=1)
    print(text)
    if out:
        (out / "paper-results.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
