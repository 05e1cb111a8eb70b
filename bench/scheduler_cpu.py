"""The scheduler's CPU per request and per output token, on a small mock-engine cluster (cheap workers), with the
scheduler of a baseline git ref beside this tree's, measured in one run on the same workers.

Both schedulers are replicas of one `splitwise up --engine mock` cluster (same Redis, same workers, mTLS as
always): replica 0 runs the baseline's code (`git archive REF`, unpacked to a temporary folder), replica 1 this
tree's. Each phase sends its requests to one replica, then the same requests to the other, in a closed loop of
`--concurrency` streams. A scheduler's CPU is utime + stime of its process from /proc over the phase, less its idle
rate (measured first, both at once: the registry refresh) over the phase's wall time.

  short: max_tokens=1 requests at as high a rate as the cluster serves: CPU per request
  long:  max_tokens=--long-tokens requests: CPU per output token, (long request - short request) / (tokens - 1)

The workers' CPU per output token is measured beside it (all worker processes, over each phase, less their idle rate).
With --baseline-calls rpc, replica 0 runs this tree's scheduler with SPLITWISE_WORKER_CALLS=rpc (an RPC per worker
call) instead of a git ref's: the worker-call stream measured alone, on both ends. --baseline-env KEY=VALUE sets any
other variable of replica 0, to measure what an option costs (SPLITWISE_TRACE_FILE= : no span file).

Run: python -m bench.scheduler_cpu [--baseline REF | --baseline-calls rpc | --baseline-env KEY=VALUE] [--cprofile FILE]
     (FILE: this tree's scheduler under cProfile)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.mock_cluster import CPROFILE_ENV, cpu_seconds
from splitwise.client import SplitwiseClient
from splitwise.launcher import Cluster, UpOptions, on_free_ports, start_healthy
from splitwise.model import DEFAULT_MOCK_PROFILE
from splitwise.model.mock import MOCK_VOCAB_SIZE

TREE_ENV = "SPLITWISE_BENCH_SCHEDULER_TREE"
IDLE_WINDOW_S = 10.0
FIRST_PROMPT_TOKEN_ID = 300  # past the byte-level tokenizer's bytes and specials


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """(the main thread's, the other threads') utime + stime: the event loop's Python, and gRPC's C-core threads."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if int(task.name) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


class TwoSchedulers(Cluster):
    """Scheduler replica 0 runs the code of `tree` (None: this tree's); replica 1 this tree's, under cProfile
    into `cprofile` when given."""

    def __init__(self, options: UpOptions, tree: Path | None, cprofile: Path | None, baseline_env: dict | None = None):
        super().__init__(options)
        self.tree, self.cprofile, self.baseline_env = tree, cprofile, baseline_env or {}

    @property
    def workers(self) -> list:
        return [c for c in self.children if c.name.split("-")[0] in ("prompt_worker", "token_worker")]

    def _spawn(self, name, module, env, address, cores=None, args=()):
        if name == "scheduler-0" and self.baseline_env:
            env = {**env, **self.baseline_env}
        if name == "scheduler-0" and self.tree is not None:
            module, env = "bench.scheduler_from_tree", {**env, TREE_ENV: str(self.tree)}
        elif name == "scheduler-1" and self.cprofile is not None:
            module, env = "bench.profiled_scheduler", {**env, CPROFILE_ENV: str(self.cprofile.resolve())}
        super()._spawn(name, module, env, address, cores, args)


def unpack(ref: str) -> Path:
    """The tree of a git ref in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="scheduler-baseline-"))
    archive = subprocess.run(["git", "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


@dataclass
class Phase:
    name: str
    requests: int
    max_tokens: int
    concurrency: int


async def send(address: str, phase: Phase, prompt_tokens: int, seed: int, tag: str) -> tuple[int, int]:
    """Streams the phase's requests, `concurrency` at a time; returns (requests ok, output tokens received)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(FIRST_PROMPT_TOKEN_ID, MOCK_VOCAB_SIZE) for _ in range(prompt_tokens)]
               for _ in range(phase.requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))
    ok = tokens = 0
    async with SplitwiseClient(address) as client:
        async def stream_all() -> None:
            nonlocal ok, tokens
            while not queue.empty():
                i, prompt = queue.get_nowait()
                received = 0
                async for chunk in client.stream(token_ids=prompt, max_tokens=phase.max_tokens, ignore_eos=True,
                                                 timeout=120.0, request_id=f"{tag}-{phase.name}-{i}"):
                    received += len(chunk.token_ids)
                ok += received == phase.max_tokens
                tokens += received

        await asyncio.gather(*(stream_all() for _ in range(phase.concurrency)))
    return ok, tokens


def workers_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


