"""The kv_store and its KV index in a real Redis: what is stored is indexed, expires on time, and is found elsewhere."""

import asyncio
import random
import time
from collections import Counter

import grpc
import pytest
import redis.asyncio as redis

from services.kv_store import app as kv_store_app
from splitwise.client import SplitwiseClient
from splitwise.cluster.redis_server import start_redis
from splitwise.cluster.kv_index import KVIndex
from splitwise.config import KVStoreConfig
from splitwise.model.weights import load_tokenizer
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from tests.security import peer_channel, tls_dir
from tests.conftest import free_port
from tests.integration.cluster import local_cluster, wait_for_workers
from tests.reference import hf_greedy

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def prompt_ids(tiny_folder):
    return load_tokenizer(tiny_folder).encode(PROMPT, add_special_tokens=False)


@pytest.fixture
async def kv_index(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield KVIndex(client)
    await client.aclose()


@pytest.fixture
async def kv_store(redis_url):
    store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=redis_url, tls_dir=str(tls_dir())))
    yield store
    await store.stop(grace_s=1.0)


@pytest.fixture
async def kv_store_stub(kv_store):
    async with peer_channel(kv_store.address, "prompt_worker") as channel:
        yield kv_store_pb2_grpc.KVStoreStub(channel)


async def generate_relayed(cluster, token_ids: list[int], max_tokens: int = 8) -> list[int]:
    await wait_for_workers(cluster)
    async with SplitwiseClient(cluster.address) as c:
        return (await c.generate(token_ids=token_ids, max_tokens=max_tokens, timeout=60)).token_ids


KV_HASH = "kv-hash-of-the-test-prompt"


def transfer(rid: str, num_chunks: int = 2, chunk_bytes: int = 64, kv_hash: str = KV_HASH,
             fingerprint: str = "") -> list[common_pb2.KVTransferMessage]:
    """A whole KV transfer as a prompt worker sends it: header, chunks of K and V, commit."""
    header = common_pb2.KVHeader(request_id=rid, num_tokens=1, transport="grpc", kv_hash=kv_hash,
                                 layout=common_pb2.KVLayout(model_fingerprint=fingerprint))
    chunks = [common_pb2.KVChunk(layer=i, token_count=1, key=b"k" * chunk_bytes, value=b"v" * chunk_bytes)
              for i in range(num_chunks)]
    commit = common_pb2.KVCommit(num_chunks=num_chunks, num_bytes=2 * chunk_bytes * num_chunks)
    return [common_pb2.KVTransferMessage(header=header), *(common_pb2.KVTransferMessage(chunk=c) for c in chunks),
            common_pb2.KVTransferMessage(commit=commit)]


async def test_relayed_kv_is_indexed_with_its_holder_size_and_ttl(redis_url, cache_dir, prompt_ids, kv_index):
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_transfer="relay") as cluster:
        await generate_relayed(cluster, prompt_ids)
        store = cluster.kv_store
        [(rid, stored)] = store.servicer.transfers.items()
        assert stored.complete and stored.num_bytes > 0
        entry = await kv_index.lookup(rid)
        assert entry is not None
        assert (entry.holder, entry.num_bytes) == (store.address, stored.num_bytes)
        ttl_s = store.servicer.ttl_s
        assert ttl_s - 10 < await kv_index.client.pttl(kv_index.prefix + rid) / 1000 <= ttl_s
        assert abs(entry.expires_at - (time.time() + ttl_s)) < 10


async def test_expired_kv_leaves_the_store_and_the_index_within_a_second_of_its_ttl(redis_url, cache_dir, prompt_ids,
                                                                                    kv_index):
    ttl_s = 2.0
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_transfer="relay",
                             kv_store_overrides={"ttl_s": ttl_s}) as cluster:
        servicer = cluster.kv_store.servicer
        await generate_relayed(cluster, prompt_ids, max_tokens=4)
        committed_by = time.monotonic()
        [rid] = servicer.transfers
        assert await kv_index.lookup(rid) is not None
        while servicer.transfers and time.monotonic() < committed_by + ttl_s + 1.0:
            await asyncio.sleep(0.05)
        assert not servicer.transfers and servicer.bytes_held == 0
        assert await kv_index.lookup(rid) is None
        assert rid not in [e.key for e in await kv_index.entries()]


