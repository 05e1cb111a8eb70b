"""Workload replay: the Azure LLM inference traces, sent open-loop to a running cluster through its public API.

Each trace row (arrival time, prompt tokens, output tokens) becomes a request with a synthetic prompt of that
many token ids and its output forced to that length (ignore_eos). Arrivals keep the trace's schedule whether or
not earlier requests have finished. `--rate-scale k` compresses time (k times the arrival rate),
`--length-scale k` divides prompt and output lengths (so a CPU cluster can keep up); a window, a request count
and a seed pick what is sent.

Run: splitwise bench replay --trace conv --length-scale 8 --requests 200 [--baseline idle.json] --out DIR

`--api openai` sends the same requests to the OpenAI-compatible HTTP gateway instead (POST /v1/completions with the
prompt's token ids, streamed, `ignore_eos`, and `logprobs: 0` so that each event says how many tokens it carries),
so one replay measures either front door.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import grpc

from splitwise.slo import IdleBaseline, RequestResult, format_report, slo_attainment, summarize, write_csv
from splitwise.client import SplitwiseClient
from splitwise.security.keys import API_KEY_FILE, configured_key

# Shipped with the package (package-data), so that an installed `splitwise bench replay` finds them.
TRACE_DIR = Path(__file__).resolve().parent / "data" / "azure-llm-2023"
# Token ids of synthetic prompts start above the ids tokenizers reserve for special tokens.
FIRST_PROMPT_TOKEN_ID = 3


@dataclass(frozen=True)
class TraceRequest:
    index: int  # row in the trace
    arrival_s: float  # from the first request sent
    prompt_tokens: int
    output_tokens: int


def trace_path(trace: str) -> Path:
    """`conv` / `code` (the Azure 2023 traces shipped in splitwise/data), or a CSV path."""
    path = Path(trace)
    if path.suffix == ".csv" or path.exists():
        return path
    return TRACE_DIR / f"{trace}.csv"


def load_trace(trace: str, *, rate_scale: float = 1.0, length_scale: float = 1.0, start_s: float = 0.0,
               duration_s: float | None = None, max_requests: int | None = None,
               max_context_tokens: int | None = None) -> list[TraceRequest]:
    """The trace's requests in the window [start_s, start_s + duration_s) of trace time, at most max_requests,
    arrival times divided by rate_scale, lengths divided by length_scale (at least 1 token each) and clipped so
    that prompt + output fits max_context_tokens."""
    if rate_scale <= 0 or length_scale <= 0:
        raise ValueError("rate_scale and length_scale must be positive")
    rows = []
    with open(trace_path(trace), newline="") as f:
        for row in csv.DictReader(f):
            rows.append((_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"trace {trace} has no requests")
    t0 = rows[0][0]
    picked: list[TraceRequest] = []
    for index, (t, prompt, output) in enumerate(rows):
        offset = t - t0
        if offset < start_s or (duration_s is not None and offset >= start_s + duration_s):
            continue
        prompt = max(1, round(prompt / length_scale))
        output = max(1, round(output / length_scale))
        if max_context_tokens is not None and prompt + output > max_context_tokens:
            output = min(output, max_context_tokens // 2)
            prompt = max_context_tokens - output
        picked.append(TraceRequest(index, offset, prompt, output))
        if max_requests is not None and len(picked) == max_requests:
            break
    if not picked:
        raise ValueError(f"no request of trace {trace} in the window starting at {start_s}s")
    first = picked[0].arrival_s
    return [TraceRequest(r.index, (r.arrival_s - first) / rate_scale, r.prompt_tokens, r.output_tokens)
            for r in picked]


def _timestamp(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than datetime parses
    whole, _, fraction = text.partition(".")
    return datetime.fromisoformat(whole).timestamp() + float("0." + (fraction or "0"))


def synthetic_prompt(request: TraceRequest, vocab_size: int, seed: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + request.index)
    return [rng.randrange(FIRST_PROMPT_TOKEN_ID, vocab_size) for _ in range(request.prompt_tokens)]


class Progress:
    """A one-line progress bar on stderr: requests sent, finished, failed, and the elapsed time."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.sent = self.done = self.failed = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < 0.2):
            return
        self._last_draw = now
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, {self.sent - self.done} "
              f"in flight, {self.failed} failed, {now - self.started:.0f}s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.update(force=True)
        if self.enabled:
            print(file=sys.stderr)