async def measure_phase(address: str, pid: int, idle_per_s: float, phase: Phase, prompt_tokens: int, seed: int,
                        tag: str, workers: list[int], workers_idle_per_s: float) -> dict:
    cpu_start, threads_start, wall_start = cpu_seconds(pid), thread_cpu_seconds(pid), time.monotonic()
    workers_start = workers_cpu_seconds(workers)
    ok, tokens = await send(address, phase, prompt_tokens, seed, tag)
    cpu_s, wall_s = cpu_seconds(pid) - cpu_start, time.monotonic() - wall_start
    workers_s = workers_cpu_seconds(workers) - workers_start
    main_s, other_s = (end - start for end, start in zip(thread_cpu_seconds(pid), threads_start))
    return {"ok": ok, "requests": phase.requests, "tokens": tokens, "cpu_s": cpu_s, "wall_s": wall_s,
            "busy_cpu_s": max(0.0, cpu_s - idle_per_s * wall_s), "main_thread_s": main_s, "other_threads_s": other_s,
            "workers_busy_cpu_s": max(0.0, workers_s - workers_idle_per_s * wall_s)}


def combined(halves: list[dict]) -> dict:
    """The sums of a phase's runs on one scheduler, and what they give per request and per second."""
    total = {key: sum(h[key] for h in halves) for key in halves[0]}
    return {**total, "ms_per_request": total["busy_cpu_s"] / max(total["ok"], 1) * 1e3,
            "workers_ms_per_request": total["workers_busy_cpu_s"] / max(total["ok"], 1) * 1e3,
            "main_thread_share": total["main_thread_s"] / max(total["main_thread_s"] + total["other_threads_s"], 1e-9),
            "requests_per_s": total["ok"] / total["wall_s"], "tokens_per_s": total["tokens"] / total["wall_s"]}


def ratio(before: float, after: float) -> str:
    return f"{before / after:.1f}x" if after > 0 else "-"


def report(args, runs: dict[str, dict], idle: dict[str, float]) -> str:
    names = list(runs)
    per_token = {n: (runs[n]["long"]["ms_per_request"] - runs[n]["short"]["ms_per_request"]) * 1e3
                 / (args.long_tokens - 1) for n in names}
    workers_per_token = {n: (runs[n]["long"]["workers_ms_per_request"] - runs[n]["short"]["workers_ms_per_request"])
                         * 1e3 / (args.long_tokens - 1) for n in names}
    header = "| what | " + " | ".join(names) + (" | before / after |" if len(names) == 2 else " |")
    rule = "|---|" + "---:|" * (len(names) + (len(names) == 2))

    def row(what: str, values: list[float], fmt: str, compare: bool = True) -> str:
        cells = " | ".join(format(v, fmt) for v in values)
        extra = f" | {ratio(*values)}" if len(values) == 2 and compare else (" | " if len(values) == 2 else "")
        return f"| {what} | {cells}{extra} |"

    short, long = ([runs[n][p] for n in names] for p in ("short", "long"))
    lines = [
        f"mock cluster: {args.prompt_workers} prompt + {args.token_workers} token workers of {args.profile}, time "
        f"factor {args.time_factor:g}; {args.prompt_tokens}-token prompts, {args.concurrency} streams at once", "",
        header, rule,
        row("scheduler idle CPU, ms/s (registry refresh)", [idle[n] * 1e3 for n in names], ".1f"),
        row(f"**CPU per request, max_tokens=1** (ms, less idle; {args.requests} requests)",
            [r["ms_per_request"] for r in short], ".2f"),
        row("... of it in the event loop's thread (the rest: gRPC's C-core threads), %",
            [r["main_thread_share"] * 100 for r in short], ".0f", compare=False),
        row("... requests/s served", [r["requests_per_s"] for r in short], ".0f", compare=False),
        row(f"CPU per request, max_tokens={args.long_tokens} (ms, less idle; {args.long_requests} requests)",
            [r["ms_per_request"] for r in long], ".1f"),
        row("**CPU per output token** (us: the long request's extra over the short one's, per token)",
            [per_token[n] for n in names], ".0f"),
        row("... of the long requests' CPU in the event loop's thread, %",
            [r["main_thread_share"] * 100 for r in long], ".0f", compare=False),
        row("... output tokens/s served", [r["tokens_per_s"] for r in long], ".0f", compare=False),
        row("workers' CPU per request, max_tokens=1 (ms, all workers, less idle)",
            [r["workers_ms_per_request"] for r in short], ".2f"),
        row("workers' CPU per output token (us, all workers)", [workers_per_token[n] for n in names], ".0f"),
        row("requests failed (short + long)", [r["requests"] - r["ok"] + q["requests"] - q["ok"]
                                               for r, q in zip(short, long)], "d", compare=False),
    ]
    return "\n".join(lines)


