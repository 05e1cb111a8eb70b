"""The OpenAI-compatible HTTP gateway in front of a real split cluster (tiny Llama, real gRPC, real Redis), driven by
the official `openai` package: output equal to the gRPC path's token for token, streaming, usage, stop strings,
logprobs, errors as the SDK's own exception types, the trace context, and disconnects that leave no KV held."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import aiohttp
import openai
import pytest

from services.gateway import app as gateway_app
from services.scheduler import app as scheduler_app
from splitwise.client import SplitwiseClient
from splitwise.config import GatewayConfig, SchedulerConfig
from splitwise.model.weights import load_tokenizer
from splitwise.telemetry.jsonl_exporter import read_spans
from tests import security
from tests.integration.cluster import METRICS_LISTEN, local_cluster, wait_for_workers
from tests.integration.test_cancellations import held_by_services, scheduler_outcomes, wait_until_nothing_held
from tests.reference import hf_greedy

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


def gateway_config(schedulers: str, cache_dir, **overrides) -> GatewayConfig:
    return GatewayConfig(**{"listen": "127.0.0.1:0", "schedulers": schedulers, "model": MODEL,
                            "cache_dir": str(cache_dir), "api_key": security.API_KEY,
                            "admin_key": security.ADMIN_KEY, **overrides})


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    return load_tokenizer(tiny_folder)


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, MODEL, cache_dir) as c:
        await wait_for_workers(c)
        yield c


@pytest.fixture(scope="module")
async def gateway(cluster, cache_dir, meter_provider):
    server = await gateway_app.start(gateway_config(cluster.address, cache_dir))
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def grpc_client(cluster):
    async with SplitwiseClient(cluster.address) as c:
        yield c


def sdk(gateway, key: str = security.API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{gateway.address}/v1", api_key=key, max_retries=0, timeout=60)


async def test_chat_greedy_output_equals_the_grpc_path_token_for_token(gateway, grpc_client):
    expected = await grpc_client.generate(messages=MESSAGES, max_tokens=24, logprobs=True, timeout=60)
    async with sdk(gateway) as client:
        out = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                                   logprobs=True)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    tokens = [entry.token for entry in choice.logprobs.content]
    assert tokens == [gateway_token_text(gateway, t) for t in expected.token_ids]
    assert [entry.logprob for entry in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-5)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (expected.prompt_tokens,
                                                                        expected.completion_tokens)
    assert out.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert out.object == "chat.completion" and out.model == MODEL and out.id.startswith("chatcmpl-")


def gateway_token_text(gateway, token_id: int) -> str:
    return gateway.gateway.token_text(token_id)


async def test_top_logprobs_are_the_grpc_paths_led_by_the_chosen_token(gateway, grpc_client):
    expected = await grpc_client.generate(messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3, timeout=60)
    async with sdk(gateway) as client:
        out = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True,
                                                   top_logprobs=3)
        completion = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for entry, token_id, top in zip(content, expected.token_ids, expected.top_logprobs):
        assert [t.token for t in entry.top_logprobs] == [gateway_token_text(gateway, t) for t, _ in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-5)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token leads
    tops = completion.choices[0].logprobs.top_logprobs
    assert len(tops) == completion.usage.completion_tokens and all(1 <= len(t) <= 2 for t in tops)


async def test_a_chat_without_max_tokens_generates_up_to_the_context_window(gateway, grpc_client, tokenizer):
    """OpenAI's chat default is "as many as fit": capped by SPLITWISE_GATEWAY_CHAT_MAX_TOKENS, and lowered to what
    the tiny model's 1,024-token window leaves after the prompt, where a fixed max_tokens would be refused."""
    long_messages = [{"role": "user", "content": "go " * 300}]
    prompt_tokens = len(tokenizer.apply_chat_template(long_messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
    async with sdk(gateway) as client:
        out = await client.chat.completions.create(model=MODEL, messages=long_messages,
                                                   extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=MODEL, messages=long_messages, max_tokens=1024)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 1024 - prompt_tokens and out.choices[0].finish_reason == "length"
    capped = await grpc_client.generate(prompt="hi", max_tokens=3, max_tokens_fit_context=True, ignore_eos=True,
                                        timeout=60)
    assert capped.completion_tokens == 3  # an upper bound, never raised


async def test_completion_of_token_ids_equals_transformers(gateway, tiny_folder, tokenizer):
    ids = tokenizer.encode("Once upon a time", add_special_tokens=False)
    expected = hf_greedy(tiny_folder, ids, 20)
    async with sdk(gateway) as client:
        out = await client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0, logprobs=0)
    assert out.choices[0].logprobs.tokens == [gateway_token_text(gateway, t) for t in expected]
    assert out.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(expected)
    offsets = out.choices[0].logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0


async def test_streamed_chat_is_the_whole_answer_in_deltas_then_usage_then_done(gateway):
    async with sdk(gateway) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_raw_sse_ends_with_done_and_completion_stream_matches(gateway, tokenizer):
    # No model named: the served one (as vLLM does); max_tokens and max_completion_tokens both sent, agreeing.
    body = {"prompt": "The capital of France is", "max_tokens": 12, "max_completion_tokens": 12, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{gateway.address}/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {security.API_KEY}"}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            lines = [line.decode().strip() async for line in response.content if line.strip()]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {e["model"] for e in events} == {MODEL}
    text = "".join(e["choices"][0]["text"] for e in events)
    async with sdk(gateway) as client:
        whole = await client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12)
    assert text == whole.choices[0].text
    assert events[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


async def test_a_stop_string_ends_the_output_before_it(gateway, grpc_client):
    free = await grpc_client.generate(prompt="Once upon a time", max_tokens=24, ignore_eos=True, timeout=60)
    stop = free.text[5:7]
    assert stop.strip(), f"the free-running output has no stop string to pick: {free.text!r}"
    async with sdk(gateway) as client:
        out = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, stop=[stop],
                                              extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == free.text[:free.text.index(stop)]


async def test_sampling_with_a_seed_repeats(gateway):
    async with sdk(gateway) as client:
        runs = [await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0,
                                                     top_p=0.9, seed=7, user="tester") for _ in range(2)]
    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content


@pytest.mark.parametrize("field, value", [("n", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("response_format", {"type": "json_object"}), ("frequency_penalty", 0.5),
                                          ("logit_bias", {"1": 2}), ("made_up_field", 1)])
async def test_an_unsupported_field_is_a_400_that_names_it(gateway, field, value):
    async with sdk(gateway) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                 extra_body={field: value})
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == field and field in raised.value.body["message"]


async def test_scheduler_validation_errors_arrive_as_400_with_its_message(gateway):
    async with sdk(gateway) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.completions.create(model=MODEL, prompt="hello " * 10, max_tokens=1 << 19)
    assert "context window" in raised.value.body["message"]
    assert raised.value.body["code"] == "context_length_exceeded"


async def test_a_wrong_or_missing_key_is_401_and_an_unknown_model_404(gateway):
    async with sdk(gateway, "wrong-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with aiohttp.ClientSession() as session:  # the SDK will not send no key at all
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
        async with session.post(f"http://{gateway.address}/v1/chat/completions", json=body) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
    async with sdk(gateway) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
        assert raised.value.body["code"] == "model_not_found"
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]


async def test_a_full_scheduler_is_429_with_retry_after(cluster, cache_dir, redis_url):
    config = SchedulerConfig(listen="127.0.0.1:0", model=MODEL, cache_dir=str(cache_dir), redis_url=redis_url,
                             metrics_listen=METRICS_LISTEN, tls_dir=str(security.tls_dir()),
                             api_key=security.API_KEY, admin_key=security.ADMIN_KEY, max_requests_in_flight=0)
    full = await scheduler_app.start(config)
    server = await gateway_app.start(gateway_config(full.address, cache_dir))
    try:
        async with sdk(server) as client:
            with pytest.raises(openai.RateLimitError) as raised:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert raised.value.response.headers["Retry-After"] == "1"
    finally:
        await server.stop()
        await full.stop(1.0)


async def test_no_scheduler_is_503_and_a_passed_deadline_504(cluster, cache_dir):
    with socket_closed_port() as port:
        gone = await gateway_app.start(gateway_config(f"127.0.0.1:{port}", cache_dir))
        try:
            async with sdk(gone) as client:
                with pytest.raises(openai.InternalServerError) as raised:
                    await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
            assert raised.value.status_code == 503
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{gone.address}/health") as response:
                    assert response.status == 503
        finally:
            await gone.stop()
    hurried = await gateway_app.start(gateway_config(cluster.address, cache_dir, request_timeout_s=0.001))
    try:
        async with sdk(hurried) as client:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200)
        assert raised.value.status_code == 504
    finally:
        await hurried.stop()


