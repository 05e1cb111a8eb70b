"""Many calls on one WorkerCalls stream (splitwise/rpc/calls.py), over a real gRPC server: each call reads, ends,
fails, is cancelled and times out as the RPC of its method would, and one call's end leaves the others alone."""

import asyncio

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from splitwise.rpc import calls as calls_module
from splitwise.rpc.calls import CallsSession, serve_calls
from splitwise.rpc.errors import failure_detail, failure_trailer
from splitwise.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc


def tokens(*ids: int) -> worker_pb2.DecodeEvent:
    return worker_pb2.DecodeEvent(tokens=worker_pb2.Tokens(token_ids=list(ids)))


class FakeWorker:
    """Decode handlers chosen by request id: count-N (N tokens, then the end), abort, raise, hang (a reservation,
    then nothing)."""

    def __init__(self):
        self.released: list[str] = []
        self.cancelled: list[str] = []
        self.streams_seen = 0

    async def decode(self, request: worker_pb2.DecodeRequest, context):
        rid = request.request_id
        context.add_done_callback(lambda _: self.released.append(rid))
        if rid == "abort":
            detail = common_pb2.FailureDetail(reason=common_pb2.FailureDetail.REASON_KV_TRANSFER,
                                              fault=common_pb2.FailureDetail.FAULT_SENDER)
            await context.abort(grpc.StatusCode.DATA_LOSS, "a corrupt chunk",
                                failure_trailer(grpc.StatusCode.DATA_LOSS, "a corrupt chunk", detail))
        if rid == "raise":
            raise ValueError("a bug")
        if rid.startswith("count-"):
            for i in range(int(rid.split("-")[1])):
                yield tokens(i)
                await asyncio.sleep(0)
            return
        yield worker_pb2.DecodeEvent(reserved=worker_pb2.Reserved(reserved_tokens=1))
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise

    async def prefill(self, request: worker_pb2.PrefillRequest, context):
        yield worker_pb2.PrefillEvent(first_token=worker_pb2.FirstToken(token_id=len(request.prompt_token_ids)))


class Servicer(worker_pb2_grpc.WorkerCallsServicer):
    def __init__(self, worker: FakeWorker):
        self.worker = worker

    async def Calls(self, request_iterator, context):
        self.worker.streams_seen += 1
        handlers = {"decode": self.worker.decode, "prefill": self.worker.prefill}
        async for message in serve_calls(request_iterator, context, handlers):
            yield message


@pytest.fixture
async def served():
    worker = FakeWorker()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerCallsServicer_to_server(Servicer(worker), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield worker, server, channel
    await channel.close()
    await server.stop(0)


def decode(rid: str) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=rid)


async def read_all(call) -> list:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_calls_on_one_stream_each_get_their_own_events_in_order_and_end_ok(served):
    worker, _, channel = served
    session = CallsSession(channel)
    calls = [session.start("decode", decode(f"count-{n}"), timeout=10) for n in (3, 5, 0)]
    prefill = session.start("prefill", worker_pb2.PrefillRequest(prompt_token_ids=[1, 2, 3, 4]), timeout=10)
    results = await asyncio.gather(*(read_all(c) for c in calls))
    assert [[e.tokens.token_ids[0] for e in r] for r in results] == [[0, 1, 2], [0, 1, 2, 3, 4], []]
    assert [e.first_token.token_id for e in await read_all(prefill)] == [4]
    assert [await c.code() for c in [*calls, prefill]] == [grpc.StatusCode.OK] * 4
    assert worker.streams_seen == 1  # four calls, one stream
    await until(lambda: len(worker.released) == 3)
    await session.close()


