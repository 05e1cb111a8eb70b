"""Keepalive: a peer that stops answering (SIGSTOP: its sockets stay open, nothing replies, as with a hung process
or a host gone without closing its connections) fails the calls on it with UNAVAILABLE within two keepalive
periods, where without pings they would wait for their deadline."""

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitwise.launcher import free_port_ranges
from splitwise.rpc.options import channel_options

SERVER = """
import asyncio, sys
from splitwise.server import start_server
async def main():
    service = await start_server("127.0.0.1:" + sys.argv[1], [], [])
    print("up", flush=True)
    await service.server.wait_for_termination()
asyncio.run(main())
"""


@pytest.fixture
def server():
    (port,) = free_port_ranges(1)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


async def watch_until_hung(proc, address: str, keepalive_s: float, wait_s: float):
    """A server stream open on the server, which is then stopped: how the stream ends, and after how long."""
    async with grpc.aio.insecure_channel(address, options=channel_options(keepalive_s)) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        try:
            await asyncio.wait_for(call.read(), wait_s)
        except grpc.aio.AioRpcError as e:
            return e.code(), time.monotonic() - start
        except asyncio.TimeoutError:
            return None, time.monotonic() - start
        finally:
            call.cancel()


async def test_a_hung_peer_fails_its_calls_with_unavailable_within_two_keepalive_periods(server):
    code, after_s = await watch_until_hung(*server, keepalive_s=0.5, wait_s=10)
    assert code == grpc.StatusCode.UNAVAILABLE and after_s < 5, (code, after_s)


async def test_without_keepalive_a_hung_peer_is_not_noticed(server):
    code, _ = await watch_until_hung(*server, keepalive_s=0, wait_s=3)
    assert code is None
