"""Property-based fuzzing of the public API: any GenerateRequest, however hostile, ends in time with a documented
status, and leaves the requests beside it and the cluster's KV as they were."""

import asyncio
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitwise.client import SplitwiseClient
from splitwise.rpc.v1 import common_pb2, scheduler_pb2
from tests.integration.cluster import assert_no_kv_held, local_cluster, wait_for_workers

# What the README documents a client may get. UNKNOWN, INTERNAL (a bug) and anything else fail the test.
# ALREADY_EXISTS: hypothesis repeats a request id (replaying an example) while the scheduler still ends the call
# that its deadline cut.
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.ALREADY_EXISTS}
CALL_TIMEOUT_S = 10.0
ENDS_WITHIN_S = CALL_TIMEOUT_S + 5.0  # the deadline, and time for the call to say so
VOCAB = 259  # the tiny model's

int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
float32 = st.floats(width=32)  # NaN, infinities, subnormals and signed zeros included
# Any text protobuf can carry (UTF-8: no lone surrogates): controls, combining marks, right-to-left, emoji, NUL.
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
long_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=200, max_size=5000)
token_id = st.one_of(st.integers(0, VOCAB - 1), int32)
valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)

# Each field: what an ordinary client sends, and what a hostile one may. A request has a few hostile fields (none,
# once shrunk), so that it gets past the checks of the others.
FIELDS = {
    "request_id": (st.one_of(st.just(""), st.uuids().map(str)), st.one_of(text, long_text)),
    "model": (st.sampled_from(["", "tiny-llama"]), text),
    "max_tokens": (st.integers(0, 24), st.one_of(int32, st.integers(900, 1100))),
    "temperature": (st.one_of(st.just(0.0), st.floats(0.0, 2.0, width=32)),
                    st.one_of(st.sampled_from([1e-40, 1e-30, 1e-5, 3.4e38]), float32)),
    "top_p": (st.floats(0.0, 1.0, width=32), st.one_of(st.sampled_from([1e-30, 1e-45]), float32)),
    "top_k": (st.integers(0, 50), int32),
    "seed": (st.one_of(st.none(), st.integers(0, 1000)), int64),
    "top_logprobs": (st.integers(0, 20), int32),
    "stop": (st.lists(st.text("abc .\n", min_size=1, max_size=3), max_size=2),
             st.lists(st.one_of(text, long_text), max_size=20)),
    "continue_after_token_ids": (st.just([]), st.lists(token_id, min_size=1, max_size=30)),
    "resume_token": (st.just(""), text),
    "input": (st.tuples(st.just("token_ids"), valid_ids),
              st.one_of(st.tuples(st.just("prompt"), st.one_of(text, long_text)),
                        st.tuples(st.just("chat"), st.lists(st.tuples(
                            st.one_of(st.sampled_from(["system", "user", "assistant"]), text),
                            st.one_of(text, long_text)), max_size=5)),
                        st.tuples(st.just("token_ids"), st.one_of(st.lists(token_id, max_size=40),
                                                                  st.lists(st.integers(0, VOCAB - 1), min_size=900,
                                                                           max_size=1100))),
                        st.tuples(st.just("none"), st.none()))),
}


@st.composite
def generate_requests(draw) -> scheduler_pb2.GenerateRequest:
    hostile = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3))
    v = {name: draw(FIELDS[name][name in hostile]) for name in FIELDS}
    sampling = common_pb2.SamplingParams(max_tokens=v["max_tokens"], temperature=v["temperature"], top_p=v["top_p"],
                                         top_k=v["top_k"], stop=v["stop"], ignore_eos=draw(st.booleans()),
                                         top_logprobs=v["top_logprobs"])
    # An ordinary client asking for top_logprobs asks for logprobs too (a hostile one may not).
    sampling.logprobs = draw(st.booleans()) or (v["top_logprobs"] > 0 and "top_logprobs" not in hostile)
    if v["seed"] is not None:
        sampling.seed = v["seed"]
    request = scheduler_pb2.GenerateRequest(request_id=v["request_id"], model=v["model"], sampling=sampling,
                                            continue_after_token_ids=v["continue_after_token_ids"],
                                            resume_token=v["resume_token"])
    kind, value = v["input"]
    if kind == "prompt":
        request.prompt = value
    elif kind == "chat":
        request.chat.messages.extend(scheduler_pb2.ChatMessage(role=r, content=c) for r, c in value)
    elif kind == "token_ids":
        request.token_ids.ids.extend(value)
    return request


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


async def generate(client: SplitwiseClient, request: scheduler_pb2.GenerateRequest) -> grpc.StatusCode:
    """The public API as any gRPC client calls it, over the client's channel (its TLS, its key)."""
    call = client.stubs[0].Generate(request, timeout=CALL_TIMEOUT_S, metadata=client.api_metadata)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


ORDINARY_PROMPT = [3 + (11 * i) % 250 for i in range(20)]


async def ordinary(client: SplitwiseClient) -> list[int]:
    out = await client.generate(token_ids=ORDINARY_PROMPT, max_tokens=32, ignore_eos=True, timeout=60)
    return out.token_ids


async def test_hostile_requests_get_documented_statuses_in_time_and_leave_the_cluster_as_it_was(cluster):
    loop = asyncio.get_running_loop()
    outcomes: list[tuple[grpc.StatusCode, scheduler_pb2.GenerateRequest]] = []
    async with SplitwiseClient(cluster.address) as client:
        reference = await ordinary(client)
        fuzzing = True
        beside: list[list[int]] = []

        async def keep_an_ordinary_request_running():
            while fuzzing:
                beside.append(await ordinary(client))

        background = asyncio.create_task(keep_an_ordinary_request_running())

        # Hypothesis runs synchronously: in a thread, sending each request to the cluster on this event loop.
        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(generate_requests())
        def any_request_ends_in_time_with_a_documented_status(request):
            started = time.monotonic()
            code = asyncio.run_coroutine_threadsafe(generate(client, request), loop).result(ENDS_WITHIN_S)
            assert time.monotonic() - started < ENDS_WITHIN_S
            outcomes.append((code, request))
            assert code in DOCUMENTED, f"{code} for {request}"

        try:
            await asyncio.to_thread(any_request_ends_in_time_with_a_documented_status)
        finally:
            fuzzing = False
            await background
    assert beside and all(out == reference for out in beside)
    codes = {code for code, _ in outcomes}
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= codes  # both refused and served requests
    await assert_no_kv_held(cluster, within_s=5.0)
