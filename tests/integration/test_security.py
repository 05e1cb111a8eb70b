"""Only cluster peers reach internal services (mTLS, each method for its roles); the public API takes its keys."""

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kv_store import app as kv_store_app
from services.scheduler import app as scheduler_app
from splitwise.client import SplitwiseClient
from splitwise.config import KVStoreConfig, SchedulerConfig
from splitwise.rpc.calls import CallsSession
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from splitwise.rpc.v1 import worker_pb2, worker_pb2_grpc
from splitwise.security.tls import make_cluster_certs, secure_channel, ClusterTLS
from tests import security
from tests.integration.cluster import assert_no_kv_held, local_cluster, wait_for_workers


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


@pytest.fixture(scope="module")
def foreign_identity(tmp_path_factory) -> ClusterTLS:
    """A certificate of the right role, from another cluster's CA."""
    directory = tmp_path_factory.mktemp("other-cluster")
    make_cluster_certs(directory)
    return ClusterTLS.load(directory, "scheduler")


def decode_request(rid: str) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=rid, num_prompt_tokens=3, prompt_token_ids=[5, 6, 7],
                                    sampling=common_pb2.SamplingParams(max_tokens=4))


async def first_decode_event(channel, rid: str):
    call = worker_pb2_grpc.TokenWorkerStub(channel).Decode(decode_request(rid), timeout=5)
    try:
        return await call.read()
    finally:
        call.cancel()


