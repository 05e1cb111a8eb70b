"""KV transfer benchmark: each transport's bandwidth on real KV between two worker processes, against a plain
memcpy and a plain socket; and TTFT / second-token latency split (layer-wise and serialized, each transport)
against colocated on the same cores; and what mTLS costs the gRPC transport (the same transfers with --insecure).
SmolLM2-135M, fp32, one compute thread per worker.

Run: .venv/bin/python -m bench.kv_transfer [--quick] [--tls-only] [--bandwidth-only] [--no-write]   (writes
docs/benchmarks.md's KV section; --tls-only measures only gRPC with and without mTLS; --bandwidth-only only the
serialized bandwidths, printed)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.engine import log, write_section
from splitwise.client import SplitwiseClient
from splitwise.launcher import Cluster, UpOptions, on_free_ports, start_healthy
from splitwise.model.weights import read_hf_config, resolve_model
from splitwise.telemetry.jsonl_exporter import read_spans

MODEL = "smollm2-135m-instruct"
MB = 1 << 20
SERIALIZED = str(10**9)  # layer-wise from this many prompt tokens on: never
PLAINTEXT = "plaintext"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- baselines ------------------------------------------------------------------------------------


def memcpy_gbps(num_bytes: int, repeats: int, pool_bytes: int = 512 * MB) -> float:
    """One copy of num_bytes from memory to memory, each repeat at other offsets of a 512 MiB pool, so the
    bytes come from DRAM as a transfer's do, not from a cache that a small buffer would stay in."""
    src = torch.randint(0, 255, (pool_bytes,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    slots = max(1, pool_bytes // num_bytes)
    times = []
    for i in range(repeats):
        offset = (i * 7 % slots) * num_bytes
        times.append(_timed(lambda: dst[offset:offset + num_bytes].copy_(src[offset:offset + num_bytes])))
    return num_bytes / min(times) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SOCKET_RECEIVER = """
import socket, sys
n = int(sys.argv[1])
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
print(server.getsockname()[1], flush=True)
buf = bytearray(n); view = memoryview(buf)
while True:
    conn, _ = server.accept()
    got = 0
    while got < n:
        got += conn.recv_into(view[got:], n - got)
    conn.sendall(b"k"); conn.close()
"""


def socket_gbps(num_bytes: int, repeats: int, send_bytes: int = 4 * MB) -> float:
    """A plain TCP socket over loopback between two processes, in 4 MiB sends, until the receiver has it all."""
    receiver = subprocess.Popen([sys.executable, "-c", SOCKET_RECEIVER, str(num_bytes)], stdout=subprocess.PIPE,
                                text=True)
    try:
        port = int(receiver.stdout.readline())
        data = memoryview(os.urandom(num_bytes))
        times = []
        for _ in range(repeats + 1):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                start = time.perf_counter()
                for offset in range(0, num_bytes, send_bytes):
                    conn.sendall(data[offset:offset + send_bytes])
                conn.recv(1)
                times.append(time.perf_counter() - start)
        return num_bytes / min(times[1:]) / 1e9
    finally:
        receiver.kill()


MOONCAKE_RECEIVER = """
import sys, torch
from mooncake.engine import TransferEngine
n = int(sys.argv[1])
engine = TransferEngine()
assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
buffer = torch.zeros(n, dtype=torch.uint8)
assert engine.register_memory(buffer.data_ptr(), n) == 0
print(f"127.0.0.1:{engine.get_rpc_port()} {buffer.data_ptr()}", flush=True)
sys.stdin.read()
"""


def mooncake_raw_gbps(num_bytes: int, repeats: int) -> float:
    """The Mooncake Transfer Engine's own write between two processes over loopback TCP, as our backend runs it (P2P
    handshake, registered buffers): one descriptor of num_bytes, nothing else (no staging, checksum or control
    stream). The first write, which opens the connection, is not counted."""
    from mooncake.engine import TransferEngine

    receiver = subprocess.Popen([sys.executable, "-c", MOONCAKE_RECEIVER, str(num_bytes)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        session, address = receiver.stdout.readline().split()
        engine = TransferEngine()
        if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("the Mooncake transfer engine did not start")
        source = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
        if engine.register_memory(source.data_ptr(), num_bytes) != 0:
            raise RuntimeError("cannot register the benchmark's buffer with Mooncake")
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            if engine.batch_transfer_sync_write(session, [source.data_ptr()], [int(address)], [num_bytes]) != 0:
                raise RuntimeError("the raw Mooncake write failed")
            times.append(time.perf_counter() - start)
        engine.unregister_memory(source.data_ptr())
        return num_bytes / min(times[1:]) / 1e9
    finally:
        receiver.stdin.close()
        receiver.wait(timeout=30)


# -- the cluster ----------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str  # "colocated" or "<transport> layer-wise" / "<transport> serialized"
    transport: str = ""
    layerwise: bool = True
    env: dict = field(default_factory=dict)
    insecure: bool = False  # no mTLS between the services (and no keys)

    @property
    def colocated(self) -> bool:
        return not self.transport


def start_cluster(setup: Setup, run_dir: Path) -> Cluster:
    env = {"SPLITWISE_NUM_THREADS": "1", "SPLITWISE_LOG_LEVEL": "WARNING", **setup.env}
    if not setup.colocated:
        env["SPLITWISE_KV_TRANSPORTS"] = setup.transport
        env["SPLITWISE_KV_LAYERWISE_MIN_TOKENS"] = "0" if setup.layerwise else SERIALIZED
    return start_healthy(on_free_ports(UpOptions(
        model=MODEL, device="cpu", run_dir=run_dir, prompt_workers=0 if setup.colocated else 1,
        token_workers=0 if setup.colocated else 1, mixed_workers=1 if setup.colocated else 0, extra_env=env,
        insecure=setup.insecure)))


@dataclass
class Latency:
    ttft_s: float
    second_token_s: float
    e2e_s: float
    request_id: str


async def stream_once(address: str, ids: list[int], max_tokens: int, api_key: str = "") -> Latency:
    async with SplitwiseClient(address, api_key=api_key) as client:
        start = time.perf_counter()
        times, rid = [], ""
        async for chunk in client.stream(token_ids=ids, max_tokens=max_tokens, ignore_eos=True, timeout=600):
            rid = chunk.request_id
            times += [time.perf_counter() - start] * len(chunk.token_ids)
    return Latency(times[0], times[1] - times[0], times[-1], rid)


def prompt(num_tokens: int, vocab: int, salt: int) -> list[int]:
    return [100 + (i * 7919 + salt * 104729) % (vocab - 200) for i in range(num_tokens)]


def transfer_spans(run_dir: Path, request_id: str) -> dict | None:
    spans = [s for s in read_spans(run_dir / "traces" / "prompt_worker-0.jsonl")
             if s["name"] == "kv_transfer.send" and s["attributes"].get("splitwise.request_id") == request_id]
    return spans[0]["attributes"] if spans else None


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and one repeat, to check the program")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--tls-only", action="store_true", help="only the gRPC transport, with mTLS and without")
    parser.add_argument("--bandwidth-only", action="store_true",
                        help="only the serialized transfers' bandwidth (no latency runs; prints, writes nothing)")
    parser.add_argument("--setups", default="",
                        help="only these setups, comma-separated (colocated, 'shm serialized', 'grpc layer-wise', "
                             "...); prints, writes nothing")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment setting for every cluster (e.g. SPLITWISE_KV_KEEP=false); prints, writes "
                             "nothing")
    args = parser.parse_args()
    if args.bandwidth_only or args.setups or args.env:
        args.no_write = True
    repeats = 1 if args.quick else 3
    sizes_mb = [1, 8] if args.quick else [1, 8, 64]
    prompt_lengths = [128, 256] if args.quick else [512, 1024, 2048]
    output_tokens = 8 if args.quick else 32
    transports = ["grpc", "shm"] + (["mooncake"] if importlib.util.find_spec("mooncake") else [])

    folder = resolve_model(MODEL)[1]
    hf = read_hf_config(folder)
    vocab = hf["vocab_size"]
    kv_bytes_per_token = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * (
        hf["hidden_size"] // hf["num_attention_heads"]) * 4

    rows_bw = []
    for size in sizes_mb:
        log(f"baselines at {size} MB...")
        rows_bw.append({"size_mb": size, "memcpy": memcpy_gbps(size * MB, 20),
                        "socket": socket_gbps(size * MB, repeats),
                        "mooncake raw": mooncake_raw_gbps(size * MB, max(repeats, 5)) if "mooncake" in transports
                        else float("nan")})

    latency: dict[tuple[str, int], list[Latency]] = {}
    transfer: dict[tuple[str, int], list[dict]] = {}
    setups = [Setup("colocated")] + [Setup(f"{t} {mode}", t, mode == "layer-wise")
                                     for t in transports for mode in ("layer-wise", "serialized")]
    setups.append(Setup(f"grpc serialized {PLAINTEXT}", "grpc", False, insecure=True))
    if args.tls_only:
        setups = [s for s in setups if s.transport == "grpc" and not s.layerwise]
    if args.bandwidth_only:
        setups = [s for s in setups if s.transport and not s.layerwise and not s.insecure]
    for setup in setups:
        setup.env.update(dict(item.split("=", 1) for item in args.env))
    if args.setups:
        wanted = {name.strip() for name in args.setups.split(",")}
        setups = [s for s in setups if s.name in wanted]
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        for setup in setups:
            run_dir = Path(tmp) / setup.name.replace(" ", "-")
            log(f"{setup.name}: starting a cluster...")
            cluster = start_cluster(setup, run_dir)
            address = cluster.address
            key = cluster.credentials.api_key if cluster.credentials else ""
            transport = setup.transport + (f" {PLAINTEXT}" if setup.insecure else "")
            try:
                asyncio.run(stream_once(address, prompt(64, vocab, 0), 2, key))  # warm-up
                if setup.transport and not setup.layerwise:  # the transport alone: after the prefill
                    for size in sizes_mb:
                        tokens = max(1, round(size * MB / kv_bytes_per_token))
                        for r in range(repeats):
                            out = asyncio.run(stream_once(address, prompt(tokens, vocab, 1000 + r), 2, key))
                            attrs = transfer_spans(run_dir, out.request_id)
                            transfer.setdefault((transport, size), []).append(attrs)
                        best = max(a["kv.bytes"] / a["kv.seconds"] for a in transfer[(transport, size)])
                        log(f"  {size} MB ({tokens} tokens): {best / 1e9:.2f} GB/s")
                for length in prompt_lengths if not (args.tls_only or args.bandwidth_only or setup.insecure) else ():
                    for r in range(repeats):
                        out = asyncio.run(stream_once(address, prompt(length, vocab, r), output_tokens, key))
                        latency.setdefault((setup.name, length), []).append(out)
                    med = statistics.median(x.ttft_s for x in latency[(setup.name, length)])
                    log(f"  {length} tokens: TTFT {med * 1e3:.0f} ms")
            finally:
                cluster.stop()

    if args.tls_only:
        text = render_tls(transfer, sizes_mb)
        print(text)
        if not args.no_write:
            write_section("KV transfer over mTLS", text)
        return
    if args.bandwidth_only:
        print(render(rows_bw, transfer, {}, transports, sizes_mb, [], output_tokens))
        return
    text = render(rows_bw, transfer, latency, transports, sizes_mb, prompt_lengths, output_tokens)
    text += "\n" + render_tls(transfer, sizes_mb)
    print(text)
    if not args.no_write:
        write_section("KV transfer", text)


def best_gbps(transfer, transport: str, size: int) -> float:
    runs = transfer.get((transport, size), [])
    return max(a["kv.bytes"] / a["kv.seconds"] for a in runs) / 1e9 if runs else float("nan")


def render_tls(transfer, sizes_mb) -> str:
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, {MODEL}, float32, one compute thread per worker. "
             "Run `python -m bench.kv_transfer --tls-only`.", "",
             "What mTLS costs the gRPC KV transport: the same serialized transfers between the same two processes, "
             f"with the cluster's mTLS (the default) and with `splitwise up --insecure` ({PLAINTEXT}); GB/s, best of "
             "the repeats.", "", "| KV size | grpc mTLS | grpc plaintext | mTLS / plaintext |", "|---|---|---|---|"]
    for size in sizes_mb:
        tls, plain = best_gbps(transfer, "grpc", size), best_gbps(transfer, f"grpc {PLAINTEXT}", size)
        lines.append(f"| {size} MB | {tls:.2f} | {plain:.2f} | {tls / plain:.0%} |")
    return "\n".join(lines) + "\n"


def render(rows_bw, transfer, latency, transports, sizes_mb, prompt_lengths, output_tokens) -> str:
    def best_gbps(transport, size):
        runs = transfer.get((transport, size), [])
        return max(a["kv.bytes"] / a["kv.seconds"] for a in runs) / 1e9 if runs else float("nan")

    def with_staging_gbps(transport, size):
        runs = transfer.get((transport, size), [])
        return max(a["kv.bytes"] / (a["kv.seconds"] + a.get("kv.staging_seconds", 0.0)) for a in runs) / 1e9 \
            if runs else float("nan")

    staged = [t for t in transports if t != "grpc"]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {MODEL}, float32, "
             "one compute thread per worker. Run `python -m bench.kv_transfer`.", "",
             "Bandwidth of real KV between a prompt worker process and a token worker process, serialized (the "
             "transfer announced after the prefill): bytes over the time from the prefill's end to the receiver's "
             "acknowledged commit (checksums and the write into the KV blocks included). A staged transport (shm, "
             "Mooncake) copies each layer into the receiver's buffer while the prefill runs; `+ staging` counts that "
             "copy's time too, as if it were not hidden. Against a plain memcpy, a plain TCP socket over loopback "
             "(two processes, 4 MiB sends) and the Mooncake Transfer Engine's own write between two processes (one "
             "descriptor, loopback TCP); GB/s, best of the repeats.", "",
             "| KV size | memcpy | socket | mooncake raw | " + " | ".join(transports) + " | "
             + " | ".join(f"{t} + staging" for t in staged) + " | shm / memcpy | grpc / socket | mooncake / raw |",
             "|---|---|---|---|" + "---|" * (len(transports) + len(staged)) + "---|---|---|"]
    for row in rows_bw:
        size = row["size_mb"]
        cells = [best_gbps(t, size) for t in transports] + [with_staging_gbps(t, size) for t in staged]
        shm, grpc_, mooncake = (best_gbps(t, size) for t in ("shm", "grpc", "mooncake"))
        lines.append(f"| {size} MB | {row['memcpy']:.2f} | {row['socket']:.2f} | {row['mooncake raw']:.2f} | "
                     + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {shm / row['memcpy']:.0%} | {grpc_ / row['socket']:.0%} | "
                     f"{mooncake / row['mooncake raw']:.0%} |")
    if not prompt_lengths:
        return "\n".join(lines) + "\n"
    lines += ["", f"Latency as the client sees it (median of the repeats, {output_tokens} output tokens): time to "
              "first token, second-token latency (first to second token), end to end; ratios against colocated "
              "(one mixed worker doing both phases on one thread; split: prompt and token worker one thread each).",
              "", "| prompt | setup | TTFT ms | vs colocated | 2nd token ms | vs colocated | E2E ms | "
              "visible transfer share of E2E |", "|---|---|---|---|---|---|---|---|"]
    for length in prompt_lengths:
        base = latency.get(("colocated", length))
        if not base:
            continue
        base_ttft = statistics.median(x.ttft_s for x in base)
        base_second = statistics.median(x.second_token_s for x in base)
        for name in ["colocated"] + [f"{t} {m}" for t in transports for m in ("layer-wise", "serialized")]:
            runs = latency.get((name, length))
            if not runs:
                continue
            ttft = statistics.median(x.ttft_s for x in runs)
            second = statistics.median(x.second_token_s for x in runs)
            e2e = statistics.median(x.e2e_s for x in runs)
            share = "" if name == "colocated" else f"{max(0.0, second - base_second) / e2e:.1%}"
            lines.append(f"| {length} | {name} | {ttft * 1e3:.0f} | {ttft / base_ttft - 1:+.1%} | {second * 1e3:.0f} | "
                         f"{second / base_second - 1:+.1%} | {e2e * 1e3:.0f} | {share} |")
    lines += ["", "Visible transfer share: the second-token latency beyond colocated's, over the request's "
              "end-to-end latency (the part of the transfer the prefill did not hide)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
