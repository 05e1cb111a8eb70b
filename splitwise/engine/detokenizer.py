"""Incremental detokenization with stop strings, as the scheduler streams a request's output.

Each step decodes only a window of the last few tokens and searches only the new text (and the tail before it a
stop string could start in), so a request's whole output costs time linear in its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# New tokens decoded together at most while their text is undecided (it ends in an incomplete UTF-8 sequence, or
# they decode to nothing yet); past that it is taken as it is, replacement characters included, so that a model
# emitting invalid bytes or a run of special tokens costs no more.
MAX_PENDING_TOKENS = 8
INCOMPLETE = "\ufffd"


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

    def find(self, text: str) -> int | None:
        """Where the earliest stop string in `text` starts, or None; `text` only ever grows between calls."""
        start = max(0, self.searched_chars - self.hold_chars)
        self.searched_chars = len(text)
        found = None
        for stop in self.stop:
            self.scanned_chars += len(text) - start
            at = text.find(stop, start, None if found is None else found + len(stop))
            if at != -1 and (found is None or at < found):
                found = at
        return found


@dataclass
class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Text that might be the beginning of a stop string, or an incomplete UTF-8 sequence, is held back
    until it is decided.
    """

    tokenizer: object
    stop: Sequence[str] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far
    emitted_chars: int = 0
    _prefix_at: int = 0  # tokens [_prefix_at, _read_at) are decoded again with the new ones, for their context
    _read_at: int = 0  # tokens before this are in `text`
    _matcher: StopMatcher = field(init=False)

    def __post_init__(self):
        self._matcher = StopMatcher(self.stop)

    def add(self, token_ids: Sequence[int], final: bool = False) -> TextDelta:
        self.token_ids.extend(token_ids)
        self._decode_new(final)
        at = self._matcher.find(self.text)
        if at is not None:
            return self._emit(at, stopped=True)
        if final:
            return self._emit(len(self.text), stopped=False)
        return self._emit(len(self.text) - self._matcher.hold_chars, stopped=False)

    @property
    def scanned_chars(self) -> int:
        return self._matcher.scanned_chars

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self, final: bool) -> None:
        # Decoding the new tokens after the previous ones and cutting the previous ones' text off gives the new
        # text as the whole output's decode spells it (a SentencePiece token's leading space, for one).
        window = self.token_ids[self._prefix_at:]
        before = self._decode(self.token_ids[self._prefix_at:self._read_at])
        after = self._decode(window)
        decided = len(after) > len(before) and not after.endswith(INCOMPLETE)
        if decided or final or len(self.token_ids) - self._read_at > MAX_PENDING_TOKENS:
            self.text += after[len(before):]
            self._prefix_at, self._read_at = self._read_at, len(self.token_ids)

    def _emit(self, end: int, stopped: bool) -> TextDelta:
        end = min(end, len(self.text))
        delta = self.text[self.emitted_chars:end] if end > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, end)
        return TextDelta(delta, stopped)
