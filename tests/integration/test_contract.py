"""Every service serves health checking and reflection; one request is one trace; workers refuse bad work."""

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from splitwise.client import SplitwiseClient
from splitwise.engine.sampling import MAX_STOP_STRINGS
from splitwise.model.weights import load_tokenizer
from splitwise.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.security import peer_channel
from tests.integration.cluster import assert_all_blocks_free, assert_no_kv_held, local_cluster
from tests.traces import wait_for_whole_trace


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file, meter_provider):
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_memory_bytes=1 << 20) as c:
        yield c


def services(cluster):
    return [cluster.scheduler, cluster.prompt_worker, cluster.token_worker, cluster.kv_store]


async def test_every_service_reports_serving_and_lists_itself_by_reflection(cluster):
    for service in services(cluster):
        public = service is cluster.scheduler
        async with (grpc.aio.insecure_channel(service.address) if public else peer_channel(service.address, "admin")) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ["", *service.service.service_names]:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = {s.name async for r in responses for s in r.list_services_response.service}
            assert set(service.service.service_names) <= listed


async def test_one_request_is_one_trace_whose_spans_form_a_tree(cluster, trace_file):
    async with SplitwiseClient(cluster.address) as client:
        out = await client.generate(prompt="trace me", max_tokens=5, ignore_eos=True, timeout=30)
    in_trace = await wait_for_whole_trace([trace_file], out.request_id)
    assert len({s["trace_id"] for s in in_trace}) == 1
    names = {(s["name"], s["kind"]) for s in in_trace}
    for rpc in ("Scheduler/Generate", "TokenWorker/Decode", "PromptWorker/Prefill", "TokenWorker/PushKV"):
        assert {(f"/splitwise.v1.{rpc}", "CLIENT"), (f"/splitwise.v1.{rpc}", "SERVER")} <= names, rpc
    internal = {name for name, kind in names if kind == "INTERNAL"}
    assert {"scheduler.admission", "scheduler.route", "prompt_worker.queue", "prompt_worker.prefill", "kv_transfer.send",
            "token_worker.admission", "kv_transfer.receive", "token_worker.decode"} <= internal
    ids = {s["span_id"] for s in in_trace}
    roots = [s for s in in_trace if s["parent_span_id"] is None]
    assert [(r["name"], r["kind"]) for r in roots] == [("/splitwise.v1.Scheduler/Generate", "CLIENT")]
    assert all(s["parent_span_id"] in ids for s in in_trace if s["parent_span_id"])
    (send,) = [s for s in in_trace if s["name"] == "kv_transfer.send"]
    assert send["attributes"]["kv.layers"] == 4 and send["attributes"]["kv.bytes"] > 0
    assert send["attributes"]["kv.transport"] == "shm" and send["attributes"]["kv.bandwidth_mbps"] > 0  # one host
    # An event per message: a layer, or (serialized, staged) a run of layers, each layer in exactly one of them.
    sent = [e["attributes"] for e in send["events"] if e["name"] == "kv.layer_sent"]
    assert sorted(layer for a in sent for layer in range(a["kv.layer"], a["kv.layer"] + a.get("kv.layers", 1))) == [
        0, 1, 2, 3]
    (generate,) = [s for s in in_trace if s["name"] == "/splitwise.v1.Scheduler/Generate" and s["kind"] == "SERVER"]
    assert generate["attributes"]["output.tokens"] == 5 and generate["attributes"]["time_to_first_token_ms"] > 0
    (decode,) = [s for s in in_trace if s["name"] == "token_worker.decode"]
    assert decode["attributes"]["output.tokens"] == 4 and decode["attributes"]["finish_reason"] == "length"


async def test_the_schedulers_worker_calls_are_frames_of_one_stream_per_worker_or_rpcs_of_their_own(cluster, trace_file,
                                                                                                     monkeypatch):
    dispatcher = cluster.scheduler.servicer.dispatcher
    async with SplitwiseClient(cluster.address) as client:
        streamed = await client.generate(prompt="one stream", max_tokens=4, ignore_eos=True, timeout=30)
        sessions = dict(cluster.scheduler.channels._sessions)
        assert {cluster.prompt_worker.address, cluster.token_worker.address} <= set(sessions)
        again = await client.generate(prompt="one stream", max_tokens=4, ignore_eos=True, timeout=30)
        assert all(cluster.scheduler.channels._sessions[a] is s for a, s in sessions.items())  # the same streams
        monkeypatch.setattr(dispatcher, "worker_calls", "rpc")  # SPLITWISE_WORKER_CALLS=rpc, or older workers
        alone = await client.generate(prompt="one stream", max_tokens=4, ignore_eos=True, timeout=30)
    assert streamed.token_ids == again.token_ids == alone.token_ids
    for out in (streamed, alone):  # traced alike either way
        names = {(s["name"], s["kind"]) for s in await wait_for_whole_trace([trace_file], out.request_id)}
        for rpc in ("TokenWorker/Decode", "PromptWorker/Prefill"):
            assert {(f"/splitwise.v1.{rpc}", "CLIENT"), (f"/splitwise.v1.{rpc}", "SERVER")} <= names, rpc
    await assert_no_kv_held(cluster)


