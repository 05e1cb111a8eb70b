# Generated from protos/ by `python -m splitwise.rpc.generate`. Do not edit.
from splitwise.rpc.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PutReply(_message.Message):
    __slots__ = ("request_id", "num_bytes", "num_chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_bytes: int
    num_chunks: int
    def __init__(self, request_id: _Optional[str] = ..., num_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("request_id", "wait_s", "kv_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    KV_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_s: float
    kv_hash: str
    def __init__(self, request_id: _Optional[str] = ..., wait_s: _Optional[float] = ..., kv_hash: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
