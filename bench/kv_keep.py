"""The kept copy's cost: one request's KV put into a real kv_store over mTLS and pulled back, as a message per layer
against runs of layers (KVChunk.num_layers), side by side in one run.

A prompt worker keeps a copy of each request's prompt KV in the kv_store (`SPLITWISE_KV_KEEP`), so that a request
whose token worker dies resumes without recomputing its prompt; a token worker pulls it back then. Both ends are
real: the kv_store is its own process (its CPU read from /proc), the sending and the pulling are this process's
KVSender and KVReceiver on gRPC channels with the prompt and token workers' certificates (their CPU: this process's,
gRPC's threads included). The layers come as a serialized prefill hands them over (each layer copied at once, sent
after the first token).

Run: .venv/bin/python -m bench.kv_keep [--profile llama2-70b@dgx-a100 --kv-scale 256 --tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.kv_transfer import free_port
from bench.mock_cluster import cpu_seconds
from splitwise.channels import ChannelPool
from splitwise.cluster.redis_server import start_redis
from splitwise.engine.sampling import SampledToken
from splitwise.kv.layout import DTYPES, KVLayout
from splitwise.kv.transport.receiver import KVReceiver
from splitwise.kv.transport.sender import KVSender
from splitwise.kv.chunks import DEFAULT_MAX_CHUNK_BYTES
from splitwise.rpc.kv_stream import kv_stream
from splitwise.rpc.v1 import kv_store_pb2, kv_store_pb2_grpc, worker_pb2
from splitwise.security.tls import ClusterTLS, make_cluster_certs

MODES = {"a message per layer": False, "runs of layers": True}


def layout_of(args) -> KVLayout:
    from splitwise.model.mock import load_mock_model

    mock = load_mock_model(args.profile, kv_scale=args.kv_scale)
    return KVLayout.of(mock.config, DTYPES[mock.dtype], mock.fingerprint)


async def keep_and_pull(put_channels: ChannelPool, get_channels: ChannelPool, address: str, layout: KVLayout,
                        rid: str, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]],
                        layer_runs: bool) -> None:
    """One kept copy into the kv_store, then its pull by a token worker's receiver (into a sink that drops it)."""
    open_stream, target = kv_stream(put_channels.get(address), worker_pb2.KVTarget.KIND_KV_STORE)
    sender = KVSender(open_stream, target, rid, layout, tokens, DEFAULT_MAX_CHUNK_BYTES, 30.0, layerwise=False,
                      span_name="kv_transfer.keep", layer_runs=layer_runs)
    send = asyncio.create_task(sender.send())
    for layer, (keys, values) in enumerate(kv):
        sender.on_layer_kv(layer, keys, values, 0)
    await asyncio.sleep(0)  # the layers handed over are queued before the first token, as after a prefill
    sender.commit(SampledToken(1, 0.0, None))
    await send
    receiver = KVReceiver(lambda *kv_of_layers: None, layout, tokens)
    stub = kv_store_pb2_grpc.KVStoreStub(get_channels.get(address))
    call = stub.Get(kv_store_pb2.GetRequest(request_id=rid, wait_s=10.0, kv_hash=receiver.kv_hash), timeout=60)
    await receiver.consume(call)
    assert receiver.committed.done() and receiver.committed.exception() is None
    await stub.Delete(kv_store_pb2.DeleteRequest(request_id=rid), timeout=60)  # as a finished request's is


async def measure(args) -> dict[str, dict[str, float]]:
    layout = layout_of(args)
    work = Path(tempfile.mkdtemp(prefix="splitwise-bench-keep-"))
    make_cluster_certs(work / "tls")
    redis_port, store_port = free_port(), free_port()
    redis_proc = start_redis(redis_port)
    address = f"127.0.0.1:{store_port}"
    store = subprocess.Popen(
        [sys.executable, "-m", "services.kv_store", "--listen", address, "--redis-url",
         f"redis://127.0.0.1:{redis_port}/0", "--tls-dir", str(work / "tls"), "--metrics-listen", "127.0.0.1:0",
         "--ttl-s", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    puts = ChannelPool(tls=ClusterTLS.load(work / "tls", "prompt_worker"))
    gets = ChannelPool(tls=ClusterTLS.load(work / "tls", "token_worker"))
    try:
        g = torch.Generator().manual_seed(0)
        shape = (args.tokens, layout.num_kv_heads, layout.head_dim)
        kv = [(torch.randn(shape, generator=g).to(layout.torch_dtype).transpose(0, 1),
               torch.randn(shape, generator=g).to(layout.torch_dtype).transpose(0, 1))
              for _ in range(layout.num_layers)]
        tokens = list(range(args.tokens))
        for attempt in range(100):  # the kv_store's port, once it serves
            try:
                await keep_and_pull(puts, gets, address, layout, f"warm-{attempt}", tokens, kv, True)
                break
            except Exception:
                if store.poll() is not None:
                    raise RuntimeError(f"the kv_store exited: {store.stderr.read().decode()[-2000:]}")
                await asyncio.sleep(0.2)
        for mode in MODES.values():  # both paths warm
            await keep_and_pull(puts, gets, address, layout, f"warm-{mode}", tokens, kv, mode)
        totals = {name: {"here_s": 0.0, "store_s": 0.0, "wall_s": 0.0, "n": 0} for name in MODES}
        # A B B A, in rounds, so that a drift of the machine's load falls on both alike.
        order = [name for _ in range(args.rounds) for name in (*MODES, *reversed(MODES))]
        per_turn = max(1, args.transfers // len(order))
        for turn, name in enumerate(order):
            here, there, wall = time.process_time(), cpu_seconds(store.pid), time.perf_counter()
            for i in range(per_turn):
                await keep_and_pull(puts, gets, address, layout, f"r{turn}-{i}", tokens, kv, MODES[name])
            t = totals[name]
            t["here_s"] += time.process_time() - here
            t["store_s"] += cpu_seconds(store.pid) - there
            t["wall_s"] += time.perf_counter() - wall
            t["n"] += per_turn
        return {name: {k: v / t["n"] * 1e3 for k, v in t.items() if k != "n"} | {"n": t["n"]}
                for name, t in totals.items()}, layout
    finally:
        await puts.close()
        await gets.close()
        store.terminate()
        store.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="llama2-70b@dgx-a100", help="mock-engine profile whose layout is sent")
    parser.add_argument("--kv-scale", type=float, default=256.0, help="the mock's KV scale (bytes / scale)")
    parser.add_argument("--tokens", type=int, default=32, help="prompt tokens of each request")
    parser.add_argument("--transfers", type=int, default=400, help="kept copies in all, split between the modes")
    parser.add_argument("--rounds", type=int, default=2, help="A B B A rounds")
    args = parser.parse_args()
    results, layout = asyncio.run(measure(args))
    size = layout.num_layers * args.tokens * layout.bytes_per_token_per_layer
    what = f"{args.profile} at kv-scale {args.kv_scale:g}"
    print(f"{what}: {layout.num_layers} layers, {args.tokens} tokens, {size / 1024:.1f} KiB of KV per request; "
          f"ms per request (kept and pulled back), {os.cpu_count()} cores")
    print(f"| what | {' | '.join(MODES)} | ratio |")
    print(f"|---|{'---:|' * len(MODES)}---:|")
    names = list(MODES)
    for key, label in (("here_s", "sender + puller CPU (this process)"), ("store_s", "kv_store CPU"),
                       ("wall_s", "wall time")):
        a, b = (results[n][key] for n in names)
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")
    print(f"| requests | {results[names[0]]['n']} | {results[names[1]]['n']} | |")


if __name__ == "__main__":
    main()
