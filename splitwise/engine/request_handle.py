"""The asyncio side of one request in the engine: the tokens it samples, then how it ended (Finished), or why it
failed (RequestFailed)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from splitwise.engine.sampling import NonFiniteLogits, SampledToken
from splitwise.engine.sequence import FinishReason, Sequence


@dataclass(frozen=True)
class Finished:
    reason: FinishReason


class RequestFailed(Exception):
    """The engine could not go on with this request; the message says why in plain words. `corrupt`: the
    request's own state was bad (its logits not finite, from corrupt KV); otherwise the engine failed."""

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


def failure_of(error: Exception) -> RequestFailed:
    """What a request is told of the exception that ended it (the log has the details)."""
    if isinstance(error, NonFiniteLogits):
        return RequestFailed(str(error), corrupt=True)
    return RequestFailed("the engine failed while computing this request (the worker's log has the details)")


class RequestHandle:
    """The asyncio side of one request: tokens as they are sampled, then Finished (or RequestFailed). A token that
    ends the request comes with its Finished at once, so that whoever relays it can say so with it (`ended`)."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop):
        self.seq = seq
        self._loop = loop
        self._events: collections.deque = collections.deque()
        self._arrived = asyncio.Event()

    def _deliver(self, *events) -> None:  # engine thread: these events in one go
        try:
            self._loop.call_soon_threadsafe(self._put, events)
        except RuntimeError:  # the event loop is gone: nobody is waiting
            pass

    def _put(self, events) -> None:
        self._events.extend(events)
        self._arrived.set()

    async def next_event(self) -> SampledToken | Finished:
        while not self._events:
            self._arrived.clear()
            await self._arrived.wait()
        event = self._events.popleft()
        if isinstance(event, BaseException):
            raise event
        return event

    def ended(self) -> Finished | None:
        """How the request ended, if the token just read was its last (the engine delivered them together)."""
        if self._events and isinstance(self._events[0], Finished):
            return self._events.popleft()
        return None