class _Timing:
    """A request's token arrival times, as its client sees them."""

    def __init__(self):
        self.sent = time.monotonic()
        self.first = self.last = None
        self.gaps: list[float] = []
        self.received = 0

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.monotonic()
        self.received += count
        if self.first is None:
            self.first = now
            count -= 1
        if count:  # tokens that arrived together share the gap since the last message
            self.gaps += [(now - self.last) / count] * count
        self.last = now

    def result(self, request: TraceRequest, error: str) -> RequestResult:
        end = time.monotonic()
        if not error and self.received != request.output_tokens:
            error = f"received {self.received} of {request.output_tokens} tokens"
        return RequestResult(
            request_id=f"replay-{request.index}", arrival_s=request.arrival_s, prompt_tokens=request.prompt_tokens,
            output_tokens=self.received, ttft_s=None if self.first is None else self.first - self.sent,
            tbt_s=self.gaps, e2e_s=None if error else end - self.sent, error=error)


async def _one(client: SplitwiseClient, request: TraceRequest, prompt: list[int], timeout_s: float) -> RequestResult:
    """Streams one request over gRPC; times are measured by this client (monotonic), from the request's send."""
    timing = _Timing()
    error = ""
    try:
        async for chunk in client.stream(token_ids=prompt, max_tokens=request.output_tokens, ignore_eos=True,
                                         timeout=timeout_s, request_id=f"replay-{request.index}"):
            timing.tokens(len(chunk.token_ids))
    except grpc.aio.AioRpcError as e:
        error = f"{e.code().name}: {e.details()}"
    return timing.result(request, error)


class OpenAIClient:
    """The OpenAI-compatible gateway at host:port, as `replay` drives it: streamed /v1/completions of token ids."""

    def __init__(self, address: str, model: str, api_key: str | None = None):
        self.url = f"http://{address}/v1/completions"
        self.model = model
        key = configured_key("SPLITWISE_API_KEY", API_KEY_FILE) if api_key is None else api_key
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def __aenter__(self) -> "OpenAIClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def one(self, request: TraceRequest, prompt: list[int], timeout_s: float) -> RequestResult:
        timing = _Timing()
        error = ""
        body = {"model": self.model, "prompt": prompt, "max_tokens": request.output_tokens, "ignore_eos": True,
                "stream": True, "logprobs": 0}
        headers = {**self.headers, "X-Request-Id": f"replay-{request.index}"}
        try:
            async with self.session.post(self.url, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                if response.status != 200:
                    error = f"HTTP {response.status}: {(await response.text())[:200]}"
                else:
                    async for line in response.content:
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = f"{event['error'].get('code')}: {event['error'].get('message')}"
                            break
                        logprobs = event["choices"][0].get("logprobs") or {}
                        timing.tokens(len(logprobs.get("tokens") or ()))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            error = f"{type(e).__name__}: {e}"
        return timing.result(request, error)


async def replay(address: str, requests: list[TraceRequest], vocab_size: int, *, seed: int = 0,
                 timeout_s: float = 600.0, progress: bool = True, api: str = "grpc",
                 model: str = "") -> list[RequestResult]:
    """Sends each request at its arrival time (open loop) and returns the results in trace order. api "grpc": to
    the scheduler replicas at address; "openai": to the HTTP gateway at address, naming `model`."""
    prompts = [synthetic_prompt(r, vocab_size, seed) for r in requests]
    bar = Progress(len(requests), progress)
    if api == "openai":
        opened = OpenAIClient(address, model)
        send = opened.one
    elif api == "grpc":
        opened = SplitwiseClient(address)
        send = lambda request, prompt, timeout: _one(opened, request, prompt, timeout)  # noqa: E731
    else:
        raise ValueError(f"api must be grpc or openai, got {api!r}")
    async with opened:
        loop = asyncio.get_running_loop()
        run_start = time.monotonic()
        tasks: list[asyncio.Task] = []

        def finished(task: asyncio.Task) -> None:
            bar.done += 1
            bar.failed += bool(not task.cancelled() and task.result().error)
            bar.update()

        for request, prompt in zip(requests, prompts):
            delay = run_start + request.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(send(request, prompt, timeout_s))
            task.add_done_callback(finished)
            tasks.append(task)
            bar.sent += 1
            bar.update()
        results = await asyncio.gather(*tasks)
    bar.close()
    return list(results)


def baseline_lengths(requests: list[TraceRequest], points: int = 6) -> list[int]:
    """Prompt lengths at which to measure the idle baseline: spread over what the workload sends."""
    top = max(r.prompt_tokens for r in requests)
    return sorted({max(1, round(top * f)) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)[-points:]})


