import pytest

from splitwise.engine.detokenizer import Detokenizer
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
