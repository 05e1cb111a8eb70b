"""The KV control stream at the rpc edge: the gRPC calls a KVSender streams through, and their failures as
KVTransferError, so that `splitwise.kv` itself never builds a stub."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from splitwise.kv.transport.base import Fault, KVTransferError
from splitwise.kv.transport.sender import OpenStream
from splitwise.rpc.errors import failure_detail, fault_of
from splitwise.rpc import kv_wire
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, worker_pb2


def transfer_error(e: grpc.aio.AioRpcError) -> KVTransferError:
    """The receiver's status, as the sender reports it: at the receiver's fault (it refused the KV, or went away)
    unless the receiver's own status detail names another end, or none."""
    code = e.code()
    if code == grpc.StatusCode.INTERNAL and "Internal error from Core" in (e.details() or ""):
        # grpcio's asyncio client says so when a stream write fails as the peer goes away (grpc/grpc#36066):
        # for the scheduler that is an unreachable receiver.
        code = grpc.StatusCode.UNAVAILABLE
    detail = failure_detail(e.trailing_metadata())
    fault = fault_of(detail) if detail.reason == common_pb2.FailureDetail.REASON_KV_TRANSFER else Fault.RECEIVER
    return KVTransferError(f"KV transfer failed: {code.name}: {e.details()}", code, fault)


def kv_stream(channel: grpc.aio.Channel, target_kind: int) -> tuple[OpenStream, str]:
    """(how to open the target's stream, its name), as KVSender takes them: a token worker's PushKV, or the
    kv_store relay's Put."""
    # The stubs' methods, with a serializer that also takes a ChunkMessage (a chunk written from its buffers).
    if target_kind == worker_pb2.KVTarget.KIND_KV_STORE:
        target = "kv_store"
        method = channel.stream_unary("/splitwise.v1.KVStore/Put", request_serializer=kv_wire.serialize,
                                      response_deserializer=kv_store_pb2.PutReply.FromString)
    else:
        target = "token_worker"
        method = channel.stream_unary("/splitwise.v1.TokenWorker/PushKV", request_serializer=kv_wire.serialize,
                                      response_deserializer=worker_pb2.KVAck.FromString)

    async def open_stream(messages: AsyncIterator[common_pb2.KVTransferMessage]):
        call = method(messages)  # no deadline: the sender watches progress instead
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            raise transfer_error(e) from e
        finally:
            call.cancel()  # a no-op once the call ended; ends the stream when the sender gave up on it

    return open_stream, target