async def test_a_plaintext_client_cannot_reserve_kv_on_a_token_worker(cluster):
    async with grpc.aio.insecure_channel(cluster.token_worker.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await first_decode_event(channel, "anonymous")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS handshake, no call
    await assert_no_kv_held(cluster)


async def test_a_tls_client_without_a_cluster_certificate_is_refused(cluster, foreign_identity):
    ca_only = grpc.ssl_channel_credentials(security.identity().ca)
    async with grpc.aio.secure_channel(cluster.prompt_worker.address, ca_only,
                                       options=security.identity().channel_options()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    async with secure_channel(cluster.prompt_worker.address, foreign_identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_only_the_scheduler_may_reserve_kv_or_start_a_prefill(cluster):
    for role in ("prompt_worker", "kv_store", "admin"):
        async with security.peer_channel(cluster.token_worker.address, role) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await first_decode_event(channel, f"as-{role}")
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, role
            assert "Decode is not for " + role in error.value.details()
            prefill = worker_pb2_grpc.PromptWorkerStub(channel).Prefill(
                worker_pb2.PrefillRequest(request_id=f"prefill-as-{role}"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await prefill.read()
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, role
            # The one stream that carries the scheduler's Prefill and Decode calls is the scheduler's alone too.
            calls = worker_pb2_grpc.WorkerCallsStub(channel).Calls(timeout=5)
            await calls.write(worker_pb2.CallsIn(frames=[worker_pb2.CallIn(
                call=1, start=worker_pb2.CallStart(decode=decode_request(f"calls-as-{role}")))]))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await calls.read()
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, role
            assert "Calls is not for " + role in error.value.details()
    async with security.peer_channel(cluster.token_worker.address, "scheduler") as channel:
        assert (await first_decode_event(channel, "as-scheduler")).WhichOneof("kind") == "reserved"
        session = CallsSession(channel)
        call = session.start("decode", decode_request("calls-as-scheduler"), timeout=5)
        assert (await call.read()).WhichOneof("kind") == "reserved"
        call.cancel()
        await session.close()
    await assert_no_kv_held(cluster)


async def test_the_operator_identity_may_only_check_health(cluster):
    async with security.peer_channel(cluster.kv_store.address, "admin") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await kv_store_pb2_grpc.KVStoreStub(channel).Delete(kv_store_pb2.DeleteRequest(request_id="x"), timeout=5)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_kv_store_serves_no_anonymous_get_put_or_delete(cluster):
    async with grpc.aio.insecure_channel(cluster.kv_store.address) as channel:
        stub = kv_store_pb2_grpc.KVStoreStub(channel)
        for call in (lambda: stub.Delete(kv_store_pb2.DeleteRequest(request_id="x"), timeout=5),
                     lambda: stub.Get(kv_store_pb2.GetRequest(request_id="x"), timeout=5).read(),
                     lambda: stub.Put(iter([common_pb2.KVTransferMessage(
                         header=common_pb2.KVHeader(request_id="x", num_tokens=1))]), timeout=5)):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def generate_status(address: str, metadata) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(
            scheduler_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2)),
            timeout=30, metadata=metadata)
        try:
            async for _ in call:
                pass
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


async def test_generate_needs_the_api_key(cluster):
    assert await generate_status(cluster.address, ()) == grpc.StatusCode.UNAUTHENTICATED
    assert await generate_status(cluster.address, security.bearer("wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert await generate_status(cluster.address, (("authorization", security.API_KEY),)) == \
        grpc.StatusCode.UNAUTHENTICATED  # not a bearer token
    assert await generate_status(cluster.address, security.bearer(security.API_KEY)) == grpc.StatusCode.OK
    async with SplitwiseClient(cluster.address, api_key="wrong") as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.generate(prompt="hi", max_tokens=2, timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in error.value.details()


async def test_cluster_status_needs_the_admin_key(cluster):
    async with SplitwiseClient(cluster.address, admin_key="") as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.cluster_status()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with SplitwiseClient(cluster.address, admin_key=security.API_KEY) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.cluster_status()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with SplitwiseClient(cluster.address, admin_key=security.ADMIN_KEY) as client:
        assert len((await client.cluster_status()).workers) == 2


async def test_health_of_the_public_port_is_open(cluster):
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def scheduler_config(redis_url, cache_dir, **overrides) -> SchedulerConfig:
    return SchedulerConfig(**{"listen": "127.0.0.1:0", "model": "tiny-llama", "cache_dir": str(cache_dir),
                              "redis_url": redis_url, "metrics_listen": "off", "tls_dir": str(security.tls_dir()),
                              **overrides})


async def test_a_scheduler_open_to_other_hosts_without_a_key_is_refused_unless_insecure(redis_url, cache_dir):
    with pytest.raises(ValueError, match="no API key"):
        await scheduler_app.start(scheduler_config(redis_url, cache_dir, listen="0.0.0.0:0"))
    scheduler = await scheduler_app.start(scheduler_config(redis_url, cache_dir, listen="0.0.0.0:0", insecure=True))
    await scheduler.stop(0)
    scheduler = await scheduler_app.start(scheduler_config(redis_url, cache_dir, listen="0.0.0.0:0", api_key="k"))
    await scheduler.stop(0)


async def test_a_service_without_cluster_tls_refuses_to_start(redis_url):
    with pytest.raises(ValueError, match="--tls-dir"):
        await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=redis_url))


async def test_a_scheduler_without_an_admin_key_keeps_cluster_status_closed(redis_url, cache_dir):
    scheduler = await scheduler_app.start(scheduler_config(redis_url, cache_dir))
    try:
        async with SplitwiseClient(scheduler.address, admin_key="") as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.cluster_status()
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "SPLITWISE_ADMIN_KEY" in error.value.details()
    finally:
        await scheduler.stop(0)


async def test_the_public_api_over_tls_verifies_with_the_cluster_ca(redis_url, cache_dir):
    scheduler = await scheduler_app.start(scheduler_config(redis_url, cache_dir, public_tls=True, admin_key="adm"))
    port = scheduler.address.rsplit(":", 1)[1]
    try:
        async with SplitwiseClient(f"localhost:{port}", admin_key="adm",
                                   tls_ca=str(security.tls_dir() / "ca.pem")) as client:
            await client.cluster_status()
        async with SplitwiseClient(f"localhost:{port}", admin_key="adm", tls_ca="") as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.cluster_status()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await scheduler.stop(0)


def test_redis_refuses_clients_without_its_password(redis_url):
    anonymous = redis.Redis.from_url(redis_url.replace(redis_url.split("@")[0] + "@", "redis://"))
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        anonymous.set("splitwise:worker:fake", "{}")
    assert redis.Redis.from_url(redis_url).ping()


async def test_a_prompt_worker_pushes_kv_only_to_registered_workers(cluster):
    """Even a scheduler identity cannot make a prompt worker connect to a host:port of its choosing."""
    async with security.peer_channel(cluster.prompt_worker.address, "scheduler") as channel:
        prefill = worker_pb2_grpc.PromptWorkerStub(channel).Prefill(worker_pb2.PrefillRequest(
            request_id="forged-target", prompt_token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=2),
            kv_target=worker_pb2.KVTarget(address="127.0.0.1:9", kind=worker_pb2.KVTarget.KIND_TOKEN_WORKER)), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await prefill.read()
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a registered worker" in error.value.details()
    await assert_no_kv_held(cluster)
    async with SplitwiseClient(cluster.address) as client:  # the registered token worker still gets its KV
        assert len((await client.generate(prompt="still fine", max_tokens=3, ignore_eos=True, timeout=60)).token_ids) == 3
