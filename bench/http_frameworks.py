"""Which ASGI/HTTP stack the OpenAI gateway is built on, by measured overhead: the same server-sent-events stream
served by aiohttp and by Starlette on uvicorn (httptools), each in its own process, driven by one load process.

Each server streams EVENTS chunks of an OpenAI-shaped JSON object per request; the driver keeps CONCURRENCY streams
open. Reported per framework, side by side in one run: the server's CPU seconds per 1,000 streamed events, and the
P50/P99 gap between events as the client sees them.

    python -m bench.http_frameworks [--requests 400] [--concurrency 64] [--events 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import aiohttp

CHUNK = {"id": "chatcmpl-0", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]}


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def serve_aiohttp(port: int, events: int) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(events):
            await response.write(sse(CHUNK))
            await asyncio.sleep(0)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_starlette(port: int, events: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream():
        for _ in range(events):
            yield sse(CHUNK)
            await asyncio.sleep(0)
        yield b"data: [DONE]\n\n"

    async def handler(request):
        return StreamingResponse(stream(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="asyncio", log_level="warning",
                access_log=False)


SERVERS = {"aiohttp": serve_aiohttp, "starlette+uvicorn": serve_starlette}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, requests: int, concurrency: int) -> tuple[list[float], int]:
    gaps: list[float] = []
    events = 0
    queue = list(range(requests))
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            nonlocal events
            while queue:
                queue.pop()
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}) as response:
                    last = time.perf_counter()
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            now = time.perf_counter()
                            gaps.append(now - last)
                            last = now
                            events += 1
        await asyncio.gather(*(one() for _ in range(concurrency)))
    return gaps, events


def wait_listening(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"no server on port {port}")


def measure(name: str, args) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.http_frameworks", "--serve", name, "--port", str(port),
                             "--events", str(args.events)])
    try:
        wait_listening(port)
        asyncio.run(drive(port, args.concurrency, args.concurrency))  # warm-up
        before = cpu_seconds(proc.pid)
        gaps, events = asyncio.run(drive(port, args.requests, args.concurrency))
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(10)
    gaps.sort()
    return {"framework": name, "events": events, "server_cpu_ms_per_1000_events": 1000 * used / events * 1000,
            "gap_p50_ms": 1000 * statistics.median(gaps), "gap_p99_ms": 1000 * gaps[int(0.99 * len(gaps))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--events", type=int, default=64)
    parser.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve](args.port, args.events)
        return
    rows = [measure(name, args) for name in SERVERS]
    print(f"{args.requests} streams of {args.events} events, {args.concurrency} at once")
    print(f"{'framework':<20} {'server CPU ms/1000 events':>26} {'gap P50 ms':>11} {'gap P99 ms':>11}")
    for row in rows:
        print(f"{row['framework']:<20} {row['server_cpu_ms_per_1000_events']:>26.1f} {row['gap_p50_ms']:>11.3f} "
              f"{row['gap_p99_ms']:>11.3f}")
    base = rows[0]["server_cpu_ms_per_1000_events"]
    for row in rows[1:]:
        print(f"{row['framework']} / {rows[0]['framework']} server CPU: {row['server_cpu_ms_per_1000_events'] / base:.2f}x")


if __name__ == "__main__":
    main()