class socket_closed_port:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


async def test_bad_bodies_and_routes_get_openai_errors(gateway):
    headers = {"Authorization": f"Bearer {security.API_KEY}"}
    async with aiohttp.ClientSession() as session:
        base = f"http://{gateway.address}"
        cases = [("POST", "/v1/chat/completions", b"{not json", 400), ("POST", "/v1/chat/completions", b"[1]", 400),
                 ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400),
                 ("POST", "/v1/chat/completions", b"x" * (9 << 20), 413), ("GET", "/v1/nothing", b"", 404),
                 ("POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400),
                 ("POST", "/v1/chat/completions", b"\xff\xfe{", 400),
                 ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": [5, 99999]}).encode(), 400),
                 ("GET", "/v1/chat/completions", b"", 405)]
        for method, path, data, status in cases:
            async with session.request(method, base + path, data=data, headers=headers) as response:
                assert response.status == status, (path, data[:40], await response.text())
                error = (await response.json())["error"]
                assert error["message"] and "type" in error and "param" in error and "code" in error


async def test_a_body_that_never_arrives_is_a_408_not_a_held_connection(gateway, monkeypatch):
    monkeypatch.setattr(gateway_app, "BODY_READ_TIMEOUT_S", 0.5)
    host, port = gateway.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {security.API_KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.split()[1] == b"408", status
    writer.close()


async def test_health_and_metrics(gateway):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{gateway.address}/health") as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        async with session.get(f"http://{gateway.address}/metrics") as response:
            assert response.status == 200
            assert "splitwise_gateway_requests_total" in await response.text()


async def test_a_traceparent_joins_the_trace_and_the_gateway_span_is_the_root(gateway, trace_file):
    trace_id = f"{random.getrandbits(128):032x}"
    parent = f"{random.getrandbits(64):016x}"
    async with sdk(gateway) as client:
        out = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                   extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    spans = []
    for _ in range(50):
        spans = [s for s in read_spans(trace_file) if s["trace_id"] == trace_id]
        if any(s["name"].startswith("scheduler.") for s in spans):
            break
        await asyncio.sleep(0.1)
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent_span_id"] == parent]
    assert [s["name"] for s in roots] == ["POST /v1/chat/completions"]
    assert roots[0]["kind"] == "SERVER"
    assert roots[0]["attributes"]["splitwise.request_id"] == out.id.removeprefix("chatcmpl-")
    orphans = [s["name"] for s in spans if s["parent_span_id"] != parent and s["parent_span_id"] not in by_id]
    assert not orphans, f"spans of the request outside the gateway's tree: {orphans}"
    names = {s["name"] for s in spans}
    assert "/splitwise.v1.Scheduler/Generate" in names and "scheduler.admission" in names


async def test_clients_that_disconnect_mid_stream_leave_no_kv_held(cluster, gateway, tokenizer):
    """As the 1,000-cancellation test does over gRPC: 1,000 seeded clients drop their connection after a random delay,
    after a random number of tokens, or at a short client-side timeout, or read to the end; afterwards no worker holds
    a block, a request or a receiver, and the scheduler has no request or handler left."""
    rng = random.Random(20_261_202)
    plans = []
    for i in range(1000):
        prompt = [rng.randrange(3, 259) for _ in range(rng.choice((rng.randint(1, 100), rng.randint(128, 400))))]
        max_tokens = rng.randint(1, 120)
        how = rng.choices(["delay", "tokens", "timeout", "complete"], [30, 35, 25, 10])[0]
        plans.append((i, prompt, max_tokens, how, rng.uniform(0, 0.05), rng.randint(1, max_tokens),
                      rng.uniform(0.005, 0.4)))
    headers = {"Authorization": f"Bearer {security.API_KEY}"}
    url = f"http://{gateway.address}/v1/completions"
    slots = asyncio.Semaphore(32)
    endings: Counter = Counter()

    async def one(session: aiohttp.ClientSession, i, prompt, max_tokens, how, delay_s, after, timeout_s) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "logprobs": 0}
        timeout = aiohttp.ClientTimeout(total=timeout_s if how == "timeout" else 60)

        async def read() -> int:
            tokens = 0
            async with session.post(url, json=body, headers={**headers, "X-Request-Id": f"http-{i}"},
                                    timeout=timeout) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        tokens += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
                        if how == "tokens" and tokens >= after:
                            r.close()  # drops the connection mid-stream
                            return tokens
            return tokens

        async with slots:
            task = asyncio.create_task(read())
            if how == "delay":
                await asyncio.sleep(delay_s)
                task.cancel()
            try:
                tokens = await task
                endings[how] += 1
                if how == "complete":
                    assert tokens == max_tokens
            except asyncio.CancelledError:
                endings["cancelled"] += 1
            except asyncio.TimeoutError:
                endings["timed out"] += 1

    outcomes_before = await scheduler_outcomes(cluster)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, *plan) for plan in plans))
    assert min(endings["cancelled"], endings["tokens"], endings["timed out"]) > 50, endings
    # The disconnects reached the scheduler as cancellations, not as requests left to run to their end: every stream
    # dropped 5 or more tokens before its end is cut there (a few may finish first on a loaded machine).
    cut = sum(1 for _, _, max_tokens, how, _, after, _ in plans if how == "tokens" and after <= max_tokens - 5)
    outcomes = await scheduler_outcomes(cluster) - outcomes_before
    assert outcomes["cancelled"] >= 0.8 * cut, (outcomes, cut)
    await wait_until_nothing_held(lambda: held_by_services(cluster), 10.0)
    async with sdk(gateway) as client:  # and the cluster still serves
        out = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert out.usage.completion_tokens >= 1