async def test_get_of_kv_indexed_on_another_kv_store_is_not_found_naming_that_holder(kv_store_stub, kv_index):
    await kv_index.put("held-elsewhere", "10.1.2.3:50081", KV_HASH, 4096, ttl_s=30)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(kv_store_stub, "held-elsewhere")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "10.1.2.3:50081" in caught.value.details()
    assert time.monotonic() - started < 2  # answered at once, not after waiting for an arrival


async def test_get_waits_for_kv_that_has_not_arrived_yet(kv_store_stub):
    messages = transfer("arrives-later")
    received = asyncio.create_task(_collect(kv_store_stub.Get(kv_store_pb2.GetRequest(request_id="arrives-later",
                                                                                      wait_s=10, kv_hash=KV_HASH))))
    await asyncio.sleep(0.3)
    assert not received.done()
    await kv_store_stub.Put(_stream(messages))
    assert await asyncio.wait_for(received, 10) == messages


async def test_delete_drops_the_kv_and_its_index_entry(kv_store, kv_store_stub, kv_index):
    reply = await kv_store_stub.Put(_stream(transfer("to-delete", num_chunks=3, chunk_bytes=100)))
    assert reply.num_bytes == 600
    entry = await kv_index.lookup("to-delete")
    assert (entry.holder, entry.num_bytes) == (kv_store.address, 600)
    assert (await kv_store_stub.Delete(kv_store_pb2.DeleteRequest(request_id="to-delete"))).deleted
    assert "to-delete" not in kv_store.servicer.transfers
    assert await kv_index.lookup("to-delete") is None


async def test_stopping_kv_store_removes_its_index_entries(redis_url, kv_index):
    store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=redis_url, tls_dir=str(tls_dir())))
    async with peer_channel(store.address, "prompt_worker") as channel:
        await kv_store_pb2_grpc.KVStoreStub(channel).Put(_stream(transfer("held-until-stop")))
    assert (await kv_index.lookup("held-until-stop")).holder == store.address
    await store.stop(grace_s=1.0)
    assert await kv_index.lookup("held-until-stop") is None


async def test_kv_index_remove_spares_an_entry_another_holder_took_over(kv_index):
    await kv_index.put("moved", "10.0.0.1:50081", KV_HASH, 10, ttl_s=30)
    await kv_index.put("moved", "10.0.0.2:50081", KV_HASH, 20, ttl_s=30)
    assert not await kv_index.remove("moved", "10.0.0.1:50081")
    assert (await kv_index.lookup("moved")).holder == "10.0.0.2:50081"
    assert await kv_index.remove("moved", "10.0.0.2:50081")
    assert await kv_index.lookup("moved") is None


async def test_a_kv_index_call_whose_task_is_cancelled_ends_cancelled_never_as_if_it_was_not(redis_url):
    # With a socket_timeout (as the kv_store's client has), redis-py sends through asyncio.wait_for, which before
    # Python 3.12 can return as if its caller was never cancelled (CPython gh-86296).
    client = redis.Redis.from_url(redis_url, socket_timeout=1.0)
    index = KVIndex(client)
    rng = random.Random(7)
    ended = Counter()

    async def lookup() -> str:
        await index.lookup("never-stored")
        return "cancellation lost" if asyncio.current_task().cancelling() else "completed"

    try:
        for _ in range(300):
            task = asyncio.create_task(lookup())
            for _ in range(rng.randint(1, 8)):
                await asyncio.sleep(0)
            task.cancel()
            try:
                ended[await task] += 1
            except asyncio.CancelledError:
                ended["cancelled"] += 1
    finally:
        await client.aclose()
    assert ended["cancellation lost"] == 0 and ended["cancelled"] > 0, ended


async def test_relay_gives_the_same_output_when_redis_is_unreachable_for_the_index(redis_url, cache_dir, prompt_ids,
                                                                                   tiny_folder):
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_transfer="relay",
                             kv_store_overrides={"redis_url": unreachable}) as cluster:
        assert await generate_relayed(cluster, prompt_ids, max_tokens=16) == hf_greedy(tiny_folder, prompt_ids, 16)
        [stored] = cluster.kv_store.servicer.transfers.values()
        assert stored.complete  # still held and served locally


