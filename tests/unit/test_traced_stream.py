"""A server stream started with TracedStream is traced as the gRPC client interceptor would trace it."""

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from splitwise import channels
from splitwise.channels import TracedStream, end_stream

METHOD = "/test.Streams/Count"


async def test_a_traced_stream_is_a_client_span_parent_of_the_servers_ending_with_the_calls_status(monkeypatch):
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(channels, "tracer", lambda: provider.get_tracer("test"))
    traceparents = []

    async def count(request, context):
        traceparents.append(dict(context.invocation_metadata())["traceparent"])
        if request == b"fail":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such count")
        for _ in range(3):
            yield b"n"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Streams", {"Count": grpc.unary_stream_rpc_method_handler(count)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_stream(METHOD)
            finished = TracedStream(method, METHOD, b"go", 10.0)
            assert await finished.read() == b"n"
            await end_stream(finished, cancel=False)  # read to its end: OK
            failed = TracedStream(method, METHOD, b"fail", 10.0)
            with pytest.raises(grpc.aio.AioRpcError):
                await failed.read()
            await end_stream(failed)
            cancelled = TracedStream(method, METHOD, b"go", 10.0)
            assert await cancelled.read() == b"n"
            await end_stream(cancelled)  # cancelled here: not an error
            await end_stream(finished)  # a second end changes nothing
    finally:
        await server.stop(0)
    spans = exporter.get_finished_spans()
    assert [(s.name, s.kind) for s in spans] == [(METHOD, SpanKind.CLIENT)] * 3
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.ERROR, StatusCode.UNSET]
    assert [s.attributes["rpc.grpc.status_code"] for s in spans] == [0, grpc.StatusCode.NOT_FOUND.value[0], 0]
    assert {(s.attributes["rpc.service"], s.attributes["rpc.method"]) for s in spans} == {("test.Streams", "Count")}
    assert [t.split("-")[2] for t in traceparents] == [format(s.context.span_id, "016x") for s in spans]
