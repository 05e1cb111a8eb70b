"""The scheduler's front door: sizes are checked from bytes before tokenizing, tokenization runs off the event loop,
stop strings are bounded in number and length, and the view of the workers survives bad registry entries and says
when it is stale."""

import asyncio
import json
import threading
import urllib.request
from dataclasses import asdict

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler.cluster_view import STALE_AFTER_INTERVALS
from services.scheduler.validation import MAX_INPUT_BYTES, MAX_MESSAGE_BYTES, NORMALIZER_SHRINK
from services.token_worker import app as token_app
from splitwise.client import SplitwiseClient
from splitwise.engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS
from splitwise.cluster.pools import MEMBERSHIP_KEY
from splitwise.cluster.registry import KEY_PREFIX, signed_entry
from splitwise.config import TokenWorkerConfig
from splitwise.engine.sampling import MAX_TOP_LOGPROBS
from splitwise.security.keys import load_cluster_key
from tests import security
from tests.integration.cluster import METRICS_LISTEN, assert_no_kv_held, local_cluster, wait_for_workers

HUGE_PROMPT = "x" * (4 << 20)
REFRESH_S = 0.05


@pytest.fixture(scope="module")
def isolated_redis_url(redis_url):
    return redis_url.rsplit("/", 1)[0] + "/11"  # a registry and pools of its own: the tests write bad entries


@pytest.fixture(scope="module")
async def cluster(isolated_redis_url, cache_dir, trace_file, meter_provider):
    async with local_cluster(isolated_redis_url, "tiny-llama", cache_dir,
                             scheduler_overrides={"registry_refresh_s": REFRESH_S}) as c:
        await wait_for_workers(c)
        yield c


@pytest.fixture(scope="module")
async def client(cluster):
    async with SplitwiseClient(cluster.address, continue_streams=False) as c:
        yield c


@pytest.fixture
def tokenizer_calls(cluster, monkeypatch):
    """The scheduler's own tokenizer, recording the thread of each call."""
    tokenizer = cluster.scheduler.servicer.model.tokenizer
    threads = []
    for name in ("encode", "apply_chat_template"):
        real = getattr(tokenizer, name)

        def recorded(*args, _real=real, **kwargs):
            threads.append(threading.get_ident())
            return _real(*args, **kwargs)

        monkeypatch.setattr(tokenizer, name, recorded)
    return threads


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_a_4_mib_prompt_or_chat_is_refused_from_its_bytes_without_being_tokenized(client, tokenizer_calls):
    prompt = await refused(client.generate(prompt=HUGE_PROMPT, max_tokens=4, timeout=60))
    chat = await refused(client.generate(messages=[{"role": "user", "content": HUGE_PROMPT}], max_tokens=4, timeout=60))
    for error in (prompt, chat):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_INPUT_BYTES} bytes" in error.details()
    assert tokenizer_calls == []


async def test_a_prompt_too_long_for_the_context_window_is_refused_from_its_bytes_without_being_tokenized(
        cluster, client, tokenizer_calls):
    model = cluster.scheduler.servicer.model
    too_long = "x" * (model.max_context_tokens * model.max_token_bytes * NORMALIZER_SHRINK + 1)
    assert len(too_long) < MAX_INPUT_BYTES
    error = await refused(client.generate(prompt=too_long, max_tokens=4, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context window is {model.max_context_tokens} tokens" in error.details()
    assert tokenizer_calls == []


async def test_a_request_over_the_public_message_limit_is_refused_by_grpc_itself(client, tokenizer_calls):
    error = await refused(client.generate(prompt="x" * (MAX_MESSAGE_BYTES + 1), max_tokens=4, timeout=60))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert tokenizer_calls == []


async def test_a_prompt_is_tokenized_off_the_event_loop_while_other_calls_are_served(cluster, client, monkeypatch):
    tokenizer = cluster.scheduler.servicer.model.tokenizer
    real_encode = tokenizer.encode
    tokenizing, status_served = threading.Event(), threading.Event()
    served_meanwhile = []

    def encode(*args, **kwargs):  # holds its thread until ClusterStatus has been answered (or 10 s have passed)
        tokenizing.set()
        served_meanwhile.append(status_served.wait(10))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    generation = asyncio.ensure_future(client.generate(prompt="Hello there", max_tokens=4, timeout=60))
    assert await asyncio.to_thread(tokenizing.wait, 10)
    status = await client.cluster_status()
    status_served.set()
    out = await generation
    assert len(status.workers) == 2 and out.completion_tokens == 4
    assert served_meanwhile == [True]  # on the event loop, the tokenizer would have held ClusterStatus back


async def test_too_many_or_too_long_stop_strings_are_refused_saying_the_limit(client):
    many = await refused(client.generate(prompt="Hello", stop=[f"s{i}" for i in range(200_000)], timeout=60))
    long = await refused(client.generate(prompt="Hello", stop=["y" * 100_000], timeout=60))
    assert many.code() == long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_STOP_STRINGS} stop strings" in many.details()
    assert f"at most {MAX_STOP_CHARS} characters" in long.details()
    at_the_limits = [f"{i:03d}" + "y" * (MAX_STOP_CHARS - 3) for i in range(MAX_STOP_STRINGS)]
    assert (await client.generate(prompt="Hello", max_tokens=4, stop=at_the_limits, timeout=60)).completion_tokens


async def test_top_logprobs_out_of_range_or_without_logprobs_are_refused_saying_why(client):
    alone = await refused(client.generate(prompt="Hello", top_logprobs=5, timeout=60))
    too_many = await refused(client.generate(prompt="Hello", logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1,
                                             timeout=60))
    assert alone.code() == too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs logprobs" in alone.details()
    assert f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]" in too_many.details()