async def _stream(messages):
    for message in messages:
        yield message


async def _collect(call) -> list:
    return [message async for message in call]


async def test_after_redis_restarts_empty_the_kv_store_indexes_what_it_holds_again():
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = start_redis(port)
    store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=url, tls_dir=str(tls_dir()),
                                                   ttl_s=60))
    index = KVIndex(redis.Redis.from_url(url))
    try:
        async with peer_channel(store.address, "prompt_worker") as channel:
            await kv_store_pb2_grpc.KVStoreStub(channel).Put(_stream(transfer("kept-across-restart")))
        assert (await index.lookup("kept-across-restart")).holder == store.address
        await asyncio.sleep(2 * store.servicer.expiry_interval_s)  # the kv_store has seen this Redis's run id
        redis_proc.kill()
        redis_proc.wait(10)
        redis_proc = start_redis(port)  # empty: no persistence

        async def lookup():
            try:
                return await index.lookup("kept-across-restart")
            except redis.ConnectionError:  # the first call after the restart finds its connection closed
                return await index.lookup("kept-across-restart")

        entry = await lookup()
        for _ in range(60):
            if entry is not None:
                break
            await asyncio.sleep(0.05)
            entry = await lookup()
        assert entry is not None and entry.holder == store.address, "not indexed again within 3 s"
        assert 0 < await index.client.pttl(index.prefix + "kept-across-restart") <= 60_000
    finally:
        await index.client.aclose()
        await store.stop(grace_s=1.0)
        redis_proc.terminate()
        redis_proc.wait(10)


def get(stub, rid: str, kv_hash: str = KV_HASH, wait_s: float = 5.0):
    return _collect(stub.Get(kv_store_pb2.GetRequest(request_id=rid, wait_s=wait_s, kv_hash=kv_hash)))