async def run(args) -> int:
    tree = unpack(args.baseline) if args.baseline else None
    run_dir = Path(tempfile.mkdtemp(prefix="scheduler-cpu-"))
    options = on_free_ports(UpOptions(
        model="", engine="mock", mock_profile=args.profile, mock_time_factor=args.time_factor,
        mock_kv_scale=args.kv_scale, schedulers=2, prompt_workers=args.prompt_workers,
        token_workers=args.token_workers, run_dir=run_dir, startup_timeout_s=300,
        extra_env={"SPLITWISE_LOG_LEVEL": "WARNING"}))
    first = f"baseline ({args.baseline})" if tree else "replica 0 (this tree)"
    baseline_env = dict(kv.split("=", 1) for kv in args.baseline_env)
    if args.baseline_calls:
        baseline_env["SPLITWISE_WORKER_CALLS"] = args.baseline_calls
    if baseline_env:
        first += ", " + ", ".join(f"{k}={v!r}" for k, v in baseline_env.items())
    names = [first, "this tree"]
    phases = [Phase("short", args.requests, 1, args.concurrency),
              Phase("long", args.long_requests, args.long_tokens, args.concurrency)]
    print(f"starting the mock cluster (logs in {run_dir})...", file=sys.stderr)
    cluster = await asyncio.to_thread(start_healthy, options,
                                      lambda o: TwoSchedulers(o, tree, args.cprofile, baseline_env))
    try:
        os.environ["SPLITWISE_API_KEY"] = cluster.credentials.api_key
        schedulers = [(c.address, c.proc.pid) for c in cluster.schedulers]
        warmup = Phase("warmup", 2 * args.concurrency, 4, args.concurrency)
        for address, _ in schedulers:
            await send(address, warmup, args.prompt_tokens, args.seed, "warmup")
        workers = [c.proc.pid for c in cluster.workers]
        starts, workers_start = [cpu_seconds(pid) for _, pid in schedulers], workers_cpu_seconds(workers)
        await asyncio.sleep(IDLE_WINDOW_S)
        idle = {n: (cpu_seconds(pid) - s) / IDLE_WINDOW_S for n, (_, pid), s in zip(names, schedulers, starts)}
        workers_idle = (workers_cpu_seconds(workers) - workers_start) / IDLE_WINDOW_S
        runs: dict[str, dict] = {n: {} for n in names}
        for phase in phases:
            # Half of the requests in each of the orders A B B A: what drifts during the phase (the host's other
            # load, the workers' state) weighs on both schedulers alike.
            half = Phase(phase.name, phase.requests // 2, phase.max_tokens, phase.concurrency)
            halves: dict[str, list[dict]] = {n: [] for n in names}
            for turn, index in enumerate([0, 1, 1, 0]):
                (address, pid), n = schedulers[index], names[index]
                print(f"{phase.name}: {n}...", file=sys.stderr)
                halves[n].append(await measure_phase(address, pid, idle[n], half, args.prompt_tokens,
                                                     args.seed + turn, f"{n.split()[0]}{turn}", workers,
                                                     workers_idle))
            for n in names:
                runs[n][phase.name] = combined(halves[n])
    finally:
        cluster.stop()
    text = report(args, runs, idle)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({"idle_cpu_per_s": idle, "runs": runs}, indent=1))
    print(text)
    if args.cprofile:
        print(f"this tree's scheduler profile: {args.cprofile} (python -m pstats {args.cprofile})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="", help="git ref whose scheduler runs beside this tree's")
    parser.add_argument("--baseline-calls", default="", choices=["", "rpc", "stream"],
                        help="replica 0's SPLITWISE_WORKER_CALLS (rpc: an RPC per worker call)")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of replica 0 (this tree's code, unless --baseline): what an "
                             "option costs, e.g. SPLITWISE_TRACE_FILE= (no span file)")
    parser.add_argument("--profile", default=DEFAULT_MOCK_PROFILE, help="the machine profile the workers model")
    parser.add_argument("--prompt-workers", type=int, default=2)
    parser.add_argument("--token-workers", type=int, default=2)
    parser.add_argument("--time-factor", type=float, default=0.1, help="modelled step times are multiplied by this")
    parser.add_argument("--kv-scale", type=float, default=256.0, help="KV bytes sent = modelled / this")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=400, help="max_tokens=1 requests per scheduler")
    parser.add_argument("--long-requests", type=int, default=32, help="long requests per scheduler")
    parser.add_argument("--long-tokens", type=int, default=256, help="max_tokens of a long request")
    parser.add_argument("--concurrency", type=int, default=16, help="streams at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cprofile", type=Path, default=None, help="profile this tree's scheduler into FILE")
    parser.add_argument("--out", type=Path, default=Path("bench-results/scheduler-cpu"))
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
