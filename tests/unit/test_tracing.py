"""Exporters are chosen by the standard OTEL_* variables; OTLP reaches a real OTLP/gRPC receiver; logs carry trace ids."""

import asyncio
import json
import os
import sys

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from splitwise.telemetry.tracing import _configured_exporters

EMIT_ONE_SPAN = """
from splitwise.telemetry.tracing import setup_tracing, tracer
provider = setup_tracing("test-service")
with tracer().start_as_current_span("hello") as span:
    span.set_attribute("answer", 42)
provider.shutdown()
"""


def test_exporters_follow_otel_traces_exporter(monkeypatch):
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert _configured_exporters() == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert _configured_exporters() == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console, otlp")
    assert _configured_exporters() == ["console", "otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert _configured_exporters() == []


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_grpc_receiver():
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_TRACES_EXPORTER": "otlp",
               "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", EMIT_ONE_SPAN, env=env)
        assert await proc.wait() == 0
    finally:
        await server.stop(0)
    spans = [(rs, s) for r in collector.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for _, s in spans] == ["hello"]
    resource = {a.key: a.value.string_value for a in spans[0][0].resource.attributes}
    assert resource["service.name"] == "test-service"


LOG_IN_A_SPAN = """
import logging
from splitwise.telemetry.logs import setup_logging
from splitwise.telemetry.tracing import setup_tracing, tracer
setup_logging("test-service")
setup_tracing("test-service")
log = logging.getLogger("splitwise.test")
log.info("outside")
with tracer().start_as_current_span("hello") as span:
    ctx = span.get_span_context()
    print(format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
    log.warning("inside %s", "a span", extra={"request_id": "r-1"})
"""


async def test_logs_are_json_lines_carrying_the_trace_and_span_ids():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", LOG_IN_A_SPAN, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    trace_id, span_id = out.decode().split()
    outside, inside = [json.loads(line) for line in err.decode().splitlines()]
    assert outside["message"] == "outside" and "trace_id" not in outside
    assert inside["message"] == "inside a span" and inside["severity"] == "WARNING"
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert inside["service.name"] == "test-service" and inside["request_id"] == "r-1"


DETACH_IN_ANOTHER_CONTEXT = """
import contextvars, logging
from opentelemetry import context
from splitwise.telemetry.logs import setup_logging
setup_logging("test-service")
token = context.attach(context.set_value("k", 1))
contextvars.Context().run(context.detach, token)  # what a stream closed in another context does
logging.getLogger("x").error("a real error")
"""


async def test_the_grpc_instrumentations_spurious_detach_error_is_not_logged_as_an_error():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", DETACH_IN_ANOTHER_CONTEXT,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    records = [json.loads(line) for line in err.decode().splitlines()]
    assert [(r["severity"], r["message"]) for r in records] == [("ERROR", "a real error")]


@pytest.mark.parametrize("method, traced", [
    ("/splitwise.v1.Scheduler/Generate", True), (b"/splitwise.v1.PromptWorker/Prefill", True),
    ("/grpc.health.v1.Health/Check", False), ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
    (b"/splitwise.v1.WorkerCalls/Calls", False),
])
def test_health_reflection_and_worker_call_streams_are_not_traced_as_rpcs_of_their_own(method, traced):
    from types import SimpleNamespace

    from splitwise.telemetry.tracing import _traced_rpc

    assert _traced_rpc(SimpleNamespace(method=method)) is traced
