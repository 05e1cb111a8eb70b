"""How the core's failures map to gRPC status codes at the edge, and the structured detail beside a code."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from splitwise.engine.block_manager import KVCapacityError
from splitwise.engine.request_handle import RequestFailed
from splitwise.kv.chunks import KVIntegrityError
from splitwise.kv.layout import KVLayoutMismatch
from splitwise.kv.transport.base import Fault
from splitwise.rpc.v1 import common_pb2


def capacity_status(error: KVCapacityError) -> grpc.StatusCode:
    """Never fits: the request is wrong for this worker. Does not fit now: try later or elsewhere."""
    return grpc.StatusCode.INVALID_ARGUMENT if error.ever else grpc.StatusCode.RESOURCE_EXHAUSTED


def transfer_status(error: Exception) -> grpc.StatusCode:
    if isinstance(error, KVLayoutMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, KVIntegrityError):
        return grpc.StatusCode.DATA_LOSS
    return getattr(error, "code", grpc.StatusCode.UNAVAILABLE)  # a KVTransferError says how it failed


def engine_status(error: RequestFailed) -> grpc.StatusCode:
    """The request's own state was corrupt (its KV): DATA_LOSS. The engine failed: INTERNAL."""
    return grpc.StatusCode.DATA_LOSS if error.corrupt else grpc.StatusCode.INTERNAL


# gRPC's richer error model: a google.rpc.Status in this trailer, whose details say what kind of failure it was.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
_FAULTS = {
    Fault.UNKNOWN: common_pb2.FailureDetail.FAULT_UNKNOWN,
    Fault.SENDER: common_pb2.FailureDetail.FAULT_SENDER,
    Fault.RECEIVER: common_pb2.FailureDetail.FAULT_RECEIVER,
    Fault.KV_STORE: common_pb2.FailureDetail.FAULT_KV_STORE,
}
_FAULTS_BACK = {v: k for k, v in _FAULTS.items()}


def transfer_failure(error: Exception) -> common_pb2.FailureDetail:
    """A failed KV transfer's kind, with the end a KVTransferError names (a checksum or a layout names none)."""
    return common_pb2.FailureDetail(reason=common_pb2.FailureDetail.REASON_KV_TRANSFER,
                                    fault=_FAULTS[getattr(error, "fault", Fault.UNKNOWN)])


def failure_trailer(code: grpc.StatusCode, message: str,
                    detail: common_pb2.FailureDetail) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries `detail` beside the call's status."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(detail)
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def failure_detail(trailing_metadata) -> common_pb2.FailureDetail:
    """The FailureDetail a failed call's trailer carries; an empty one (REASON_UNSPECIFIED) when there is none, or
    none that parses: a peer that says nothing structured is judged by its status code alone."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
            for any_detail in status.details:
                detail = common_pb2.FailureDetail()
                if any_detail.Unpack(detail):
                    return detail
        except DecodeError:
            pass
    return common_pb2.FailureDetail()


def fault_of(detail: common_pb2.FailureDetail) -> Fault:
    return _FAULTS_BACK.get(detail.fault, Fault.UNKNOWN)


async def abort_transfer(context: grpc.aio.ServicerContext, error: Exception, message: str | None = None) -> None:
    """Ends a call with a failed KV transfer's status, its message, and its kind and fault as a status detail."""
    code = transfer_status(error)
    message = str(error) if message is None else message
    await context.abort(code, message, failure_trailer(code, message, transfer_failure(error)))
