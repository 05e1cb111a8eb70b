"""A failed KV transfer's kind and fault travel as a status detail (google.rpc.Status in grpc-status-details-bin),
over a real gRPC call: what the sender's rpc edge makes of a receiver's refusal, with and without a detail."""

import grpc
import pytest
from google.rpc import status_pb2

from splitwise.kv.transport.base import Fault, KVTransferError
from splitwise.rpc.errors import (STATUS_DETAILS_KEY, abort_transfer, failure_detail, failure_trailer, fault_of,
                                  transfer_failure)
from splitwise.rpc.kv_stream import kv_stream
from splitwise.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

Detail = common_pb2.FailureDetail


class Refusing(worker_pb2_grpc.TokenWorkerServicer):
    """A receiver that refuses every KV stream as `refusal` says."""

    def __init__(self):
        self.refusal = None

    async def PushKV(self, request_iterator, context):
        await anext(aiter(request_iterator))
        kind, error = self.refusal
        if kind == "structured":
            await abort_transfer(context, error)
        await context.abort(error.code, str(error))  # a peer that names no kind


@pytest.fixture
async def receiver():
    servicer = Refusing()
    server = grpc.aio.server()
    worker_pb2_grpc.add_TokenWorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield servicer, channel
    await server.stop(0)


async def push(channel) -> KVTransferError:
    open_stream, target = kv_stream(channel, worker_pb2.KVTarget.KIND_TOKEN_WORKER)
    assert target == "token_worker"

    async def messages():
        yield common_pb2.KVTransferMessage(header=common_pb2.KVHeader(request_id="r1"))

    with pytest.raises(KVTransferError) as error:
        await open_stream(messages())
    return error.value


@pytest.mark.parametrize("fault", [Fault.SENDER, Fault.UNKNOWN, Fault.KV_STORE])
async def test_the_receivers_named_fault_reaches_the_sender(receiver, fault):
    servicer, channel = receiver
    servicer.refusal = ("structured", KVTransferError("the sender gave up", grpc.StatusCode.UNAVAILABLE, fault))
    error = await push(channel)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.fault is fault
    assert "the sender gave up" in str(error)


async def test_a_refusal_without_a_detail_is_the_receivers_fault(receiver):
    servicer, channel = receiver
    servicer.refusal = ("plain", KVTransferError("no", grpc.StatusCode.FAILED_PRECONDITION))
    error = await push(channel)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.fault is Fault.RECEIVER


def test_a_trailer_round_trips_and_carries_a_standard_google_rpc_status():
    detail = transfer_failure(KVTransferError("x", fault=Fault.SENDER))
    trailer = failure_trailer(grpc.StatusCode.DATA_LOSS, "corrupt", detail)
    status = status_pb2.Status.FromString(dict(trailer)[STATUS_DETAILS_KEY])
    assert (status.code, status.message) == (grpc.StatusCode.DATA_LOSS.value[0], "corrupt")
    assert status.details[0].Is(Detail.DESCRIPTOR)
    assert failure_detail(trailer) == Detail(reason=Detail.REASON_KV_TRANSFER, fault=Detail.FAULT_SENDER)
    assert fault_of(failure_detail(trailer)) is Fault.SENDER


def test_an_error_that_names_no_end_has_an_unknown_fault():
    assert transfer_failure(ValueError("checksum")).fault == Detail.FAULT_UNKNOWN


@pytest.mark.parametrize("trailer", [(), None, ((STATUS_DETAILS_KEY, b"\xff\xfe not a status"),),
                                     (("other-bin", b"x"),),
                                     ((STATUS_DETAILS_KEY, status_pb2.Status(code=14).SerializeToString()),)])
def test_a_missing_or_unreadable_detail_is_an_empty_one(trailer):
    detail = failure_detail(trailer)
    assert detail.reason == Detail.REASON_UNSPECIFIED
    assert fault_of(detail) is Fault.UNKNOWN