async def listed_workers(client) -> set[str]:
    return {w.worker_id for w in (await client.cluster_status()).workers}


async def test_bad_registry_entries_are_skipped_and_a_worker_registering_afterwards_is_seen(
        cluster, client, store, isolated_redis_url, cache_dir):
    real = asdict(cluster.token_worker.heartbeat.describe())
    cluster_key = load_cluster_key(str(security.tls_dir()))
    wrong = {"wrong-pending": {"pending_tokens": "x"}, "wrong-address": {"address": 5},
             "wrong-role": {"role": ["prompt"]}, "no-model": {"model": None}}
    entries = {"not-json": b"{not json", "half": json.dumps({"worker_id": "half", "role": "prompt"})}
    for name, change in wrong.items():
        worker = {**real, "role": "prompt", **change}
        entries[name] = json.dumps({**worker, "worker_id": name})  # as entries were written before they were signed
        entries[f"signed-{name}"] = signed_entry(cluster_key, {**worker, "worker_id": f"signed-{name}"},
                                                 real["heartbeat_at"] + 60)
    for name, entry in entries.items():
        await store.set(KEY_PREFIX + name, entry, ex=60)
    before = await listed_workers(client)
    late = await token_app.start(TokenWorkerConfig(
        listen="127.0.0.1:0", device="cpu", model="tiny-llama", cache_dir=str(cache_dir), redis_url=isolated_redis_url,
        metrics_listen=METRICS_LISTEN, worker_id="token-late", tls_dir=str(security.tls_dir())))
    try:
        for _ in range(200):  # the scheduler reads the registry every REFRESH_S
            if "token-late" in await listed_workers(client):
                break
            await asyncio.sleep(REFRESH_S)
        assert await listed_workers(client) == before | {"token-late"}
        out = await client.generate(prompt="Hello there", max_tokens=4, ignore_eos=True, timeout=60)
        assert out.completion_tokens == 4
    finally:
        await late.stop(grace_s=1.0)
        await store.delete(*(KEY_PREFIX + name for name in entries))


async def scheduler_health(cluster, process: bool = False) -> int:
    name = "" if process else cluster.scheduler.service.service_names[0]
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
    return reply.status


def refresh_age_s(cluster) -> float:
    address = cluster.scheduler.service.metrics.address
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    (age,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "splitwise_registry_refresh_age_seconds"]
    return age


async def wait_for_health(cluster, status: int) -> None:
    for _ in range(40 * STALE_AFTER_INTERVALS):
        if await scheduler_health(cluster) == status:
            return
        await asyncio.sleep(REFRESH_S)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    raise AssertionError(f"the scheduler's health did not become {name}")


async def test_a_view_that_cannot_be_refreshed_is_reported_stale_and_recovers_once_it_can(cluster, client, store):
    # The pools' membership hash overwritten by a string: every refresh reads it and Redis answers WRONGTYPE.
    membership = await store.hgetall(MEMBERSHIP_KEY)
    await store.delete(MEMBERSHIP_KEY)
    await store.set(MEMBERSHIP_KEY, "not a hash")
    try:
        await wait_for_health(cluster, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert refresh_age_s(cluster) > STALE_AFTER_INTERVALS * REFRESH_S
        assert await scheduler_health(cluster, process=True) == health_pb2.HealthCheckResponse.SERVING  # it is up
        assert len(await listed_workers(client)) == 2  # the last view still serves
        out = await client.generate(prompt="Hello there", max_tokens=4, ignore_eos=True, timeout=60)
        assert out.completion_tokens == 4
    finally:
        await store.delete(MEMBERSHIP_KEY)
        if membership:
            await store.hset(MEMBERSHIP_KEY, mapping=membership)
    await wait_for_health(cluster, health_pb2.HealthCheckResponse.SERVING)


async def test_a_request_id_already_in_flight_is_refused_and_the_first_stream_goes_on(cluster, client):
    first = client.stream(token_ids=list(range(30, 60)), request_id="twice", max_tokens=40, ignore_eos=True,
                          timeout=60)
    await anext(first)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.generate(token_ids=[5, 6, 7], request_id="twice", max_tokens=2, timeout=30)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "its own id" in refused.value.details() and "worker" not in refused.value.details()
    rest = [chunk async for chunk in first]
    assert rest[-1].completion_tokens == 40
    again = await client.generate(token_ids=[5, 6, 7], request_id="twice", max_tokens=2, timeout=30)
    assert again.completion_tokens == 2  # free again once the first has ended
    await assert_no_kv_held(cluster)
