"""The only place protobuf messages become dataclasses and back."""

from __future__ import annotations

from typing import Sequence

import grpc

from splitwise.cluster.registry import WorkerInfo
from splitwise.engine.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.kv.chunks import KVChunk
from splitwise.kv.layout import KVLayout
from splitwise.kv.transport.base import TransportOffer
from splitwise.rpc.v1 import common_pb2, scheduler_pb2, worker_pb2



def status_code(value: int) -> grpc.StatusCode:
    """A gRPC status code sent as its number; UNAVAILABLE for OK, unset or unknown numbers."""
    for code in grpc.StatusCode:
        if code.value[0] == value and code != grpc.StatusCode.OK:
            return code
    return grpc.StatusCode.UNAVAILABLE


def sampling_from_pb(msg: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=list(params.stop),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def top_logprobs_to_pb(top: Sequence[tuple[int, float]]) -> common_pb2.TopLogprobs:
    return common_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])


def top_logprobs_from_pb(msg: common_pb2.TopLogprobs) -> tuple[tuple[int, float], ...]:
    return tuple(zip(msg.token_ids, msg.logprobs))


def layout_to_pb(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        model_fingerprint=layout.model_fingerprint,
    )


def layout_from_pb(msg: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.dtype, msg.model_fingerprint)


def chunk_to_pb(chunk: KVChunk) -> common_pb2.KVTransferMessage:
    return common_pb2.KVTransferMessage(
        chunk=common_pb2.KVChunk(
            layer=chunk.layer,
            token_start=chunk.token_start,
            token_count=chunk.token_count,
            key=bytes(chunk.key),  # (a chunk's bytes may be a buffer: ChunkMessage writes them without this copy)
            value=bytes(chunk.value),
            xxh3=chunk.xxh3,
            staged=chunk.staged,
            num_layers=chunk.num_layers if chunk.num_layers != 1 else 0,
        )
    )


def chunk_from_pb(msg: common_pb2.KVChunk) -> KVChunk:
    return KVChunk(msg.layer, msg.token_start, msg.token_count, msg.key, msg.value, msg.xxh3, msg.staged,
                   msg.num_layers or 1)


def worker_to_pb(worker: WorkerInfo, now: float, pool: str = "") -> scheduler_pb2.WorkerStatus:
    return scheduler_pb2.WorkerStatus(
        pool=pool or worker.role,
        worker_id=worker.worker_id,
        role=worker.role,
        address=worker.address,
        model=worker.model,
        pending_tokens=worker.pending_tokens,
        active_requests=worker.active_requests,
        kv_capacity_tokens=worker.kv_capacity_tokens,
        kv_used_tokens=worker.kv_used_tokens,
        heartbeat_age_s=max(0.0, now - worker.heartbeat_at),
    )


def offer_to_pb(offer: TransportOffer) -> common_pb2.KVTransportOffer:
    return common_pb2.KVTransportOffer(
        transport=offer.transport, host_id=offer.host_id, shm_name=offer.shm_name,
        mooncake_session=offer.mooncake_session, buffer_address=offer.buffer_address, buffer_bytes=offer.buffer_bytes,
        layer_runs=offer.layer_runs,
    )


def offer_from_pb(msg: common_pb2.KVTransportOffer) -> TransportOffer:
    return TransportOffer(msg.transport or "grpc", msg.host_id, msg.shm_name, msg.mooncake_session,
                          msg.buffer_address, msg.buffer_bytes, msg.layer_runs)


# The engine's ways a request ends for its client, as the contract's.
FINISH_REASONS = {FinishReason.STOP: common_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH}


def finish_reason_to_pb(reason) -> int:
    """The engine's STOP and LENGTH as the contract's; any other (or None) as UNSPECIFIED."""
    return FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)


def decode_mode_of(prefill_here: bool, from_store: bool, resumed: bool) -> int:
    """The DecodeMode a Decode request's fields imply (worker.proto): computed on the token worker, else pushed by a
    prompt worker, relayed through the kv_store, or a resumed request's kept copy there. Raises ValueError for a
    resumed request whose KV a prompt worker would push (there is none: it ran before)."""
    if prefill_here:
        return worker_pb2.DECODE_MODE_PREFILL_HERE
    if from_store:
        return worker_pb2.DECODE_MODE_RESUME_KEPT if resumed else worker_pb2.DECODE_MODE_RELAYED
    if resumed:
        raise ValueError("a resumed request takes its prompt KV from the kv_store, or prefills here")
    return worker_pb2.DECODE_MODE_PUSHED
