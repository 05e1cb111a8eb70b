"""KV belongs to the request that computed it: a stream is only continued for the client it was issued to (its
resume token, bound to the request id and the exact prompt), and kept KV computed from other tokens than a
request's is recomputed, never reused, even under that request's id."""

import asyncio

import grpc
import pytest

from splitwise.client import build_request
from splitwise.security.resume import resume_token
from tests.integration.cluster import assert_no_kv_held, local_cluster, wait_for_workers
from tests.reference import hf_greedy
from tests.security import generate_responses
from tests.traces import SCHEDULER_GENERATE, request_trace

MAX_TOKENS = 16
PROMPT_A = [5, 6, 7, 8, 9, 10, 11, 12]
PROMPT_B = [40, 41, 42, 43, 44, 45, 46, 47]  # another prompt of the same length
CUT_AFTER = 5  # output tokens the client had when its stream broke


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


def request(rid: str, prompt: list[int], continue_after: list[int] = (), token: str = ""):
    built = build_request(token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True, request_id=rid)
    built.continue_after_token_ids[:] = continue_after
    built.resume_token = token
    return built


async def streamed_and_kept(cluster, rid: str, prompt: list[int]) -> tuple[list[int], str]:
    """A whole stream's tokens and resume token, once the prompt KV it kept is in the kv_store's index."""
    responses = await generate_responses(cluster.address, request(rid, prompt))
    assert responses[0].resume_token and not any(r.resume_token for r in responses[1:])
    dispatcher = cluster.scheduler.servicer.dispatcher
    for _ in range(100):
        if await dispatcher.kept_copy(rid) == rid:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the prompt KV of {rid} was not kept")
    return [t for r in responses for t in r.token_ids], responses[0].resume_token


@pytest.fixture(scope="module")
async def stream_a(cluster):
    return await streamed_and_kept(cluster, "binding-a", PROMPT_A)


def root_events(trace_file, rid: str, name: str) -> list[dict]:
    roots = [s for s in request_trace([trace_file], rid) if (s["name"], s["kind"]) == SCHEDULER_GENERATE]
    return [e["attributes"] for root in roots for e in root["events"] if e["name"] == name]


async def assert_permission_denied(cluster, continuation) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate_responses(cluster.address, continuation)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "resume_token" in error.value.details()
    await assert_no_kv_held(cluster)


async def test_another_prompt_under_a_known_request_id_without_its_resume_token_is_refused(cluster, stream_a):
    tokens_a, _ = stream_a
    _, token_of_another_stream = await streamed_and_kept(cluster, "binding-other", PROMPT_B)
    for token in ("", token_of_another_stream, "not-a-token"):
        await assert_permission_denied(cluster, request("binding-a", PROMPT_B, tokens_a[:CUT_AFTER], token))


async def test_a_resume_token_does_not_continue_its_request_id_with_another_prompt(cluster, stream_a):
    tokens_a, token_a = stream_a
    await assert_permission_denied(cluster, request("binding-a", PROMPT_B, tokens_a[:CUT_AFTER], token_a))


async def test_a_resume_token_does_not_continue_another_request_id_with_its_prompt(cluster, stream_a):
    tokens_a, token_a = stream_a
    await assert_permission_denied(cluster, request("binding-not-a", PROMPT_A, tokens_a[:CUT_AFTER], token_a))


async def test_a_continuation_with_its_resume_token_yields_the_identical_output(cluster, stream_a, tiny_folder,
                                                                                trace_file):
    tokens_a, token_a = stream_a
    assert tokens_a == hf_greedy(tiny_folder, PROMPT_A, MAX_TOKENS)
    rest = await generate_responses(cluster.address, request("binding-a", PROMPT_A, tokens_a[:CUT_AFTER], token_a))
    assert [t for r in rest for t in r.token_ids] == tokens_a[CUT_AFTER:]
    assert rest[0].resume_token == token_a  # a continuation can be continued again
    await asyncio.sleep(0.2)  # the root span is exported as its call ends
    assert [e["kv"] for e in root_events(trace_file, "binding-a", "continue")] == ["kv_store"]
    assert not root_events(trace_file, "binding-a", "kv_fallback")  # the kept KV was this prompt's: reused
    await assert_no_kv_held(cluster)


async def test_kept_kv_of_other_tokens_under_the_request_id_is_recomputed_never_reused(cluster, tiny_folder,
                                                                                       trace_file):
    # The id was used before for another prompt of the same length, whose KV the kv_store still keeps under it.
    await streamed_and_kept(cluster, "binding-reused", PROMPT_A)
    reference_b = hf_greedy(tiny_folder, PROMPT_B, MAX_TOKENS)
    token_b = resume_token(cluster.scheduler.servicer.cluster_key, "binding-reused", PROMPT_B)  # as B's stream got
    rest = await generate_responses(cluster.address, request("binding-reused", PROMPT_B, reference_b[:CUT_AFTER], token_b))
    assert [t for r in rest for t in r.token_ids] == reference_b[CUT_AFTER:]
    await asyncio.sleep(0.2)
    [fallback] = root_events(trace_file, "binding-reused", "kv_fallback")
    assert "other tokens" in fallback["reason"], fallback
    await assert_no_kv_held(cluster)
