"""The test session's cluster credentials: one CA and its certificates, and the public API's keys."""

from __future__ import annotations

import functools
import secrets
import tempfile
from pathlib import Path

import grpc

from splitwise.security.peers import bearer_metadata
from splitwise.security.tls import ClusterTLS, make_cluster_certs, secure_channel

API_KEY = "test-api-" + secrets.token_hex(8)
ADMIN_KEY = "test-admin-" + secrets.token_hex(8)


@functools.cache
def tls_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="splitwise-test-tls-"))
    make_cluster_certs(directory)
    return directory


def identity(role: str = "scheduler") -> ClusterTLS:
    return ClusterTLS.load(tls_dir(), role)


def peer_channel(address: str, role: str = "scheduler", **kwargs) -> grpc.aio.Channel:
    """A channel to an internal service as a cluster peer of this role would open it (mTLS)."""
    return secure_channel(address, identity(role), **kwargs)


def bearer(key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    return bearer_metadata(key)


def _with_key(details, key: str):
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *bearer_metadata(key))
    return details._replace(metadata=metadata)


# Two classes: a grpc.aio channel files an interceptor under the first call kind it implements only.
class _UnaryWithKey(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: str):
        self.key = key

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_key(details, self.key), request)


class _StreamWithKey(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: str):
        self.key = key

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_key(details, self.key), request)


def public_channel(address: str, key: str = ADMIN_KEY) -> grpc.aio.Channel:
    """A plain channel to the scheduler's public port whose calls carry 'authorization: Bearer KEY', as any gRPC
    client of the public API would send it (the admin key works for every call)."""
    return grpc.aio.insecure_channel(address, interceptors=[_UnaryWithKey(key), _StreamWithKey(key)])


async def generate_responses(address: str, request, timeout_s: float = 60) -> list:
    """Every response of one Generate call, made as a plain gRPC client with the API key would make it."""
    from splitwise.rpc.v1 import scheduler_pb2_grpc

    async with public_channel(address, API_KEY) as channel:
        return [r async for r in scheduler_pb2_grpc.SchedulerStub(channel).Generate(request, timeout=timeout_s)]
