"""The `splitwise sim` and `splitwise plan` commands (their options import no simulator, and so no torch: the CLI
builds every command's options at start)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitwise.slo import TBT_SAMPLES
from splitwise.sim.designs import FAMILIES
from splitwise.sim.perf_model import DECODE_CURVES


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default="conv", help="conv or code (the Azure 2023 traces), or a trace CSV path")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals simulated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="llama2-70b", help="llama2-70b or bloom-176b (the paper's profiles)")
    parser.add_argument("--decode-curve", choices=DECODE_CURVES, default="batch_size",
                        help="how the paper's profile gives decode step times: batch_size (by the decode batch's "
                             "size, as its columns say) or splitwisesim (as the paper's simulator reads it; the "
                             "model behind the paper's results)")
    parser.add_argument("--exact-view", action="store_true",
                        help="the scheduler sees the workers' state exactly (default: refreshed as the live one is)")
    parser.add_argument("--heartbeat-s", type=float, default=None,
                        help="the workers' heartbeat interval (SPLITWISE_HEARTBEAT_S, default 1): the scheduler's "
                             "view shows each worker as of its last heartbeat; 0: as of the view's refresh")
    parser.add_argument("--mixed-batches", action="store_true",
                        help="machines decode their running sequences in every prefill step too (SPLITWISE_MIXED_BATCHES)")
    parser.add_argument("--routing-policy", default=None, help="cls (default, the live scheduler's), jsq, round_robin, random")
    parser.add_argument("--tbt", choices=TBT_SAMPLES, default="gaps",
                        help="TBT SLO samples: gaps (every token gap, as `splitwise bench replay` measures) or "
                             "request_mean (per request, (E2E - TTFT) / output tokens against the token curve at its "
                             "prompt size, as the paper's simulator measures)")
    parser.add_argument("--out", default="", help="folder for the CSV files and plots")


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--design", action="append", required=True,
                        help="baseline:N*MACHINE or splitwise:P*MACHINE+T*MACHINE (repeatable); machines: "
                             "dgx-a100, dgx-h100, dgx-h100-pcap")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="Poisson arrivals at this many req/s with the trace's lengths (default: the trace as recorded)")
    parser.add_argument("--start", type=float, default=0.0, help="with the recorded trace: where its window starts (s)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="with the recorded trace: arrivals this much faster")
    _common(parser)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--cost-budget", type=float, help="maximise throughput within this many $/h")
    goal.add_argument("--power-budget", type=float, help="maximise throughput within this many kW (provisioned)")
    goal.add_argument("--rate", type=float, help="minimise --minimize (cost or power) for this many req/s")
    parser.add_argument("--minimize", choices=("cost", "power"), default="cost")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="simulate designs this much smaller at this much lower rate (e.g. 0.2: faster)")
    _common(parser)


def _config(args):
    from splitwise.sim.simulator import SimConfig

    changes = {}
    if args.exact_view:
        changes["view_refresh_s"] = 0.0
    if args.routing_policy:
        changes["routing_policy"] = args.routing_policy
    if args.heartbeat_s is not None:
        if args.heartbeat_s < 0:
            raise SystemExit(f"--heartbeat-s must be >= 0, got {args.heartbeat_s}")
        changes["heartbeat_s"] = args.heartbeat_s
    config = SimConfig.live_defaults(**changes)
    if args.mixed_batches:
        from dataclasses import replace
        config = config.replace(limits=replace(config.limits, mixed_batches=True))
    return config


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sim_main(args) -> int:
    from splitwise.slo import format_report, write_csv
    from splitwise.sim.designs import parse_design
    from splitwise.sim.plan import a100_baseline
    from splitwise.sim.simulator import simulate
    from splitwise.sim.workload import from_trace, poisson, trace_lengths

    try:
        designs = [parse_design(d if "@" in d else f"{d}@{args.model}", args.decode_curve) for d in args.design]
        if args.rate:
            requests = poisson(args.rate, args.duration, trace_lengths(args.trace), args.seed)
            workload = f"Poisson {args.rate:g} req/s for {args.duration:g}s, lengths of {args.trace}"
        else:
            requests = from_trace(args.trace, rate_scale=args.rate_scale, start_s=args.start, duration_s=args.duration)
            workload = f"{args.trace} from {args.start:g}s for {args.duration:g}s, x{args.rate_scale:g} rate"
    except (ValueError, OSError) as e:
        print(f"splitwise sim: {e}", file=sys.stderr)
        return 2
    config, slo_baseline = _config(args), a100_baseline(args.model, args.decode_curve)
    out = Path(args.out) if args.out else None
    for design in designs:
        result = simulate(design, requests, config)
        report = result.slo(slo_baseline, args.tbt)
        print(f"== {design.name}: {design.machines} machines, ${design.cost_per_hour:.0f}/h, "
              f"{design.power_kw:.0f} kW provisioned, {result.average_power_kw:.0f} kW drawn on average")
        print(f"   {workload}: {len(requests)} requests; {result.events:,} events ({result.engine_steps:,} engine "
              f"steps) in {result.wall_s:.1f}s: {result.events_per_s:,.0f} events/s, "
              f"{result.engine_steps / max(result.wall_s, 1e-9):,.0f} steps/s; {result.pool_transitions} pool changes")
        print(format_report(result.summary(), report))
        if out:
            out.mkdir(parents=True, exist_ok=True)
            stem = design.name.replace(":", "-").replace("*", "x").replace("+", "_")
            write_csv(result.requests, out / f"{stem}.csv")
            (out / f"{stem}.json").write_text(json.dumps(
                {"design": design.name, "workload": workload, "summary": result.summary(), "slo": report.to_dict(),
                 "events": result.events, "engine_steps": result.engine_steps, "wall_s": result.wall_s, "average_power_kw": result.average_power_kw},
                indent=2))
    return 0


def plan_main(args) -> int:
    from splitwise.sim.plan import Workload, best_within, paper_slos, pareto, smallest_for, table, write_outputs
    from splitwise.sim.workload import trace_lengths

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        print(f"splitwise plan: unknown families {unknown}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    if not 0 < args.scale <= 1:
        print("splitwise plan: --scale must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        workload = Workload(trace_lengths(args.trace), args.duration, args.seed)
    except (ValueError, OSError) as e:
        print(f"splitwise plan: {e}", file=sys.stderr)
        return 2
    config, slos = _config(args), paper_slos(args.model, args.decode_curve, args.tbt)
    common = (workload, config, slos, args.scale, args.model, args.decode_curve, _progress)
    points = []
    if args.rate:
        measure = (lambda d: d.cost_per_hour) if args.minimize == "cost" else (lambda d: d.power_kw)
        for family in families:
            points += smallest_for(family, args.rate, measure, *common)
        goal = f"least {args.minimize} meeting the SLOs at {args.rate:g} req/s"
        best = sorted(points, key=lambda e: measure(e.design))
    else:
        budget = args.cost_budget if args.cost_budget is not None else args.power_budget
        measure = (lambda d: d.cost_per_hour) if args.cost_budget is not None else (lambda d: d.power_kw)
        for family in families:
            points += best_within(family, budget, measure, *common)
        unit = "$/h" if args.cost_budget is not None else "kW"
        goal = f"most throughput meeting the SLOs within {budget:g} {unit}"
        best = sorted(points, key=lambda e: -e.throughput_rps)
    print(f"== splitwise plan: {goal}; {args.trace} lengths, Poisson arrivals, {args.duration:g}s simulated per point"
          f"{f', designs at x{args.scale:g} scale' if args.scale != 1 else ''}")
    print(table(best))
    for family in families:
        mine = [e for e in best if e.family == family]
        if mine:
            print(f"best {family}: {mine[0].design.name} ({mine[0].throughput_rps:.1f} req/s)")
    front = pareto(points, lambda e: e.cost_per_hour)
    print("Pareto front (throughput against cost): " + ", ".join(f"{e.family} {e.design.short}" for e in front))
    if args.out:
        for path in write_outputs(points, Path(args.out)):
            print(f"wrote {path}")
    return 0
