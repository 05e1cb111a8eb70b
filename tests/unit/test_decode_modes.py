"""The token worker's decode modes (worker.proto DecodeMode): named by the scheduler, or inferred from the request's
fields for a scheduler that names none; a named mode the fields contradict is refused."""

import pytest

from services.scheduler.dispatch import decode_mode as scheduler_mode
from services.worker.token_servicer import MODE_NAMES, decode_mode
from splitwise.rpc.v1 import worker_pb2

STORE = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address="store:1", request_id="r")
TOKEN_WORKER = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_TOKEN_WORKER, address="tw:1")

# (the scheduler's kv source, whether resumed) -> the mode, both as the scheduler names it and as the fields imply
CASES = [
    (TOKEN_WORKER, False, worker_pb2.DECODE_MODE_PUSHED),
    (STORE, False, worker_pb2.DECODE_MODE_RELAYED),
    (None, False, worker_pb2.DECODE_MODE_PREFILL_HERE),
    (None, True, worker_pb2.DECODE_MODE_PREFILL_HERE),
    (STORE, True, worker_pb2.DECODE_MODE_RESUME_KEPT),
]


def request(source, resumed: bool, mode: int = worker_pb2.DECODE_MODE_UNSPECIFIED) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id="r", kv_source=source, prefill_here=source is None,
                                    output_token_ids=[4, 5] if resumed else [], mode=mode)


@pytest.mark.parametrize("source, resumed, expected", CASES)
def test_the_mode_the_scheduler_names_is_the_one_the_fields_imply(source, resumed, expected):
    assert scheduler_mode(source, resumed) == expected
    assert decode_mode(request(source, resumed)) == expected  # an older scheduler's request: inferred
    assert decode_mode(request(source, resumed, expected)) == expected


@pytest.mark.parametrize("source, resumed, expected", CASES)
def test_every_other_named_mode_is_refused_with_what_the_fields_say(source, resumed, expected):
    for other in MODE_NAMES:
        if other in (expected, worker_pb2.DECODE_MODE_UNSPECIFIED):
            continue
        with pytest.raises(ValueError, match=f"decode mode {MODE_NAMES[other]}, but the request's fields say "
                                             f"{MODE_NAMES[expected]}"):
            decode_mode(request(source, resumed, other))


def test_a_resumed_request_with_kv_pushed_by_a_prompt_worker_is_refused_whatever_its_mode():
    for mode in MODE_NAMES:
        with pytest.raises(ValueError, match="a resumed request takes its prompt KV from the kv_store"):
            decode_mode(request(TOKEN_WORKER, True, mode))
