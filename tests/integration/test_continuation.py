"""A stream continued after a break (`continue_after_token_ids`: what a client failing over between scheduler
replicas sends, with the resume token of the stream's first response) streams exactly what the unbroken stream
would have, text included, and bad continuations are refused with INVALID_ARGUMENT."""

import asyncio
import itertools

import grpc
import pytest

from splitwise.client import build_request
from splitwise.model.weights import load_tokenizer
from splitwise.security.resume import resume_token
from tests.security import generate_responses
from tests.integration.cluster import assert_no_kv_held, local_cluster, wait_for_workers
from tests.reference import hf_greedy
from tests.traces import SCHEDULER_GENERATE, request_trace

PROMPT = "Once upon a time"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


def continue_events(trace_file, request_id: str) -> list[dict]:
    roots = [s for s in request_trace([trace_file], request_id) if (s["name"], s["kind"]) == SCHEDULER_GENERATE]
    return [e["attributes"] for root in roots for e in root["events"] if e["name"] == "continue"]


async def test_a_continued_stream_yields_what_the_unbroken_stream_would_have(cluster, tiny_folder, trace_file):
    tokenizer = load_tokenizer(tiny_folder)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    request = build_request(token_ids=ids, max_tokens=MAX_TOKENS, ignore_eos=True, request_id="continued-1")
    whole = await generate_responses(cluster.address, request)
    tokens = [t for r in whole for t in r.token_ids]
    assert tokens == hf_greedy(tiny_folder, ids, MAX_TOKENS)
    text = "".join(r.text for r in whole)
    # The prompt worker's copy of the prompt KV reaches the kv_store (and its index) just after the prefill.
    dispatcher = cluster.scheduler.servicer.dispatcher
    for _ in range(100):
        if await dispatcher.kept_copy("continued-1") == "continued-1":
            break
        await asyncio.sleep(0.05)
    # Break the stream after each of its messages in turn: the continuation must yield the rest, tokens and text.
    received = list(itertools.accumulate(whole[:-1], lambda had, r: (had[0] + list(r.token_ids), had[1] + r.text),
                                         initial=([], "")))[1:]
    request.resume_token = whole[0].resume_token
    for had_tokens, had_text in received:
        request.continue_after_token_ids[:] = had_tokens
        rest = await generate_responses(cluster.address, request)
        assert [t for r in rest for t in r.token_ids] == tokens[len(had_tokens):]
        assert had_text + "".join(r.text for r in rest) == text
        assert rest[-1].finish_reason == whole[-1].finish_reason
        assert rest[-1].usage.completion_tokens == MAX_TOKENS and rest[-1].usage.prompt_tokens == len(ids)
    await assert_no_kv_held(cluster)
    # The prompt's KV kept in the kv_store by the first stream spared the continuations its prefill.
    await asyncio.sleep(0.2)  # the last root span is exported as its call ends
    events = continue_events(trace_file, "continued-1")
    assert [e["kv"] for e in events] == ["kv_store"] * len(received), events


async def test_a_continuation_without_a_kept_copy_recomputes_the_prompt(cluster, tiny_folder, trace_file):
    ids = [5, 6, 7, 8, 9, 10]
    reference = hf_greedy(tiny_folder, ids, MAX_TOKENS)
    request = build_request(token_ids=ids, max_tokens=MAX_TOKENS, ignore_eos=True, request_id="never-streamed-here")
    request.continue_after_token_ids[:] = reference[:10]
    # As its stream (on a replica with no kept copy) would have been given.
    request.resume_token = resume_token(cluster.scheduler.servicer.cluster_key, "never-streamed-here", ids)
    rest = [t for r in await generate_responses(cluster.address, request) for t in r.token_ids]
    assert rest == reference[10:]
    await asyncio.sleep(0.2)
    assert [e["kv"] for e in continue_events(trace_file, "never-streamed-here")] == ["recompute"]
    await assert_no_kv_held(cluster)


@pytest.mark.parametrize("request_id, continued, max_tokens, problem", [
    ("", [1, 2], 8, "needs the request_id"),
    ("r", [1, 10**6], 8, "continue_after_token_ids must be in"),
    ("r", [1, 2, 3], 3, "nothing is left to generate"),
])
async def test_a_bad_continuation_is_invalid_argument(cluster, request_id, continued, max_tokens, problem):
    request = build_request(token_ids=[5, 6, 7], max_tokens=max_tokens, request_id=request_id)
    request.continue_after_token_ids[:] = continued
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate_responses(cluster.address, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in error.value.details()
    await assert_no_kv_held(cluster)


async def test_a_continuation_that_already_ended_is_invalid_argument(cluster, tiny_folder):
    eos = sorted(cluster.scheduler.servicer.model.eos_token_ids)[0]
    request = build_request(token_ids=[5, 6, 7], max_tokens=8, request_id="ended")
    request.continue_after_token_ids[:] = [11, eos]
    request.resume_token = resume_token(cluster.scheduler.servicer.cluster_key, "ended", [5, 6, 7])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate_responses(cluster.address, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already ends the output (FINISH_REASON_STOP)" in error.value.details()
