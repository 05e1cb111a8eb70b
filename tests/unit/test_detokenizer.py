import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from splitwise.engine.detokenizer import (INCOMPLETE, MAX_PENDING_TOKENS, Detokenizer, StopCondition, StopMatcher,
                                          text_decoder)
from splitwise.engine.sampling import SampledToken
from splitwise.model.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(tokenizer, text: str, stop=()) -> tuple[str, bool]:
    detok = Detokenizer(tokenizer, stop)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = ""
    for i, token in enumerate(ids):
        delta = detok.add([token], final=i == len(ids) - 1)
        out += delta.text
        if delta.stopped:
            return out, True
    return out, False


def test_streamed_text_equals_the_whole_decode_including_multibyte_characters(tokenizer):
    text = "héllo wörld — 東京 ✓"
    assert stream(tokenizer, text) == (text, False)


def test_stop_string_spanning_tokens_ends_the_text_before_it(tokenizer):
    assert stream(tokenizer, "one two STOP three", stop=("STOP",)) == ("one two ", True)


def test_text_that_only_starts_like_a_stop_string_is_released(tokenizer):
    assert stream(tokenizer, "ST STO STOP!", stop=("STOP!!",)) == ("ST STO STOP!", False)


class CountingDecodes:
    """The real tokenizer, counting the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded_tokens = 0

    def decode(self, ids, **kwargs):
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_the_earliest_stop_string_in_a_delta_ends_the_text_whichever_is_listed_first(tokenizer):
    detok = Detokenizer(tokenizer, ("three", "two"))
    delta = detok.add(tokenizer.encode("one two three four", add_special_tokens=False))
    assert (delta.text, delta.stopped) == ("one ", True)


def test_each_token_is_decoded_a_bounded_number_of_times_however_long_the_output(tokenizer):
    ids = tokenizer.encode("a long output, ünïcödé included. " * 100, add_special_tokens=False)
    counting = CountingDecodes(tokenizer)
    detok = Detokenizer(counting)
    text = "".join(detok.add([token], final=i == len(ids) - 1).text for i, token in enumerate(ids))
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded_tokens <= 4 * len(ids)  # decoding the whole output at every token: len(ids)**2 / 2


def test_a_run_of_tokens_that_decode_to_nothing_is_not_decoded_again_and_again(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    counting = CountingDecodes(tokenizer)
    detok = Detokenizer(counting)
    for _ in range(2000):
        assert detok.add([eos]).text == ""
    assert detok.add(tokenizer.encode("done", add_special_tokens=False), final=True).text == "done"
    assert counting.decoded_tokens <= 3 * (MAX_PENDING_TOKENS + 1) * 2010  # the whole output each time: 2010**2 / 2


def test_stop_matching_looks_at_each_new_character_and_the_tail_before_it_only():
    stop = ("never-there", "not-here-either")
    matcher = StopMatcher(stop)
    text = ""
    for _ in range(3000):
        text += "x"
        assert matcher.find(text) is None
    assert matcher.scanned_chars <= len(stop) * 3000 * (1 + matcher.hold_chars)  # not the whole text each time
    assert matcher.find(text + "not-here-either") == 3000


def test_a_stream_whose_every_step_ends_inside_a_character_streams_each_whole_character_once_complete(tokenizer):
    text = "東京" * 20
    ids = tokenizer.encode(text, add_special_tokens=False)  # three byte tokens per character
    detok = Detokenizer(tokenizer)
    out = ""
    for at in range(0, len(ids), 2):  # two at a time: most steps end inside a character
        out += detok.add(ids[at:at + 2], final=at + 2 >= len(ids)).text
        assert out == text[:(at + 2) // 3]
    assert out == text


def test_a_fast_tokenizer_is_decoded_by_its_backend_exactly_as_by_its_python_decode(tokenizer):
    decode = text_decoder(tokenizer)
    ids = tokenizer.encode("<|im_start|>héllo 世界 😀 and\nmore<|im_end|>", add_special_tokens=False)
    for end in range(len(ids) + 1):
        for start in range(0, end, 3):
            assert decode(ids[start:end]) == tokenizer.decode(ids[start:end], skip_special_tokens=True)


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_by_its_python_decode():
    tokenizer = build_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    calls = []
    real_decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kwargs: calls.append(ids) or real_decode(ids, **kwargs)
    assert text_decoder(tokenizer)([300, 301]) == real_decode([300, 301], skip_special_tokens=True)
    assert calls == [[300, 301]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="ab STOP\nü東😀", min_size=1, max_size=40), data=st.data())
def test_the_engine_ends_at_the_token_that_completes_a_stop_string_and_the_streamed_text_ends_before_it(
        tokenizer, text, data):
    """One algorithm for both sides: the engine's StopCondition, fed token by token, is met at the first token whose
    text holds a stop string, and the scheduler's Detokenizer, fed the same tokens in any chunks, cuts the text
    where that stop string begins."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:start + data.draw(st.integers(1, 4))]
    condition = StopCondition(tokenizer, (stop,))
    output = []
    for token in ids:
        output.append(SampledToken(token, 0.0))
        if condition.met(output):
            break
    assert len(output) == next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]).rstrip(INCOMPLETE))

    detok, streamed, at = Detokenizer(tokenizer, (stop,)), "", 0
    while at < len(output):  # the tokens the engine sent, in messages of any size
        end = min(len(output), at + data.draw(st.integers(1, 5)))
        delta = detok.add(ids[at:end], final=end == len(output))
        assert delta.stopped == (end == len(output))
        streamed, at = streamed + delta.text, end
    assert streamed == text[:text.index(stop)]