async def test_a_failed_call_has_its_status_and_trailer_and_the_others_go_on(served):
    worker, _, channel = served
    session = CallsSession(channel)
    hanging = session.start("decode", decode("hang"), timeout=10)
    assert (await hanging.read()).WhichOneof("kind") == "reserved"
    failed = session.start("decode", decode("abort"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await failed.read()
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    assert error.value.details() == "a corrupt chunk"
    assert failure_detail(error.value.trailing_metadata()).fault == common_pb2.FailureDetail.FAULT_SENDER
    assert failure_detail(await failed.trailing_metadata()).reason == common_pb2.FailureDetail.REASON_KV_TRANSFER
    buggy = session.start("decode", decode("raise"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await buggy.read()
    assert error.value.code() == grpc.StatusCode.UNKNOWN and "ValueError: a bug" in error.value.details()
    assert not hanging.done()  # the others' failures are theirs alone
    assert [e.tokens.token_ids[0] for e in await read_all(session.start("decode", decode("count-2")))] == [0, 1]
    hanging.cancel()
    await session.close()


async def test_a_cancelled_call_is_cancelled_on_the_worker_and_frees_what_it_holds(served):
    worker, _, channel = served
    session = CallsSession(channel)
    call = session.start("decode", decode("hang"), timeout=10)
    assert (await call.read()).WhichOneof("kind") == "reserved"
    assert call.cancel()
    assert not call.cancel()  # once
    await until(lambda: worker.cancelled == ["hang"] and worker.released == ["hang"])
    assert await call.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(asyncio.CancelledError):  # as grpc.aio reads a call cancelled here
        await call.read()
    await session.close()


async def test_a_call_past_its_deadline_ends_with_deadline_exceeded_on_both_ends(served):
    worker, _, channel = served
    session = CallsSession(channel)
    call = session.start("decode", decode("hang"), timeout=0.3)
    assert (await call.read()).WhichOneof("kind") == "reserved"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: worker.released == ["hang"])
    await session.close()


async def test_when_the_worker_goes_away_its_open_calls_fail_unavailable_and_a_new_stream_is_opened(served):
    worker, server, channel = served
    session = CallsSession(channel)
    call = session.start("decode", decode("hang"), timeout=10)
    assert (await call.read()).WhichOneof("kind") == "reserved"
    await server.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    await until(lambda: session.broken)
    late = session.start("decode", decode("count-1"))
    assert late.done() and await late.code() == grpc.StatusCode.UNAVAILABLE
    await until(lambda: worker.released == ["hang"])  # the worker's end freed it as the stream ended
    await session.close()


async def test_bad_frames_fail_their_call_alone(served, monkeypatch):
    worker, _, channel = served
    stream = worker_pb2_grpc.WorkerCallsStub(channel).Calls()
    start = worker_pb2.CallStart(decode=decode("hang"))
    await stream.write(worker_pb2.CallsIn(frames=[
        worker_pb2.CallIn(call=7, start=start),
        worker_pb2.CallIn(call=7, start=start),  # the same id while it is open
        worker_pb2.CallIn(call=8, start=worker_pb2.CallStart()),  # no request
        worker_pb2.CallIn(call=99, cancel=worker_pb2.CallCancel()),  # no such call: nothing happens
    ]))
    ends, events = {}, {}
    while len(ends) < 2 or 7 not in events:
        for frame in (await stream.read()).frames:
            if frame.WhichOneof("kind") == "end":
                ends[frame.call] = frame.end.code
            else:
                events[frame.call] = frame.decode.WhichOneof("kind")
    assert ends == {7: grpc.StatusCode.INVALID_ARGUMENT.value[0], 8: grpc.StatusCode.UNIMPLEMENTED.value[0]}
    assert events == {7: "reserved"}  # the first call 7 goes on
    monkeypatch.setattr(calls_module, "MAX_CALLS_PER_STREAM", 1)
    await stream.write(worker_pb2.CallsIn(frames=[worker_pb2.CallIn(call=9, start=start)]))
    frame = (await stream.read()).frames[0]
    assert (frame.call, frame.end.code) == (9, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    stream.cancel()
    await until(lambda: worker.released == ["hang"])


async def test_events_ready_at_once_go_in_one_message(served):
    worker, _, channel = served
    stream = worker_pb2_grpc.WorkerCallsStub(channel).Calls()
    await stream.write(worker_pb2.CallsIn(frames=[
        worker_pb2.CallIn(call=i, start=worker_pb2.CallStart(decode=decode("hang"))) for i in range(1, 9)]))
    sizes = []
    while sum(sizes) < 8:
        sizes.append(len((await stream.read()).frames))
    assert len(sizes) < 8  # eight reservations made in one turn travel together, not one message each
    stream.cancel()
    await until(lambda: len(worker.released) == 8)


async def test_each_call_is_a_server_span_child_of_its_callers(served, monkeypatch):
    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(calls_module, "tracer", lambda: provider.get_tracer("test"))
    _, _, channel = served
    session = CallsSession(channel)
    parent = provider.get_tracer("test").start_span("scheduler")
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(parent))
    await read_all(session.start("decode", decode("count-1"), timeout=10, metadata=carrier.items()))
    with pytest.raises(grpc.aio.AioRpcError):
        await read_all(session.start("decode", decode("abort"), timeout=10, metadata=carrier.items()))
    await until(lambda: len(exporter.get_finished_spans()) == 2)
    ok, failed = exporter.get_finished_spans()
    assert (ok.name, ok.kind) == ("/splitwise.v1.TokenWorker/Decode", SpanKind.SERVER)
    assert {ok.parent.span_id, failed.parent.span_id} == {parent.context.span_id}
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DATA_LOSS.value[0]
    await session.close()


async def test_many_large_starts_written_at_once_go_in_bounded_messages(served, monkeypatch):
    monkeypatch.setattr(calls_module, "BATCH_BYTES", 4000)
    worker, _, channel = served
    session = CallsSession(channel)
    long_prompt = worker_pb2.PrefillRequest(prompt_token_ids=list(range(1000)))  # ~2 KB a start
    assert len(calls_module._batch([worker_pb2.CallIn(start=worker_pb2.CallStart(prefill=long_prompt))] * 5)) == 2
    prefills = [session.start("prefill", long_prompt, timeout=10) for _ in range(20)]
    assert [[e.first_token.token_id for e in await read_all(c)] for c in prefills] == [[1000]] * 20
    await session.close()


async def test_a_call_that_ended_ok_is_done_only_once_its_events_are_read(served):
    """As an RPC's status follows its messages: a caller that watches a call's end (to notice a failure) does not
    see a finished call end before it has read what the call sent."""
    _, _, channel = served
    session = CallsSession(channel)
    call = session.start("decode", decode("count-3"), timeout=10)
    await until(lambda: call._code is not None)  # the worker's end has arrived
    ended = asyncio.ensure_future(call.code())
    await asyncio.sleep(0.05)
    assert not call.done() and not ended.done()
    assert len(await read_all(call)) == 3
    assert call.done() and await ended == grpc.StatusCode.OK
    unread = session.start("decode", decode("count-2"), timeout=10)
    await until(lambda: unread._code is not None)
    assert unread.cancel() and await unread.code() == grpc.StatusCode.CANCELLED  # its events dropped unread
    await session.close()


async def test_refusals_wait_for_a_caller_that_reads_nothing_rather_than_fail_its_stream(served, monkeypatch):
    monkeypatch.setattr(calls_module, "MAX_QUEUED_FRAMES", 2)
    _, _, channel = served
    stream = worker_pb2_grpc.WorkerCallsStub(channel).Calls()
    await stream.write(worker_pb2.CallsIn(frames=[worker_pb2.CallIn(call=i, start=worker_pb2.CallStart())
                                                  for i in range(1, 11)]))  # ten empty starts, nothing read yet
    await asyncio.sleep(0.2)
    ends = []
    while len(ends) < 10:
        ends += [(f.call, f.end.code) for f in (await stream.read()).frames]
    assert ends == [(i, grpc.StatusCode.UNIMPLEMENTED.value[0]) for i in range(1, 11)]
    stream.cancel()


def test_a_worker_ends_a_request_only_with_stop_or_length():
    from services.scheduler.worker_calls import WorkerFailed, finish_reason_of
    from splitwise.cluster.registry import WorkerInfo
    from splitwise.rpc.v1 import common_pb2

    worker = WorkerInfo("token-1", "token", "127.0.0.1:1", "m", "f")
    assert finish_reason_of(common_pb2.FINISH_REASON_UNSPECIFIED, worker) is None
    assert finish_reason_of(common_pb2.FINISH_REASON_LENGTH, worker) == common_pb2.FINISH_REASON_LENGTH
    for hostile in (common_pb2.FINISH_REASON_CANCELLED, common_pb2.FINISH_REASON_ERROR, 99, -1):
        with pytest.raises(WorkerFailed, match="a worker ends one only with STOP or LENGTH") as error:
            finish_reason_of(hostile, worker)
        assert error.value.code == grpc.StatusCode.INTERNAL
