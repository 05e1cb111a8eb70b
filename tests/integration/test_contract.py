"""Every service serves health checking and reflection; one request is one trace; workers refuse bad work."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from splitwise.client import SplitwiseClient
from splitwise.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from splitwise.telemetry.jsonl_exporter import read_spans
from tests.integration.cluster import assert_all_blocks_free, assert_no_kv_held, local_cluster


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_memory_bytes=1 << 20) as c:
        yield c


def services(cluster):
    return [cluster.scheduler, cluster.prompt_worker, cluster.token_worker, cluster.kv_store]


async def test_every_service_reports_serving_and_lists_itself_by_reflection(cluster):
    for service in services(cluster):
        async with grpc.aio.insecure_channel(service.address) as channel:
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
    spans = [s for s in read_spans(trace_file) if s["attributes"].get("splitwise.request_id") == out.request_id]
    (trace_id,) = {s["trace_id"] for s in spans}
    in_trace = [s for s in read_spans(trace_file) if s["trace_id"] == trace_id]
    names = {s["name"] for s in in_trace}
    assert {"scheduler.generate", "scheduler.route", "prompt_worker.prefill_request", "prompt_worker.queue",
            "prompt_worker.prefill", "kv_transfer.send", "token_worker.push_kv", "token_worker.decode_request",
            "kv_transfer.receive", "token_worker.decode"} <= names
    ids = {s["span_id"] for s in in_trace}
    roots = [s for s in in_trace if s["parent_span_id"] is None]
    assert [r["name"] for r in roots] == ["scheduler.generate"]
    assert all(s["parent_span_id"] in ids for s in in_trace if s["parent_span_id"])
    (send,) = [s for s in in_trace if s["name"] == "kv_transfer.send"]
    assert send["attributes"]["kv.layers"] == 4 and send["attributes"]["kv.bytes"] > 0
    assert len([e for e in send["events"] if e["name"] == "kv.layer_sent"]) == 4


async def test_token_worker_refuses_a_request_it_could_never_hold(cluster):
    async with grpc.aio.insecure_channel(cluster.token_worker.address) as channel:
        call = worker_pb2_grpc.TokenWorkerStub(channel).Decode(worker_pb2.DecodeRequest(
            request_id="too-big", num_prompt_tokens=100_000, prompt_token_ids=[5] * 100_000,
                sampling=common_pb2.SamplingParams(max_tokens=10)))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds at most" in error.value.details()
    assert_all_blocks_free(cluster.token_worker.servicer.engine)


async def test_kv_pushed_for_an_unknown_request_is_not_found(cluster):
    async with grpc.aio.insecure_channel(cluster.token_worker.address) as channel:
        header = common_pb2.KVTransferMessage(header=common_pb2.KVHeader(request_id="nobody", num_tokens=3))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await worker_pb2_grpc.TokenWorkerStub(channel).PushKV(iter([header]), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_kv_from_another_model_is_refused_and_the_reservation_freed(cluster):
    servicer = cluster.token_worker.servicer
    async with grpc.aio.insecure_channel(cluster.token_worker.address) as channel:
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
