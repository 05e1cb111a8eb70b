"""The four services in one process over loopback gRPC, with a real Redis: output, errors, cancellation."""

import asyncio

import grpc
import pytest

from splitwise.client import SplitwiseClient
from splitwise.model.weights import load_tokenizer
from tests.integration.cluster import assert_no_kv_held, local_cluster, wait_for_workers
from tests.reference import assert_top_logprobs_match_transformers, hf_greedy

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "zzz " * 50]


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    return load_tokenizer(tiny_folder)


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


@pytest.fixture(scope="module")
async def client(cluster):
    async with SplitwiseClient(cluster.address) as c:
        yield c


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_split_pipeline_greedy_output_equals_transformers(cluster, client, tokenizer, tiny_folder, prompt):
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = await client.generate(token_ids=ids, max_tokens=32, timeout=60)
    assert out.token_ids == hf_greedy(tiny_folder, ids, 32)
    assert out.prompt_tokens == len(ids) and out.completion_tokens == len(out.token_ids)
    assert out.finish_reason in ("stop", "length")
    await assert_no_kv_held(cluster)


async def test_text_and_chat_inputs_are_tokenized_like_the_model_expects(client, tokenizer, tiny_folder):
    raw = await client.generate(prompt="Hello there", max_tokens=8, timeout=60)
    assert raw.token_ids == hf_greedy(tiny_folder, tokenizer.encode("Hello there", add_special_tokens=False), 8)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = await client.generate(messages=messages, max_tokens=8, timeout=60)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.prompt_tokens == len(ids)
    assert chat.token_ids == hf_greedy(tiny_folder, list(ids), 8)
    assert chat.text == tokenizer.decode(chat.token_ids, skip_special_tokens=True)


async def test_kv_relayed_through_kv_store_gives_the_same_output(redis_url, cache_dir, tokenizer, tiny_folder, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_transfer="relay") as relay:
        await wait_for_workers(relay, 4)  # the module's cluster shares this Redis
        async with SplitwiseClient(relay.address) as c:
            for prompt in PROMPTS[:2]:
                ids = tokenizer.encode(prompt, add_special_tokens=False)
                out = await c.generate(token_ids=ids, max_tokens=16, timeout=60)
                assert out.token_ids == hf_greedy(tiny_folder, ids, 16)
        assert len(relay.kv_store.servicer.transfers) >= 1  # kept for the TTL


async def test_concurrent_clients_each_get_their_own_correct_output(cluster, client, tokenizer, tiny_folder):
    prompts = [f"request number {i} says" + " hi" * i for i in range(8)]
    outs = await asyncio.gather(*(client.generate(prompt=p, max_tokens=20, timeout=120) for p in prompts))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(tiny_folder, tokenizer.encode(prompt, add_special_tokens=False), 20)
    await assert_no_kv_held(cluster)


async def test_max_tokens_one_returns_the_prompt_workers_token_only(cluster, client):
    out = await client.generate(prompt="short", max_tokens=1, timeout=60)
    assert len(out.token_ids) == 1 and out.finish_reason in ("length", "stop")
    await assert_no_kv_held(cluster)


async def test_stop_string_ends_the_output_before_it(client):
    full = await client.generate(prompt="The capital of France is", max_tokens=40, ignore_eos=True, timeout=60)
    visible = full.text.strip("\ufffd")
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    assert stop, "the reference output has no text to stop on"
    out = await client.generate(prompt="The capital of France is", max_tokens=40, ignore_eos=True, stop=[stop],
                                timeout=60)
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]


async def test_ignore_eos_generates_exactly_max_tokens(client):
    out = await client.generate(prompt="x", max_tokens=50, ignore_eos=True, timeout=60)
    assert out.completion_tokens == 50 and out.finish_reason == "length"


