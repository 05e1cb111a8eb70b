"""The scheduler's cost at cluster scale: a `splitwise up --engine mock` cluster of many workers (real processes whose
model compute is a machine profile's modelled time), an Azure trace replayed against it at a given rate, and the
scheduler process's CPU seconds per request (utime + stime from /proc) beside the requests per second served.

Run: python -m bench.mock_cluster --prompt-workers 30 --token-workers 10 --time-factor 4 --rate 2 --requests 200
     [--cprofile scheduler.prof]   (the scheduler's event loop under cProfile; CPU numbers then include its overhead)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from splitwise.replay import TraceRequest, load_trace, replay
from splitwise.slo import format_report, summarize, write_csv
from splitwise.launcher import Cluster, UpOptions, on_free_ports, start_healthy
from splitwise.model import DEFAULT_MOCK_PROFILE
from splitwise.model.mock import MOCK_CONTEXT_TOKENS, MOCK_VOCAB_SIZE, load_mock_model

CPROFILE_ENV = "SPLITWISE_BENCH_CPROFILE"
IDLE_WINDOW_S = 10.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB: PSS shares the pages it maps with others (torch's libraries) among them."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


class ProfiledCluster(Cluster):
    """The scheduler runs as bench.profiled_scheduler: its main thread under cProfile."""

    def __init__(self, options: UpOptions, cprofile: Path):
        super().__init__(options)
        self.cprofile = cprofile

    def _spawn(self, name, module, env, address, cores=None, args=()):
        if module == "services.scheduler":
            module, env = "bench.profiled_scheduler", {**env, CPROFILE_ENV: str(self.cprofile.resolve())}
        super()._spawn(name, module, env, address, cores, args)


def at_rate(requests: list[TraceRequest], rate: float, poisson: bool, seed: int) -> list[TraceRequest]:
    """The trace's requests with arrivals at `rate` per second: the trace's own gaps rescaled, or Poisson."""
    if poisson:
        rng, t, out = random.Random(seed), 0.0, []
        for r in requests:
            out.append(replace(r, arrival_s=t))
            t += rng.expovariate(rate)
        return out
    span = requests[-1].arrival_s
    scale = (len(requests) - 1) / rate / span if span > 0 else 0.0
    return [replace(r, arrival_s=r.arrival_s * scale) for r in requests]


async def measure(cluster: Cluster, requests: list[TraceRequest], seed: int, timeout_s: float) -> dict:
    scheduler = cluster.schedulers[0].proc.pid
    idle_start = cpu_seconds(scheduler)
    await asyncio.sleep(IDLE_WINDOW_S)
    idle_cpu_per_s = (cpu_seconds(scheduler) - idle_start) / IDLE_WINDOW_S
    cpu_start, wall_start = cpu_seconds(scheduler), time.monotonic()
    results = await replay(cluster.address, requests, MOCK_VOCAB_SIZE, seed=seed, timeout_s=timeout_s)
    cpu_s, wall_s = cpu_seconds(scheduler) - cpu_start, time.monotonic() - wall_start
    summary = summarize(results)
    workers = [c for c in cluster.children if c.name.split("-")[0].endswith("_worker")]
    memory = [memory_kib(c.proc.pid) for c in workers if c.proc.poll() is None]
    ok = max(summary["ok"], 1)
    output_tokens = sum(r.output_tokens for r in results if r.ok)
    return {
        "results": results, "summary": summary,
        "scheduler_cpu_s": cpu_s, "wall_s": wall_s, "idle_cpu_per_s": idle_cpu_per_s,
        "cpu_ms_per_request": cpu_s / ok * 1e3,
        "cpu_ms_per_request_less_idle": max(0.0, cpu_s - idle_cpu_per_s * wall_s) / ok * 1e3,
        "cpu_us_per_output_token": cpu_s / max(output_tokens, 1) * 1e6,
        "requests_per_s": summary["ok"] / wall_s,
        "offered_per_s": (len(requests) - 1) / max(requests[-1].arrival_s, 1e-9),
        "worker_rss_mib_mean": sum(r for r, _ in memory) / len(memory) / 1024,
        "worker_pss_mib_total": sum(p for _, p in memory) / 1024,
    }


def report(args, m: dict) -> str:
    s = m["summary"]
    lines = [
        f"mock cluster: {args.prompt_workers} prompt + {args.token_workers} token workers of {args.profile}, "
        f"time factor {args.time_factor:g}, KV scale {args.kv_scale:g}; {args.trace} trace, {s['requests']} requests "
        f"at {args.rate:g} req/s{' (Poisson)' if args.poisson else ''}",
        "",
        "| what | value |", "|---|---:|",
        f"| requests ok / failed | {s['ok']} / {s['failed']} |",
        f"| requests/s sent (the trace's arrivals) | {m['offered_per_s']:.2f} |",
        f"| requests/s served (ok over the replay's wall time, the last outputs' tail included) | "
        f"{m['requests_per_s']:.2f} |",
        f"| output tokens/s | {s['throughput_tokens_per_s']:.0f} |",
        f"| scheduler CPU per request | {m['cpu_ms_per_request']:.2f} ms |",
        f"| ... less its idle CPU ({m['idle_cpu_per_s'] * 1e3:.0f} ms/s: registry refresh) | "
        f"{m['cpu_ms_per_request_less_idle']:.2f} ms |",
        f"| scheduler CPU per output token | {m['cpu_us_per_output_token']:.0f} us |",
        f"| scheduler CPU over the replay | {m['scheduler_cpu_s']:.1f} s in {m['wall_s']:.1f} s |",
        f"| worker memory: RSS each (mean), PSS all together | {m['worker_rss_mib_mean']:.0f} MiB, "
        f"{m['worker_pss_mib_total'] / 1024:.1f} GiB |",
        "", format_report(s),
    ]
    return "\n".join(lines)


async def run(args) -> int:
    print(f"mock engine: {load_mock_model(args.profile, args.time_factor, args.kv_scale).describe()}", file=sys.stderr)
    requests = load_trace(args.trace, length_scale=args.length_scale, max_requests=args.requests,
                          max_context_tokens=MOCK_CONTEXT_TOKENS)
    requests = at_rate(requests, args.rate, args.poisson, args.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="mock-cluster-"))
    options = on_free_ports(UpOptions(
        model="", engine="mock", mock_profile=args.profile, mock_time_factor=args.time_factor,
        mock_kv_scale=args.kv_scale, prompt_workers=args.prompt_workers, token_workers=args.token_workers,
        run_dir=run_dir, startup_timeout_s=600,
        extra_env={"SPLITWISE_LOG_LEVEL": "WARNING", "SPLITWISE_MAX_REQUESTS_IN_FLIGHT": "4096"}))
    started = time.monotonic()
    print(f"starting {args.prompt_workers + args.token_workers} mock workers (logs in {run_dir})...", file=sys.stderr)
    cluster = await asyncio.to_thread(start_healthy, options, (lambda o: ProfiledCluster(o, args.cprofile))
                                      if args.cprofile else Cluster)
    try:
        os.environ["SPLITWISE_API_KEY"] = cluster.credentials.api_key  # what replay's client sends
        print(f"cluster healthy in {time.monotonic() - started:.0f}s; {IDLE_WINDOW_S:.0f}s idle, then the replay",
              file=sys.stderr)
        m = await measure(cluster, requests, args.seed, args.timeout_s)
    finally:
        cluster.stop()
    text = report(args, m)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(m.pop("results"), args.out / "requests.csv")
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(m, indent=1, default=str))
    print(text)
    if args.cprofile:
        print(f"scheduler profile: {args.cprofile} (python -m pstats {args.cprofile})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mock_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=DEFAULT_MOCK_PROFILE, help="the machine profile the workers model")
    parser.add_argument("--prompt-workers", type=int, default=30)
    parser.add_argument("--token-workers", type=int, default=10)
    parser.add_argument("--time-factor", type=float, default=4.0, help="modelled step times are multiplied by this")
    parser.add_argument("--kv-scale", type=float, default=256.0, help="KV bytes sent = modelled / this")
    parser.add_argument("--trace", default="conv", help="conv, code, or a CSV with the Azure trace's columns")
    parser.add_argument("--length-scale", type=float, default=1.0, help="prompt and output lengths divided by this")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second sent")
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of the trace's own gaps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--cprofile", type=Path, default=None, help="profile the scheduler's event loop into FILE")
    parser.add_argument("--out", type=Path, default=Path("bench-results/mock-cluster"))
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
