# Generated from protos/ by `python -m splitwise.rpc.generate`. Do not edit.
from splitwise.rpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECODE_MODE_UNSPECIFIED: _ClassVar[DecodeMode]
    DECODE_MODE_PUSHED: _ClassVar[DecodeMode]
    DECODE_MODE_RELAYED: _ClassVar[DecodeMode]
    DECODE_MODE_PREFILL_HERE: _ClassVar[DecodeMode]
    DECODE_MODE_RESUME_KEPT: _ClassVar[DecodeMode]
DECODE_MODE_UNSPECIFIED: DecodeMode
DECODE_MODE_PUSHED: DecodeMode
DECODE_MODE_RELAYED: DecodeMode
DECODE_MODE_PREFILL_HERE: DecodeMode
DECODE_MODE_RESUME_KEPT: DecodeMode

class CallsIn(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[CallIn]
    def __init__(self, frames: _Optional[_Iterable[_Union[CallIn, _Mapping]]] = ...) -> None: ...

class CallIn(_message.Message):
    __slots__ = ("call", "start", "cancel")
    CALL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    call: int
    start: CallStart
    cancel: CallCancel
    def __init__(self, call: _Optional[int] = ..., start: _Optional[_Union[CallStart, _Mapping]] = ..., cancel: _Optional[_Union[CallCancel, _Mapping]] = ...) -> None: ...

class CallStart(_message.Message):
    __slots__ = ("prefill", "decode", "timeout_s", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    prefill: PrefillRequest
    decode: DecodeRequest
    timeout_s: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, prefill: _Optional[_Union[PrefillRequest, _Mapping]] = ..., decode: _Optional[_Union[DecodeRequest, _Mapping]] = ..., timeout_s: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CallCancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CallsOut(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[CallOut]
    def __init__(self, frames: _Optional[_Iterable[_Union[CallOut, _Mapping]]] = ...) -> None: ...

class CallOut(_message.Message):
    __slots__ = ("call", "prefill", "decode", "end")
    CALL_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    call: int
    prefill: PrefillEvent
    decode: DecodeEvent
    end: CallEnd
    def __init__(self, call: _Optional[int] = ..., prefill: _Optional[_Union[PrefillEvent, _Mapping]] = ..., decode: _Optional[_Union[DecodeEvent, _Mapping]] = ..., end: _Optional[_Union[CallEnd, _Mapping]] = ...) -> None: ...

class CallEnd(_message.Message):
    __slots__ = ("code", "message", "status_details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    status_details: bytes
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., status_details: _Optional[bytes] = ...) -> None: ...

class KVTarget(_message.Message):
    __slots__ = ("kind", "address", "layout", "offer", "layerwise", "request_id")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[KVTarget.Kind]
        KIND_TOKEN_WORKER: _ClassVar[KVTarget.Kind]
        KIND_KV_STORE: _ClassVar[KVTarget.Kind]
    KIND_UNSPECIFIED: KVTarget.Kind
    KIND_TOKEN_WORKER: KVTarget.Kind
    KIND_KV_STORE: KVTarget.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    LAYERWISE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kind: KVTarget.Kind
    address: str
    layout: _common_pb2.KVLayout
    offer: _common_pb2.KVTransportOffer
    layerwise: bool
    request_id: str
    def __init__(self, kind: _Optional[_Union[KVTarget.Kind, str]] = ..., address: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., offer: _Optional[_Union[_common_pb2.KVTransportOffer, _Mapping]] = ..., layerwise: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "kv_target", "kv_keep")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_TARGET_FIELD_NUMBER: _ClassVar[int]
    KV_KEEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    kv_target: KVTarget
    kv_keep: KVTarget
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., kv_target: _Optional[_Union[KVTarget, _Mapping]] = ..., kv_keep: _Optional[_Union[KVTarget, _Mapping]] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("first_token", "transfer")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    first_token: FirstToken
    transfer: KVTransferSummary
    def __init__(self, first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., transfer: _Optional[_Union[KVTransferSummary, _Mapping]] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "logprob", "prefill_ms", "top_logprobs", "finish_reason")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    prefill_ms: float
    top_logprobs: _common_pb2.TopLogprobs
    finish_reason: _common_pb2.FinishReason
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., top_logprobs: _Optional[_Union[_common_pb2.TopLogprobs, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class KVTransferSummary(_message.Message):
    __slots__ = ("num_bytes", "num_layers", "num_chunks", "seconds")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    num_layers: int
    num_chunks: int
    seconds: float
    def __init__(self, num_bytes: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_chunks: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens", "sampling", "kv_source", "prompt_token_ids", "prefill_here", "kv_transport", "output_token_ids", "mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HERE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    sampling: _common_pb2.SamplingParams
    kv_source: KVTarget
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefill_here: bool
    kv_transport: str
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    mode: DecodeMode
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., kv_source: _Optional[_Union[KVTarget, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prefill_here: _Optional[bool] = ..., kv_transport: _Optional[str] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[DecodeMode, str]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("reserved", "tokens", "kv_fallback")
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    reserved: Reserved
    tokens: Tokens
    kv_fallback: KVFallback
    def __init__(self, reserved: _Optional[_Union[Reserved, _Mapping]] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., kv_fallback: _Optional[_Union[KVFallback, _Mapping]] = ...) -> None: ...

class KVFallback(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("layout", "reserved_tokens", "offer")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    reserved_tokens: int
    offer: _common_pb2.KVTransportOffer
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., reserved_tokens: _Optional[int] = ..., offer: _Optional[_Union[_common_pb2.KVTransportOffer, _Mapping]] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "top_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: _common_pb2.FinishReason
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TopLogprobs]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., top_logprobs: _Optional[_Iterable[_Union[_common_pb2.TopLogprobs, _Mapping]]] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("request_id", "num_bytes", "num_chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_bytes: int
    num_chunks: int
    def __init__(self, request_id: _Optional[str] = ..., num_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...