async def test_get_is_never_served_kv_of_other_tokens_stored_under_its_request_id(kv_store_stub):
    await kv_store_stub.Put(_stream(transfer("one-id", kv_hash="kv-of-prompt-a")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(kv_store_stub, "one-id", kv_hash="kv-of-prompt-b", wait_s=0.5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "other tokens" in caught.value.details()
    assert await get(kv_store_stub, "one-id", kv_hash="kv-of-prompt-a") == transfer("one-id", kv_hash="kv-of-prompt-a")


async def test_a_put_of_other_tokens_under_a_used_request_id_replaces_the_earlier_kv(kv_store, kv_store_stub, kv_index):
    await kv_store_stub.Put(_stream(transfer("used-again", kv_hash="kv-of-prompt-a")))
    await kv_store_stub.Put(_stream(transfer("used-again", kv_hash="kv-of-prompt-b", chunk_bytes=32)))
    assert await get(kv_store_stub, "used-again", kv_hash="kv-of-prompt-b") == transfer(
        "used-again", kv_hash="kv-of-prompt-b", chunk_bytes=32)
    assert (await kv_index.lookup("used-again")).kv_hash == "kv-of-prompt-b"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(kv_store_stub, "used-again", kv_hash="kv-of-prompt-a", wait_s=0.3)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert kv_store.servicer.bytes_held == sum(m.ByteSize() for m in transfer("used-again", kv_hash="kv-of-prompt-b",
                                                                              chunk_bytes=32))


async def test_a_get_without_a_kv_hash_is_invalid_argument(kv_store_stub):
    await kv_store_stub.Put(_stream(transfer("hashless-get")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(kv_store_stub, "hashless-get", kv_hash="")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_8_mib_header_is_refused_before_it_is_stored(kv_store, kv_store_stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv_store_stub.Put(_stream(transfer("huge-header", fingerprint="f" * (8 << 20))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV header of" in caught.value.details()
    assert "huge-header" not in kv_store.servicer.transfers and kv_store.servicer.bytes_held == 0


async def test_headers_count_against_max_bytes(redis_url):
    header_heavy = transfer("first", chunk_bytes=1, fingerprint="f" * 6000)
    size = sum(m.ByteSize() for m in header_heavy)
    store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=redis_url,
                                                   tls_dir=str(tls_dir()), max_bytes=size + 1000))
    try:
        async with peer_channel(store.address, "prompt_worker") as channel:
            stub = kv_store_pb2_grpc.KVStoreStub(channel)
            await stub.Put(_stream(header_heavy))
            assert store.servicer.bytes_held == size
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Put(_stream(transfer("second", chunk_bytes=1, fingerprint="f" * 6000)))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "second" not in store.servicer.transfers or store.servicer.transfers["second"].failed
            assert store.servicer.bytes_held <= size + len("second")
    finally:
        await store.stop(grace_s=1.0)


async def _stalling(messages, stop: asyncio.Event, every_s: float = 0.0):
    """The messages (every_s apart), then nothing until stop is set: a prompt worker hung mid-transfer."""
    for message in messages:
        yield message
        await asyncio.sleep(every_s)
    await stop.wait()


@pytest.fixture
async def impatient_kv_store_stub(redis_url):
    """A kv_store that drops a Put after half a second without progress, and a stub to it."""
    store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=redis_url,
                                                   tls_dir=str(tls_dir()), kv_progress_timeout_s=0.5))
    async with peer_channel(store.address, "prompt_worker") as channel:
        yield store, kv_store_pb2_grpc.KVStoreStub(channel)
    await store.stop(grace_s=1.0)


async def test_a_stalled_put_is_dropped_its_bytes_released_and_its_waiting_get_fails(impatient_kv_store_stub):
    kv_store, kv_store_stub = impatient_kv_store_stub
    servicer = kv_store.servicer
    stop = asyncio.Event()
    put = asyncio.ensure_future(kv_store_stub.Put(_stalling(transfer("stalls", num_chunks=4)[:3], stop)))
    while "stalls" not in servicer.transfers or servicer.transfers["stalls"].num_chunks < 2:
        await asyncio.sleep(0.02)
    assert servicer.bytes_held > 128
    waiting_get = asyncio.ensure_future(get(kv_store_stub, "stalls", wait_s=30))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as put_error:
            await asyncio.wait_for(put, 10)
        assert put_error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stalled" in put_error.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as get_error:
            await asyncio.wait_for(waiting_get, 10)
        assert get_error.value.code() == grpc.StatusCode.UNAVAILABLE and "stalled" in get_error.value.details()
        # Only its id is left, until the TTL, so that a later Get learns of the failure at once.
        assert servicer.transfers["stalls"].messages == [] and servicer.bytes_held == len("stalls")
    finally:
        stop.set()
        waiting_get.cancel()


async def test_a_put_that_never_sends_its_header_is_ended_at_the_progress_timeout(impatient_kv_store_stub):
    kv_store, kv_store_stub = impatient_kv_store_stub
    stop = asyncio.Event()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(kv_store_stub.Put(_stalling([], stop)), 10)
    stop.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no KV header" in caught.value.details()


async def test_a_put_that_does_not_commit_within_the_ttl_is_dropped(redis_url):
    store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0", metrics_listen="off", redis_url=redis_url,
                                                   tls_dir=str(tls_dir()), ttl_s=1.0))
    stop = asyncio.Event()
    try:
        async with peer_channel(store.address, "prompt_worker") as channel:
            slow = _stalling(transfer("never-commits", num_chunks=40)[:-1], stop, every_s=0.1)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(kv_store_pb2_grpc.KVStoreStub(channel).Put(slow), 10)
            code, details = caught.value.code(), caught.value.details()
            # grpcio can keep the server's status from a client whose write the abort cut (seen on a loaded CI
            # machine): the call then fails "Internal error from Core". The kv_store's decision shows all the same:
            # the call ends within the TTL and the bytes are released.
            hidden = code == grpc.StatusCode.INTERNAL and details == "Internal error from Core"
            assert hidden or (code == grpc.StatusCode.DEADLINE_EXCEEDED and "TTL" in details), (code, details)
            assert time.monotonic() - started < 2.5
            assert store.servicer.bytes_held <= len("never-commits")
    finally:
        stop.set()
        await store.stop(grace_s=1.0)