async def measure_idle_baseline(address: str, vocab_size: int, max_context_tokens: int,
                                prompt_lengths: list[int] | None = None, output_tokens: int = 32,
                                repeats: int = 3, seed: int = 0, api: str = "grpc", model: str = "") -> IdleBaseline:
    """Each request alone on the idle cluster: TTFT by prompt length, TBT by context length (medians)."""
    if prompt_lengths is None:  # the whole context window (workloads pass baseline_lengths instead)
        top = max_context_tokens - output_tokens - 1
        prompt_lengths = sorted({max(1, round(top * f)) for f in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)})
    warmup = TraceRequest(9_999_999, 0.0, prompt_lengths[0], output_tokens)
    front = {"api": api, "model": model}
    await replay(address, [warmup], vocab_size, seed=seed, progress=False, **front)  # first calls cost more
    ttft_points, tbt_points = [], []
    for length in prompt_lengths:
        ttfts, tbts = [], []
        for r in range(repeats):
            request = TraceRequest(10_000_000 + length * 100 + r, 0.0, length, output_tokens)
            result = (await replay(address, [request], vocab_size, seed=seed, progress=False, **front))[0]
            if result.error:
                raise RuntimeError(f"idle baseline request of {length} tokens failed: {result.error}")
            ttfts.append(result.ttft_s)
            tbts.append(_median(result.tbt_s))
        ttft_points.append((length, _median(ttfts)))
        tbt_points.append((length + output_tokens // 2, _median(tbts)))
    return IdleBaseline(ttft_points, tbt_points)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


async def cluster_model(address: str, api: str = "grpc") -> tuple[str, int, int]:
    """The model the cluster serves (ClusterStatus, or the gateway's /v1/models), its vocabulary size and context
    window (from the local model cache)."""
    from splitwise.model.mock import MOCK_CONTEXT_TOKENS, MOCK_VOCAB_SIZE, is_mock
    from splitwise.model.weights import read_hf_config, resolve_model

    if api == "openai":
        key = configured_key("SPLITWISE_API_KEY", API_KEY_FILE)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{address}/v1/models",
                                   headers={"Authorization": f"Bearer {key}"} if key else {}) as response:
                if response.status != 200:
                    raise RuntimeError(f"GET http://{address}/v1/models: HTTP {response.status}: "
                                       f"{(await response.text())[:200]}")
                model = (await response.json())["data"][0]["id"]
    else:
        async with SplitwiseClient(address) as client:
            model = (await client.cluster_status()).model
    if is_mock(model):
        return model, MOCK_VOCAB_SIZE, MOCK_CONTEXT_TOKENS
    hf = read_hf_config(resolve_model(model)[1])
    return model, hf["vocab_size"], hf["max_position_embeddings"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", choices=["grpc", "openai"], default="grpc",
                        help="the front door: the scheduler's gRPC API, or the OpenAI-compatible HTTP gateway")
    parser.add_argument("--address", default="", help="scheduler host:port (a,b for replicas), or with --api openai "
                        "the gateway's host:port (default 127.0.0.1:50051, or 127.0.0.1:8000)")
    parser.add_argument("--trace", default="conv", help="conv, code, or a CSV with the Azure trace's columns")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="k: arrivals k times as fast as the trace's")
    parser.add_argument("--length-scale", type=float, default=1.0, help="k: prompt and output lengths divided by k")
    parser.add_argument("--start-s", type=float, default=0.0, help="window start, seconds of trace time")
    parser.add_argument("--duration-s", type=float, default=None, help="window length, seconds of trace time")
    parser.add_argument("--requests", type=int, default=None, help="at most this many requests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each request")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="idle baseline JSON (from --measure-baseline) for SLO attainment")
    parser.add_argument("--measure-baseline", action="store_true",
                        help="first measure each request size alone on the idle cluster (written to OUT/baseline.json)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/replay"), help="output directory")


async def run(args: argparse.Namespace) -> int:
    args.address = args.address or ("127.0.0.1:8000" if args.api == "openai" else "127.0.0.1:50051")
    model, vocab, context = await cluster_model(args.address, args.api)
    front = {"api": args.api, "model": model}
    requests = load_trace(args.trace, rate_scale=args.rate_scale, length_scale=args.length_scale,
                          start_s=args.start_s, duration_s=args.duration_s, max_requests=args.requests,
                          max_context_tokens=context)
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = None
    if args.measure_baseline:
        print(f"measuring the idle baseline on {model}...", file=sys.stderr)
        baseline = await measure_idle_baseline(args.address, vocab, context, baseline_lengths(requests), **front)
        (args.out / "baseline.json").write_text(json.dumps(baseline.to_dict(), indent=1))
    elif args.baseline:
        baseline = IdleBaseline.from_dict(json.loads(args.baseline.read_text()))
    span = requests[-1].arrival_s
    print(f"replaying {len(requests)} requests of {args.trace} over {span:.0f}s "
          f"({len(requests) / max(span, 1e-9):.2f} req/s) against {args.address} ({model}, {args.api})", file=sys.stderr)
    results = await replay(args.address, requests, vocab, seed=args.seed, timeout_s=args.timeout_s, **front)
    write_csv(results, args.out / "requests.csv")
    summary = summarize(results)
    report = slo_attainment(results, baseline) if baseline else None
    text = format_report(summary, report)
    (args.out / "report.md").write_text(text)
    print(text)
    print(f"per-request CSV: {args.out / 'requests.csv'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitwise bench replay", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
