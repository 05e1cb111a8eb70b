"""OpenAI request bodies -> the gateway's Generate arguments, and the scheduler's statuses -> OpenAI's errors."""

import grpc
import pytest

from services.gateway.openai_api import APIError, ParsedRequest, Shaper, from_grpc, parse_chat, parse_completion
from splitwise.client import Chunk

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body) -> APIError:
    with pytest.raises(APIError) as raised:
        parse(body)
    assert raised.value.status == 400
    return raised.value


def test_a_chat_body_becomes_generate_arguments():
    parsed = parse_chat({**CHAT, "messages": [{"role": "developer", "content": "be terse"},
                                              {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                           {"type": "text", "text": "b"}]}],
                         "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n",
                         "logprobs": True, "top_logprobs": 2, "user": "u1", "n": 1, "stream": True,
                         "stream_options": {"include_usage": True}, "frequency_penalty": 0})
    assert parsed.arguments == {"messages": [{"role": "system", "content": "be terse"},
                                             {"role": "user", "content": "ab"}],
                                "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n"]}
    assert (parsed.stream, parsed.include_usage, parsed.logprobs, parsed.top_logprobs, parsed.user) == (
        True, True, True, 2, "u1")


def test_a_completion_takes_text_or_token_ids_one_prompt_at_a_time():
    assert parse_completion({"model": "m", "prompt": "hello"}).arguments == {"prompt": "hello"}
    assert parse_completion({"model": "m", "prompt": [[1, 2, 3]], "logprobs": 3}).arguments == {"token_ids": [1, 2, 3]}
    assert parse_completion({"model": "m", "prompt": [1, 2], "logprobs": 0}).logprobs
    assert not parse_completion({"model": "m", "prompt": [1, 2]}).logprobs
    assert refused(parse_completion, {"model": "m", "prompt": ["a", "b"]}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": ""}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": [1, 1 << 40]}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": [1, -2]}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": [1.5]}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "echo": True}).param == "echo"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "best_of": 2}).param == "best_of"
    assert refused(parse_completion, {"model": "m", "prompt": "x", "suffix": "y"}).param == "suffix"


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("tools", []), ("tool_choice", "auto"), ("response_format", {"type": "text"}),
    ("logit_bias", {}), ("presence_penalty", 1.0), ("frequency_penalty", -1), ("store", True),
    ("unheard_of", 1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True), ("temperature", -1),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("seed", 1 << 64), ("stop", [1]), ("top_logprobs", 3),
    ("top_logprobs", 21), ("logprobs", 1), ("user", "x" * 300), ("stream", "yes"), ("model", 3),
    ("max_tokens", 1 << 31), ("top_k", 1 << 40), ("temperature", float("nan")), ("top_p", float("inf")),
])
def test_a_field_that_cannot_be_honoured_is_refused_by_name(field, value):
    error = refused(parse_chat, {**CHAT, field: value})
    assert error.param == field
    assert field in error.message


def test_messages_are_checked_one_by_one():
    assert refused(parse_chat, {"model": "m", "messages": []}).param == "messages"
    assert refused(parse_chat, {"model": "m"}).param == "messages"
    assert refused(parse_chat, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}).param == "messages[0]"
    assert refused(parse_chat, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}).param == \
        "messages[0].role"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    assert refused(parse_chat, {"model": "m", "messages": [{"role": "user", "content": image}]}).param == \
        "messages[0].content"
    assert refused(parse_chat, {"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]}).param \
        == "messages[0].name"
    assert parse_chat({"messages": CHAT["messages"]}).model == ""  # the served model
    assert refused(parse_chat, [CHAT]).message == "the request body must be a JSON object"
    assert refused(parse_chat, {**CHAT, "max_tokens": 3, "max_completion_tokens": 4}).param == "max_tokens"
    assert parse_chat({**CHAT, "max_tokens": 3, "max_completion_tokens": 3}).arguments["max_tokens"] == 3
    assert parse_completion({"prompt": "x", "max_completion_tokens": 5}).arguments["max_tokens"] == 5
    assert refused(parse_completion, {"prompt": "x", "max_completion_tokens": 0}).param == "max_completion_tokens"
    assert refused(parse_chat, {**CHAT, "stream_options": {"include_usage": True}}).param == "stream_options"


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code, details, trailing=()):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.ALREADY_EXISTS, 409),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500),
])
def test_scheduler_statuses_become_http_statuses_with_the_schedulers_message(code, status):
    error = from_grpc(FakeRpcError(code, "what went wrong"))
    assert (error.status, error.message) == (status, "what went wrong")
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_the_retry_hint_becomes_retry_after_in_whole_seconds():
    hint = (("grpc-retry-pushback-ms", "1500"),)
    assert from_grpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", hint)).headers == {"Retry-After": "2"}
    assert from_grpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")).headers == {"Retry-After": "1"}


def test_stream_chunks_and_the_whole_completion_agree():
    parsed = ParsedRequest("completion", "m", True, True, True, 0, "", {})
    chunks = [Chunk("r", [5], "Hel"), Chunk("r", [6], ""), Chunk("r", [7], "lo", "length", 3, 3)]
    for chunk, logprob in zip(chunks, (-0.1, -0.2, -0.3)):
        chunk.logprobs = [logprob]
    names = {5: "Hel", 6: "\ufffd", 7: "lo"}
    streamed = Shaper(parsed, "r", "m", names.get)
    events = [streamed.stream_chunk(c) for c in chunks]
    assert [e["choices"][0]["text"] for e in events] == ["Hel", "", "lo"]  # a token with no text yet still counts
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events] == [[0], [3], [4]]
    assert streamed.usage_chunk()["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    whole = Shaper(ParsedRequest("completion", "m", False, False, True, 0, "", {}), "r", "m", names.get)
    body = whole.completion(chunks)
    assert body["choices"][0]["text"] == "Hello" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-0.1, -0.2, -0.3]
    assert body["choices"][0]["logprobs"]["top_logprobs"] is None


FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "logprobs", "top_logprobs", "user", "n", "stream", "stream_options", "ignore_eos", "echo",
          "frequency_penalty", "presence_penalty", "best_of", "tools", "suffix", "store"]


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=True) | st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "include_usage"]) | st.text(max_size=4), inner,
        max_size=4), max_leaves=12)


def test_any_json_body_is_parsed_or_refused_with_a_400_and_what_is_parsed_builds_a_request():
    """Hostile bodies: every value in every field. The parser answers a ParsedRequest or an APIError, never another
    exception, and what it accepts always makes a valid gRPC request (no protobuf range error at send time)."""
    from hypothesis import given, settings, strategies as st

    from splitwise.client import build_request

    @settings(max_examples=600, deadline=None)
    @given(st.dictionaries(st.sampled_from(FIELDS), _json_values(), max_size=8), st.sampled_from(["chat", "completion"]))
    def check(body, endpoint):
        parse = parse_chat if endpoint == "chat" else parse_completion
        try:
            parsed = parse(body)
        except APIError as e:
            assert e.status == 400 and e.message
            return
        build_request(**parsed.arguments, logprobs=parsed.logprobs, top_logprobs=parsed.top_logprobs)

    check()
