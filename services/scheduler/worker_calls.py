"""Reading the scheduler's streams from workers: the next expected event, or the failure the client gets."""

from __future__ import annotations

import asyncio

import grpc

from splitwise.cluster.registry import WorkerInfo
from splitwise.rpc.errors import failure_detail
from splitwise.rpc.v1 import common_pb2

# When one side of a KV transfer reports it broken, how long the other side's stream has to say why: a prompt
# worker that died, or a token worker that refused the KV (a checksum, a layout) or went away.
SENDER_FAILURE_GRACE_S = 1.0


class WorkerFailed(Exception):
    """A worker call failed; `code` is the status the client gets, `detail` the kind of failure the worker named
    (its status detail; empty when it named none), `culprit` the worker to avoid for the rest of the request."""

    def __init__(self, worker: WorkerInfo, code: grpc.StatusCode, details: str,
                 detail: common_pb2.FailureDetail | None = None):
        if code == grpc.StatusCode.UNKNOWN:  # an exception the worker did not map: grpcio's text names its class
            code, details = grpc.StatusCode.INTERNAL, "failed unexpectedly (its log has the details)"
        elif code == grpc.StatusCode.ALREADY_EXISTS:  # the engine holds a request of this id: another replica's
            details = "the request_id names a request in flight elsewhere in the cluster: give each its own id"
        super().__init__(f"{worker.role} worker {worker.worker_id}: {details}")
        self.worker = worker
        self.code = code
        self.detail = detail if detail is not None else common_pb2.FailureDetail()
        self.culprit = worker  # unless the failure is its peer's (set where both ends are known)

    @property
    def kv_transfer_failed(self) -> bool:
        """The worker answered, but the request's KV transfer failed."""
        return self.detail.reason == common_pb2.FailureDetail.REASON_KV_TRANSFER

    @property
    def kv_store_failed(self) -> bool:
        """The worker is up, but the KV it was to read from the kv_store is not to be had."""
        return self.kv_transfer_failed and self.detail.fault == common_pb2.FailureDetail.FAULT_KV_STORE

    @property
    def sender_at_fault(self) -> bool:
        """The transfer failed for its sender's own reason: its write failed, it gave up, or it went away."""
        return self.kv_transfer_failed and self.detail.fault == common_pb2.FailureDetail.FAULT_SENDER

    @property
    def receiver_knows_why(self) -> bool:
        """A sender's transfer failed, not by its own fault: the receiver's own status says why."""
        return self.kv_transfer_failed and not self.sender_at_fault


# How a worker's engine may end a request; any other reason (or an unknown value) is a peer's protocol error.
WORKER_FINISH_REASONS = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


def finish_reason_of(value: int, who: WorkerInfo) -> int | None:
    """A worker's finish reason (None: the request goes on), refused unless its engine may end a request so."""
    if not value:
        return None
    if value not in WORKER_FINISH_REASONS:
        raise WorkerFailed(who, grpc.StatusCode.INTERNAL,
                           f"ended the request with finish reason {value}: a worker ends one only with STOP or LENGTH")
    return value


async def expect(call, who: WorkerInfo, kind: str | tuple[str, ...]):
    """Reads the next event of a worker stream, which must be of `kind` (or one of them); returns its payload."""
    kinds = (kind,) if isinstance(kind, str) else kind
    try:
        msg = await call.read()
    except grpc.aio.AioRpcError as e:
        raise WorkerFailed(who, e.code(), e.details(), failure_detail(e.trailing_metadata())) from e
    if msg is grpc.aio.EOF or msg.WhichOneof("kind") not in kinds:
        got = "the end of the stream" if msg is grpc.aio.EOF else msg.WhichOneof("kind")
        raise WorkerFailed(who, grpc.StatusCode.INTERNAL, f"expected {' or '.join(kinds)}, got {got}")
    return getattr(msg, msg.WhichOneof("kind"))


async def expect_unless(call, who: WorkerInfo, kind: str, other, other_worker: WorkerInfo,
                        other_ended: asyncio.Future):
    """Like expect on `call`, but fails as soon as the `other` stream ends with an error meanwhile."""
    read = asyncio.ensure_future(expect(call, who, kind))
    try:
        await asyncio.wait({read, other_ended}, return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            failed = read.exception()
            if not (isinstance(failed, WorkerFailed) and failed.receiver_knows_why):
                return read.result()
            # The sender is up and says its transfer broke, not by its own fault, often only as "the peer went
            # away" (grpcio hides the receiver's status when a write races its abort): the receiver's own stream
            # says why, a corrupt chunk (DATA_LOSS) or its death, and that is the failure to act on.
            await asyncio.wait({other_ended}, timeout=SENDER_FAILURE_GRACE_S)
            if not other_ended.done() or other_ended.result() == grpc.StatusCode.OK:
                raise failed
        else:
            # The receiver saw the KV stream break; if its sender died, the sender's own stream says so at
            # once, and that is the failure to act on (the request goes to another prompt worker, not
            # another token worker).
            await asyncio.wait({read}, timeout=SENDER_FAILURE_GRACE_S)
    except asyncio.CancelledError:  # the request ended: no read of the stream may outlive it
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)
        raise
    sender_failed = read.exception() if read.done() else None
    if isinstance(sender_failed, WorkerFailed) and not sender_failed.receiver_knows_why:
        raise sender_failed
    read.cancel()
    await asyncio.gather(read, return_exceptions=True)  # the stream's reader must be idle before its end is read
    code = other_ended.result()
    details = await other.details()
    detail = failure_detail(await other.trailing_metadata())
    if code == grpc.StatusCode.OK:
        code, details = grpc.StatusCode.INTERNAL, "the decode stream ended before the KV arrived"
    failed = WorkerFailed(other_worker, code, details, detail)
    if failed.sender_at_fault:  # the receiver saw its sender fail (it gave up, or went away): avoid the sender
        failed.culprit = who
    raise failed
