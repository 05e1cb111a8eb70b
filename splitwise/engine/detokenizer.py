"""Incremental detokenization with stop strings, as the scheduler streams a request's output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class TextDelta:
    text: str
    stopped: bool  # a stop string was found; the text before it has been emitted


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

    def add(self, token_ids: Sequence[int], final: bool = False) -> TextDelta:
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted_chars - len(stop) + 1))
            if at != -1:
                return self._emit(text, at, stopped=True)
        if final:
            return self._emit(text, len(text), stopped=False)
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._emit(text, max(self.emitted_chars, safe - hold), stopped=False)

    def _emit(self, text: str, end: int, stopped: bool) -> TextDelta:
        end = min(end, len(text))
        delta = text[self.emitted_chars : end] if end > self.emitted_chars else ""
        self.emitted_chars = max(self.emitted_chars, end)
        return TextDelta(delta, stopped)
