"""How the core's failures map to gRPC status codes at the edge."""

from __future__ import annotations

import grpc

from splitwise.engine.block_manager import KVCapacityError
from splitwise.engine.request_handle import RequestFailed
from splitwise.kv.chunks import KVIntegrityError
from splitwise.kv.layout import KVLayoutMismatch


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