def scrape(address: str) -> dict:
    """{sample name with sorted labels: value} from a Prometheus text endpoint, parsed by prometheus_client."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if not k.startswith("otel_scope"))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


async def test_every_service_serves_prometheus_metrics_and_the_ttft_histogram_counts_each_request(cluster):
    scheduler = cluster.scheduler.service.metrics.address
    ttft = "gen_ai_server_time_to_first_token_seconds_count{}"
    before = await asyncio.to_thread(scrape, scheduler)
    async with SplitwiseClient(cluster.address) as client:
        for i in range(3):
            await client.generate(prompt=f"count me {i}", max_tokens=3, ignore_eos=True, timeout=30)
    after = await asyncio.to_thread(scrape, scheduler)
    assert after[ttft] - before.get(ttft, 0) == 3
    assert after["splitwise_requests_total{outcome=length}"] - before.get("splitwise_requests_total{outcome=length}", 0) == 3
    tbt = "gen_ai_server_time_per_output_token_seconds_count{}"
    assert after[tbt] - before.get(tbt, 0) == 3 * 2
    # Engine steps (the workers share this process's meter): one decode token per output token after the first.
    decoded = "splitwise_engine_step_tokens_total{phase=decode}"
    assert after[decoded] - before.get(decoded, 0) == 3 * 2
    prefilled = "splitwise_engine_step_tokens_total{phase=prefill}"
    assert after[prefilled] - before.get(prefilled, 0) >= 3 * len("count me 0".split())
    steps = "splitwise_engine_step_duration_seconds_count{phase=prefill}"
    assert after[steps] - before.get(steps, 0) >= 3
    assert after["splitwise_pool_workers{splitwise_pool=prompt}"] >= 1
    await assert_no_kv_held(cluster)
    for service in services(cluster):
        samples = await asyncio.to_thread(scrape, service.service.metrics.address)
        assert any(name.startswith("gen_ai_server_request_duration_seconds_bucket") for name in samples)
    token = cluster.token_worker
    worker = token.heartbeat.describe().worker_id
    samples = await asyncio.to_thread(scrape, token.service.metrics.address)
    blocks = token.servicer.engine.blocks.num_blocks
    assert samples[f"splitwise_kv_blocks{{splitwise_pool=token,splitwise_worker_id={worker},state=free}}"] == blocks
    assert samples["splitwise_kv_transferred_bytes_total{direction=receive,transport=shm}"] > 0
    assert samples["splitwise_kv_transfers_total{direction=send,outcome=ok,transport=shm}"] >= 3


async def test_token_worker_refuses_a_request_it_could_never_hold(cluster):
    async with peer_channel(cluster.token_worker.address) as channel:
        call = worker_pb2_grpc.TokenWorkerStub(channel).Decode(worker_pb2.DecodeRequest(
            request_id="too-big", num_prompt_tokens=100_000, prompt_token_ids=[5] * 100_000,
                sampling=common_pb2.SamplingParams(max_tokens=10)))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds at most" in error.value.details()
    assert_all_blocks_free(cluster.token_worker.servicer.engine)


@pytest.mark.parametrize("mode, fields, problem", [
    (worker_pb2.DECODE_MODE_RELAYED, {}, "decode mode relayed, but the request's fields say pushed"),
    (worker_pb2.DECODE_MODE_PUSHED, {"prefill_here": True}, "decode mode pushed, but the request's fields say prefill_here"),
    (worker_pb2.DECODE_MODE_RESUME_KEPT, {"output_token_ids": [9]}, "a resumed request takes its prompt KV from the kv_store"),
    (17, {}, "unknown decode mode 17"),
])
async def test_a_decode_mode_the_requests_fields_contradict_is_refused_before_anything_is_held(cluster, mode, fields,
                                                                                              problem):
    async with peer_channel(cluster.token_worker.address) as channel:
        call = worker_pb2_grpc.TokenWorkerStub(channel).Decode(worker_pb2.DecodeRequest(
            request_id="contradicted", num_prompt_tokens=3, prompt_token_ids=[5, 6, 7], mode=mode,
            sampling=common_pb2.SamplingParams(max_tokens=4), **fields), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in error.value.details()
    assert_all_blocks_free(cluster.token_worker.servicer.engine)


async def test_the_token_workers_last_token_carries_the_engines_finish_reason_in_the_same_message(cluster):
    """The scheduler takes the end of a request from the worker's engine, with its last token: no message of its own
    follows, and nothing is left for the scheduler to decide or wait for."""
    async with peer_channel(cluster.token_worker.address) as channel:
        call = worker_pb2_grpc.TokenWorkerStub(channel).Decode(worker_pb2.DecodeRequest(
            request_id="ends-with-its-token", num_prompt_tokens=3, prompt_token_ids=[5, 6, 7], prefill_here=True,
            mode=worker_pb2.DECODE_MODE_PREFILL_HERE,
            sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True)), timeout=30)
        events = [event async for event in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [e.WhichOneof("kind") for e in events] == ["reserved", "tokens", "tokens", "tokens"]
    assert [(len(e.tokens.token_ids), e.tokens.finish_reason) for e in events[1:]] == [
        (1, common_pb2.FINISH_REASON_UNSPECIFIED), (1, common_pb2.FINISH_REASON_UNSPECIFIED),
        (1, common_pb2.FINISH_REASON_LENGTH)]


async def _decode_here(channel, request_id: str, **sampling) -> list[worker_pb2.DecodeEvent]:
    call = worker_pb2_grpc.TokenWorkerStub(channel).Decode(worker_pb2.DecodeRequest(
        request_id=request_id, num_prompt_tokens=3, prompt_token_ids=[5, 6, 7], prefill_here=True,
        mode=worker_pb2.DECODE_MODE_PREFILL_HERE, sampling=common_pb2.SamplingParams(ignore_eos=True, **sampling)),
        timeout=30)
    return [event async for event in call if event.WhichOneof("kind") == "tokens"]


async def test_a_stop_string_is_the_token_workers_stop_condition_and_its_limits_are_the_workers_too(cluster,
                                                                                                  tiny_folder):
    """The worker's engine ends a request at the token that completes a stop string (finish reason STOP, with that
    token), where a scheduler only cuts the text; a peer that sends more stop strings than the limit is refused."""
    tokenizer = load_tokenizer(tiny_folder)
    async with peer_channel(cluster.token_worker.address) as channel:
        free = [t for e in await _decode_here(channel, "free", max_tokens=40) for t in e.tokens.token_ids]
        at = next(i for i in range(len(free) - 1) if all(
            len(c := tokenizer.decode([t])) == 1 and c.isascii() and c.isprintable() for t in free[i:i + 2]))
        stop = tokenizer.decode(free[at:at + 2])
        ends = next(k for k in range(1, len(free) + 1) if stop in tokenizer.decode(free[:k]).rstrip("\ufffd"))
        events = await _decode_here(channel, "stopped", max_tokens=40, stop=[stop])
        assert [t for e in events for t in e.tokens.token_ids] == free[:ends]
        assert events[-1].tokens.finish_reason == common_pb2.FINISH_REASON_STOP
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _decode_here(channel, "too-many", max_tokens=4, stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_STOP_STRINGS} stop strings" in error.value.details()
    assert_all_blocks_free(cluster.token_worker.servicer.engine)


async def test_kv_pushed_for_an_unknown_request_is_not_found(cluster):
    async with peer_channel(cluster.token_worker.address) as channel:
        header = common_pb2.KVTransferMessage(header=common_pb2.KVHeader(request_id="nobody", num_tokens=3))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await worker_pb2_grpc.TokenWorkerStub(channel).PushKV(iter([header]), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_kv_from_another_model_is_refused_and_the_reservation_freed(cluster):
    servicer = cluster.token_worker.servicer
    async with peer_channel(cluster.token_worker.address) as channel:
        stub = worker_pb2_grpc.TokenWorkerStub(channel)
        decode = stub.Decode(worker_pb2.DecodeRequest(request_id="mismatch", num_prompt_tokens=3,
                                                      prompt_token_ids=[5, 6, 7],
                                                      sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=10)
        assert (await decode.read()).WhichOneof("kind") == "reserved"
        layout = common_pb2.KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32",
                                     model_fingerprint="another-model")
        header = common_pb2.KVTransferMessage(header=common_pb2.KVHeader(request_id="mismatch", layout=layout,
                                                                          num_tokens=3))
        with pytest.raises(grpc.aio.AioRpcError) as push_error:
            await stub.PushKV(iter([header]), timeout=5)
        assert push_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model mismatch" in push_error.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as decode_error:
            await decode.read()
        assert decode_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_all_blocks_free(servicer.engine)
    assert not servicer.receivers


async def test_failed_kv_transfer_reaches_the_client_and_frees_kv_everywhere(cluster, monkeypatch):
    import dataclasses

    token = cluster.token_worker.servicer
    monkeypatch.setattr(token, "layout", dataclasses.replace(token.layout, model_fingerprint="other-weights"))
    async with SplitwiseClient(cluster.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.generate(prompt="doomed", max_tokens=8, timeout=30)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model mismatch" in error.value.details()
    await assert_no_kv_held(cluster)
