"""What a failure costs the client: the stall a stream sees when its token worker or its scheduler replica is
SIGKILLed mid-decode, next to the same streams' time between tokens without a failure, measured side by side in
one run on live `splitwise up` clusters (SmolLM2-135M, CPU fp32, one compute thread per worker). Every output is
also checked against the no-failure output of the same cluster.

A stream's stall is the gap around the kill: its first token after the kill minus its last token before.
Streams the kill hit: those with a `resume` (or `continue`) event on their scheduler span.

Run: .venv/bin/python -m bench.recovery [--streams 8] [--prompt-tokens 200] [--max-tokens 48] [--no-write]
(writes docs/benchmarks.md's "Recovery" section)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.engine import log, write_section
from splitwise.client import SplitwiseClient
from splitwise.launcher import Cluster, UpOptions, on_free_ports, start_healthy
from splitwise.telemetry.jsonl_exporter import read_spans

MODEL = "smollm2-135m-instruct"
KILL_AFTER_TOKENS = 8  # every stream has this many tokens when the kill comes


@dataclass(frozen=True)
class Scenario:
    name: str
    kill: str | None  # the child killed: "token_worker-0", "scheduler-0", or none
    keep: bool = True  # SPLITWISE_KV_KEEP: prompt workers keep a copy of the prompt KV in the kv_store


SCENARIOS = [
    Scenario("token worker killed, KV kept in kv_store", "token_worker-0", keep=True),
    Scenario("token worker killed, no KV kept (recompute)", "token_worker-0", keep=False),
    Scenario("scheduler replica killed (stream continued)", "scheduler-0", keep=True),
]


@dataclass
class Stream:
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # one per token

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    def stall_around(self, at: float) -> float | None:
        before = [t for t in self.arrivals if t <= at]
        after = [t for t in self.arrivals if t > at]
        return after[0] - before[-1] if before and after else None


def start_cluster(run_dir: Path, keep: bool) -> Cluster:
    return start_healthy(on_free_ports(UpOptions(
        model=MODEL, device="cpu", run_dir=run_dir, schedulers=2, prompt_workers=1, token_workers=2,
        extra_env={"SPLITWISE_NUM_THREADS": "1", "SPLITWISE_LOG_LEVEL": "WARNING", "SPLITWISE_HEARTBEAT_S": "0.2",
                   "SPLITWISE_KV_KEEP": str(keep).lower()})))


async def run_streams(addresses: list[str], prompts: list[list[int]], max_tokens: int,
                      kill=None) -> tuple[list[Stream], float | None]:
    """Every prompt streamed at once (greedy, EOS ignored); `kill` is called once every stream has
    KILL_AFTER_TOKENS tokens. Returns the streams and the time of the kill."""
    streams = [Stream() for _ in prompts]
    ready = asyncio.Event()

    async def run(i: int, client: SplitwiseClient) -> None:
        async for chunk in client.stream(token_ids=prompts[i], max_tokens=max_tokens, ignore_eos=True, timeout=300):
            now = time.perf_counter()
            streams[i].request_id = chunk.request_id
            streams[i].tokens += chunk.token_ids
            streams[i].arrivals += [now] * len(chunk.token_ids)
            if all(len(s.tokens) >= KILL_AFTER_TOKENS for s in streams):
                ready.set()

    killed_at = None
    async with SplitwiseClient(addresses) as client:
        done = asyncio.gather(*(run(i, client) for i in range(len(prompts))))
        if kill is not None:
            await asyncio.wait_for(ready.wait(), 300)
            killed_at = time.perf_counter()
            kill()
        await asyncio.wait_for(done, 600)
    return streams, killed_at


def recovered_request_ids(run_dir: Path) -> dict[str, str]:
    """request id -> "resume (kv_store)" and the like, from the scheduler replicas' spans."""
    found = {}
    for path in (run_dir / "traces").glob("scheduler*.jsonl"):
        for span in read_spans(path):
            rid = span["attributes"].get("splitwise.request_id")
            for event in span.get("events", []):
                if rid and event["name"] in ("resume", "continue"):
                    found[rid] = f"{event['name']} ({event['attributes'].get('kv', '?')})"
    return found


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


async def measure(scenario: Scenario, prompts: list[list[int]], max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="splitwise-recovery-") as tmp:
        run_dir = Path(tmp)
        log(f"{scenario.name}: starting a cluster (2 schedulers, 1 prompt worker, 2 token workers)")
        cluster = start_cluster(run_dir, scenario.keep)
        try:
            addresses = [c.address for c in cluster.schedulers]
            log("  the same streams without a failure")
            reference, _ = await run_streams(addresses, prompts, max_tokens)
            victim = next(c for c in cluster.children if c.name == scenario.kill)
            log(f"  again, SIGKILL {victim.name} once every stream has {KILL_AFTER_TOKENS} tokens")
            failed, killed_at = await run_streams(addresses, prompts, max_tokens,
                                                  kill=lambda: victim.proc.send_signal(signal.SIGKILL))
        finally:
            cluster.stop()  # the services flush their last spans as they stop
        recovered = recovered_request_ids(run_dir)
    hit = [s for s in failed if s.request_id in recovered]
    stalls = [s.stall_around(killed_at) for s in hit]
    stalls = [s for s in stalls if s is not None]
    tbt = statistics.median(g for s in reference for g in s.gaps())
    ways = sorted({recovered[s.request_id] for s in hit})
    return {
        "scenario": scenario.name,
        "hit": f"{len(hit)}/{len(failed)}",
        "ways": ", ".join(ways) or "none",
        "tbt_ms": ms(tbt),
        "stall_p50_ms": ms(statistics.median(stalls)) if stalls else "n/a",
        "stall_max_ms": ms(max(stalls)) if stalls else "n/a",
        "stall_in_tbt": f"{statistics.median(stalls) / tbt:.1f}x" if stalls else "n/a",
        "identical": sum(a.tokens == b.tokens for a, b in zip(failed, reference)),
        "streams": len(failed),
    }


def table(rows: list[dict]) -> str:
    lines = ["| failure | streams hit | recovered by | TBT P50 without failure (ms) | stall P50 (ms) | stall max (ms) "
             "| stall P50 / TBT | outputs identical |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['hit']} | {r['ways']} | {r['tbt_ms']} | {r['stall_p50_ms']} | "
                     f"{r['stall_max_ms']} | {r['stall_in_tbt']} | {r['identical']}/{r['streams']} |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(args.streams)]
    rows = [await measure(s, prompts, args.max_tokens) for s in SCENARIOS]
    result = table(rows)
    print(result)
    if not args.no_write:
        machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"
        write_section("Recovery: what a failure costs a stream", (
            f"`python -m bench.recovery` ({time.strftime('%Y-%m-%d')}; {machine}; {MODEL}, CPU fp32, one thread per "
            f"worker; 2 scheduler replicas, 1 prompt worker, 2 token workers, all processes on the same cores). "
            f"{args.streams} greedy streams at once, {args.prompt_tokens}-token prompts, {args.max_tokens} tokens "
            f"each; the kill comes once every stream has {KILL_AFTER_TOKENS} tokens. A stream's stall is its gap "
            "around the kill; the streams hit are those with a resume / continue event on their scheduler span.\n\n"
            f"{result}\n"))


if __name__ == "__main__":
    asyncio.run(main())