async def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(prompt="Tell me a story", max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True,
                  timeout=60)
    a = await client.generate(seed=11, **kwargs)
    b = await client.generate(seed=11, **kwargs)
    c = await client.generate(seed=12, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(messages=[]), "chat has no messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "roles"),
        (dict(token_ids=[10**6]), "token ids must be in"),
        (dict(prompt="a" * 2000), "context window is 1024 tokens"),
        (dict(prompt="hi", max_tokens=-1), "max_tokens must be > 0"),
        (dict(prompt="hi", max_tokens=10**8), "max_tokens must be <="),
        (dict(prompt="hi", max_tokens=5000), "context window"),
        (dict(prompt="hi", temperature=-1.0), "temperature must be >= 0"),
        (dict(prompt="hi", top_p=1.5), "top_p must be in"),
        (dict(prompt="hi", top_p=-0.1), "top_p must be in"),
        (dict(prompt="hi", top_k=-3), "top_k"),
        (dict(prompt="hi", model="gpt-17"), "unknown model 'gpt-17'"),
        (dict(prompt="hi", request_id="x" * 500), "request_id must be"),
    ],
)
async def test_bad_input_is_invalid_argument_and_holds_no_kv(cluster, client, kwargs, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.generate(**kwargs, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    await assert_no_kv_held(cluster)
    assert (await client.generate(prompt="still up?", max_tokens=2, timeout=30)).completion_tokens == 2


async def test_client_cancel_frees_kv_on_every_worker_within_a_second(cluster, client):
    received = 0
    async for chunk in client.stream(prompt="go on and on", max_tokens=900, ignore_eos=True, timeout=60):
        received += len(chunk.token_ids)
        if received >= 5:
            break  # closing the stream cancels the call
    await asyncio.sleep(0)
    await assert_no_kv_held(cluster, within_s=1.0)


async def test_client_deadline_aborts_the_request_everywhere(cluster, client):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.generate(prompt="never ending", max_tokens=900, ignore_eos=True, timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_no_kv_held(cluster, within_s=1.0)


async def test_cluster_status_lists_both_workers_with_their_kv_capacity(client):
    status = await client.cluster_status()
    assert status.model == "tiny-llama"
    roles = sorted(w.role for w in status.workers)
    assert roles[:1] == ["prompt"] and "token" in roles
    assert all(w.kv_capacity_tokens > 0 for w in status.workers)


async def test_logprobs_cover_the_prompt_workers_token_and_the_token_workers(client):
    out = await client.generate(prompt="How likely?", max_tokens=5, ignore_eos=True, logprobs=True, timeout=60)
    assert len(out.logprobs) == len(out.token_ids) == 5
    assert all(lp <= 0 for lp in out.logprobs)


async def test_top_logprobs_of_the_prompt_workers_token_and_the_token_workers_match_transformers(
        cluster, client, tokenizer, tiny_folder, monkeypatch):
    engine = cluster.token_worker.servicer.engine
    committed = []  # the first token as the KV commit brought it to the token worker
    start_decoding = engine.start_decoding
    monkeypatch.setattr(engine, "start_decoding",
                        lambda handle, first: (committed.append(first), start_decoding(handle, first))[1])
    ids = tokenizer.encode("Which token comes next?", add_special_tokens=False)
    out = await client.generate(token_ids=ids, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=5,
                                timeout=60)
    assert_top_logprobs_match_transformers(tiny_folder, ids, out.token_ids, out.top_logprobs, 5)
    assert [top[0][1] for top in out.top_logprobs] == out.logprobs
    assert len(committed) == 1, "the request did not run split"  # its first token came from the prompt worker
    assert list(committed[0].top_logprobs) == out.top_logprobs[0]


async def test_top_logprobs_are_left_out_unless_asked(client):
    out = await client.generate(prompt="How likely?", max_tokens=3, ignore_eos=True, logprobs=True, timeout=60)
    assert len(out.logprobs) == 3 and out.top_logprobs == []


@pytest.mark.parametrize("prompt_worker_says", [True, False])
@pytest.mark.parametrize("max_tokens", [1, 2, 5])
async def test_a_request_ends_where_the_workers_engines_say_whichever_worker_says_it(cluster, client, monkeypatch,
                                                                                    prompt_worker_says, max_tokens):
    """The prompt worker's engine says whether the request ends at its first token; a prompt worker that does not
    say (one older than FirstToken.finish_reason) leaves it to the token worker's engine, which ends it there
    itself: the same tokens and reason either way, and nothing held after."""
    ids = [11, 12, 13, 14, 15]
    greedy = (await client.generate(token_ids=ids, max_tokens=5, ignore_eos=True, timeout=60)).token_ids
    if not prompt_worker_says:
        from splitwise.rpc import convert
        monkeypatch.setattr(convert, "finish_reason_to_pb", lambda reason: 0)
    out = await client.generate(token_ids=ids, max_tokens=max_tokens, ignore_eos=True, timeout=60)
    assert out.token_ids == greedy[:max_tokens]
    assert (out.completion_tokens, out.finish_reason) == (max_tokens, "length")
    await assert_no_kv_held(cluster)
