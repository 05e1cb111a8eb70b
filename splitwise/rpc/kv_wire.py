"""A KV chunk message as the sender hands it to gRPC: its protobuf wire bytes written straight from the chunk's
buffers, in one copy, instead of a copy into a KVTransferMessage and another when gRPC serializes it.

`ChunkMessage` stands for `KVTransferMessage{chunk}`: it answers `WhichOneof("kind")` and `chunk` as the message
does (for a receiver in the same process), and its `SerializeToString` gives the bytes the message would have.
The control streams' serializer (`serialize`) takes it and any real message alike.
"""

from __future__ import annotations

import struct

from splitwise.kv.chunks import KVChunk
from splitwise.rpc.v1 import common_pb2

_CHUNK_FIELD = 2  # KVTransferMessage.chunk
_VARINT, _FIXED64, _LENGTH = 0, 1, 2


def _varint(value: int) -> bytes:
    if value < 0:  # an int32 below zero is ten bytes on the wire, as 64-bit two's complement
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _chunk_fields(chunk: KVChunk) -> list:
    """KVChunk's fields in field-number order, zeros left out (as protobuf writes them); key and value as given."""
    parts = []
    for field, value in ((1, chunk.layer), (2, chunk.token_start), (3, chunk.token_count)):
        if value:
            parts += [_key(field, _VARINT), _varint(value)]
    for field, data in ((4, chunk.key), (5, chunk.value)):
        size = memoryview(data).nbytes
        if size:
            parts += [_key(field, _LENGTH), _varint(size), data]
    if chunk.staged:
        parts += [_key(7, _VARINT), b"\x01"]
    if chunk.xxh3:
        parts += [_key(8, _FIXED64), struct.pack("<Q", chunk.xxh3)]
    if chunk.num_layers not in (0, 1):  # (1 goes as 0, the field's default: an older receiver reads one layer)
        parts += [_key(9, _VARINT), _varint(chunk.num_layers)]
    return parts


def chunk_message_bytes(chunk: KVChunk) -> bytes:
    """KVTransferMessage{chunk} on the wire: the chunk's key and value bytes copied once, into the result."""
    fields = _chunk_fields(chunk)
    size = sum(memoryview(part).nbytes for part in fields)
    return b"".join([_key(_CHUNK_FIELD, _LENGTH), _varint(size), *fields])


class ChunkMessage:
    """A KVTransferMessage holding `kv_chunk`, serialized from its buffers when it goes on the wire."""

    __slots__ = ("kv_chunk", "_message")

    def __init__(self, kv_chunk: KVChunk):
        self.kv_chunk = kv_chunk
        self._message: common_pb2.KVTransferMessage | None = None

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (the protobuf message's interface)
        return "chunk" if group == "kind" else None

    @property
    def chunk(self) -> common_pb2.KVChunk:
        if self._message is None:
            self._message = common_pb2.KVTransferMessage.FromString(self.SerializeToString())
        return self._message.chunk

    def SerializeToString(self) -> bytes:  # noqa: N802
        return chunk_message_bytes(self.kv_chunk)

    def ByteSize(self) -> int:  # noqa: N802
        return len(self.SerializeToString())


def serialize(message) -> bytes:
    """The control stream's request serializer: a KVTransferMessage or a ChunkMessage."""
    return message.SerializeToString()
