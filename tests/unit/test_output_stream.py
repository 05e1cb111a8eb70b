"""The scheduler's output stream: it cuts the text where a stop string begins, and whether a request ends is the
worker's engine's word, except for tokens a client sends to continue its stream (no worker has seen them)."""

import pytest

from services.scheduler.output import OutputStream
from splitwise.engine.sampling import SamplingParams
from splitwise.model.tiny import build_tokenizer
from splitwise.rpc.v1 import common_pb2

STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(tokenizer, **params) -> OutputStream:
    return OutputStream("r", tokenizer, SamplingParams(**params), prompt_tokens=3, eos_token_ids=frozenset({0}))


def test_the_text_ends_before_the_stop_string_the_engine_ended_the_request_at(tokenizer):
    output = stream(tokenizer, max_tokens=50, stop=("STOP",))
    ids = tokenizer.encode("one STOP", add_special_tokens=False)
    texts = [output.add([t]).text for t in ids[:-1]]
    last = output.add(ids[-1:], worker_finish_reason=STOP)
    assert "".join(texts) + last.text == "one "
    assert last.finish_reason == STOP and last.usage.completion_tokens == len(ids) and last.usage.prompt_tokens == 3
    assert list(last.token_ids) == ids[-1:]  # every token is reported, the stop string's too


def test_a_stop_string_the_engine_did_not_end_at_ends_nothing_here_and_no_text_follows_it(tokenizer):
    output = stream(tokenizer, max_tokens=50, stop=("STOP",))
    responses = [output.add([t]) for t in tokenizer.encode("one STOP two", add_special_tokens=False)]
    assert not output.finished and not any(r.HasField("usage") for r in responses)
    assert "".join(r.text for r in responses) == "one "
    assert sum(len(r.token_ids) for r in responses) == output.completion_tokens == len("one STOP two")


@pytest.mark.parametrize("text, reason, expected_text", [
    ("one STOP two", STOP, "one "),  # a stop string among them
    ("0123456789", LENGTH, "0123456789"),  # max_tokens reached
])
def test_tokens_a_client_continues_with_are_judged_here_by_the_engines_rules(tokenizer, text, reason, expected_text):
    output = stream(tokenizer, max_tokens=10, stop=("STOP",))
    response = output.add(tokenizer.encode(text, add_special_tokens=False), continued=True)
    assert (response.finish_reason, response.text) == (reason, expected_text)


def test_continued_tokens_that_end_nothing_leave_the_request_to_the_worker(tokenizer):
    output = stream(tokenizer, max_tokens=50, stop=("STOP",))
    response = output.add(tokenizer.encode("one two", add_special_tokens=False), continued=True)
    assert not output.finished and response.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
