"""Incremental detokenization with stop strings: the engine's stop condition (StopCondition) and the text the
scheduler streams (Detokenizer), one algorithm for both, so the token a stop string ends a request at is the token the
streamed text is cut at.

Each step decodes only a window of the last few tokens and searches only the new text (and the tail before it a
stop string could start in), so a request's whole output costs time linear in its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

# New tokens that decode to nothing (special tokens) are decoded again with the next ones at most this many times.
MAX_PENDING_TOKENS = 8
INCOMPLETE = "\ufffd"


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """The tokenizer's decode of a list of ids without special tokens. A fast (Rust) tokenizer that cleans up no
    spaces decodes exactly as its Rust backend does: that is called directly, without transformers' Python wrapper
    (argument conversion, batch detection), which costs more than the decode itself at a few tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class TextDelta:
    text: str
    stopped: bool  # a stop string was found; the text before it has been emitted


@dataclass
class StopMatcher:
    """Finds the earliest stop string in a growing text, looking at each character a bounded number of times."""

    stop: Sequence[str] = ()
    searched_chars: int = 0  # the text before this holds no stop string
    scanned_chars: int = 0  # characters looked at so far, summed over the stop strings: the work done

    @property
    def hold_chars(self) -> int:
        """Characters at the end of the text that may be the beginning of a stop string."""
        return max((len(s) - 1 for s in self.stop), default=0)

    def find(self, text: str, text_at: int = 0) -> int | None:
        """Where the earliest stop string starts in the growing text, or None. `text` is its end from offset
        `text_at` on, at least the hold_chars before what an earlier call saw."""
        start = max(0, self.searched_chars - self.hold_chars - text_at)
        self.searched_chars = text_at + len(text)
        found = None
        for stop in self.stop:
            self.scanned_chars += len(text) - start
            at = text.find(stop, start, None if found is None else found + len(stop))
            if at != -1 and (found is None or at < found):
                found = at
        return None if found is None else text_at + found


@dataclass
class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Text that might be the beginning of a stop string, or an incomplete UTF-8 sequence, is held back
    until it is decided.
    """

    tokenizer: object
    stop: Sequence[str] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    _recent: str = ""  # the text from _recent_at on: what is held back, and the tail a stop string may start in
    _recent_at: int = 0
    _prefix_at: int = 0  # tokens [_prefix_at, _read_at) are decoded again with the new ones, for their context
    _read_at: int = 0  # tokens before this are in the text
    _taken_chars: int = 0  # whole characters of the text of tokens [_read_at, ...) taken already
    stopped: bool = False  # a stop string was found: no text after it is emitted
    _matcher: StopMatcher = field(init=False)
    _decode: Callable[[list[int]], str] = field(init=False)

    def __post_init__(self):
        self._matcher = StopMatcher(self.stop)
        self._decode = text_decoder(self.tokenizer)

    def add(self, token_ids: Sequence[int], final: bool = False) -> TextDelta:
        if self.stopped:
            return TextDelta("", True)
        self.token_ids.extend(token_ids)
        self._recent += self._decode_new(final)
        end = self._recent_at + len(self._recent)
        at = self._matcher.find(self._recent, self._recent_at)
        if at is not None:
            self.stopped = True
            return self._emit(at, stopped=True)
        if final:
            return self._emit(end, stopped=False)
        return self._emit(end - self._matcher.hold_chars, stopped=False)

    @property
    def scanned_chars(self) -> int:
        return self._matcher.scanned_chars

    def _decode_new(self, final: bool) -> str:
        # Decoding the new tokens after the previous ones and cutting the previous ones' text off gives the new
        # text as the whole output's decode spells it (a SentencePiece token's leading space, for one).
        before = self._decode(self.token_ids[self._prefix_at:self._read_at])
        after = self._decode(self.token_ids[self._prefix_at:])
        complete = after if final else after.rstrip(INCOMPLETE)
        new = complete[len(before) + self._taken_chars:]
        self._taken_chars += len(new)
        ends_clean = not after.endswith(INCOMPLETE)
        # The window moves on once its text ends on a whole character (and has grown, or has not for a while:
        # tokens that decode to nothing); a window ending inside a character is never cut there.
        if ends_clean and (len(after) > len(before) or len(self.token_ids) - self._read_at > MAX_PENDING_TOKENS):
            self._prefix_at, self._read_at, self._taken_chars = self._read_at, len(self.token_ids), 0
        return new

    def _emit(self, end: int, stopped: bool) -> TextDelta:
        end = min(end, self._recent_at + len(self._recent))
        delta = ""
        if end > self.emitted_chars:
            delta = self._recent[self.emitted_chars - self._recent_at:end - self._recent_at]
        self.emitted_chars = max(self.emitted_chars, end)
        # Keep only what is held back and the tail the next stop string search starts in: appending to the whole
        # text would copy it at every step.
        keep_from = min(self.emitted_chars, self._recent_at + len(self._recent) - self._matcher.hold_chars)
        if keep_from > self._recent_at:
            self._recent = self._recent[keep_from - self._recent_at:]
            self._recent_at = keep_from
        return TextDelta(delta, stopped)


class StopCondition:
    """A request's stop strings as the engine's stop condition: whether its output's text holds one yet.

    It reads the output's tokens it has not seen at each check (those an earlier attempt sampled included, on a
    resumed request), with the Detokenizer the scheduler streams the text with.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self._detokenizer = Detokenizer(tokenizer, tuple(stop))
        self._read = 0  # output tokens looked at

    def met(self, output) -> bool:
        """Whether the text of `output` (the request's sampled tokens, each with its .token_id) holds a stop string."""
        if not self._detokenizer.stopped and len(output) > self._read:
            self._detokenizer.add([t.token_id for t in output[self._read:]])
            self._read = len(output)
        return self._detokenizer.stopped
