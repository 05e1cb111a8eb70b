"""Asyncio around Redis calls."""

from __future__ import annotations

import asyncio
import functools


def keeps_cancellation(call):
    """Makes an async Redis call raise CancelledError when its task was cancelled during it, whatever the call did.

    With a socket_timeout, redis-py sends each command through asyncio.wait_for, which before Python 3.12 returns
    normally when its caller is cancelled just as the send completes (CPython gh-86296): the command then runs on
    and its caller with it, as if never cancelled (a kv_store Get then waited its whole wait_s for a gone client).
    """

    @functools.wraps(call)
    async def keeping(*args, **kwargs):
        task = asyncio.current_task()
        cancelling = task.cancelling()

        def raise_if_cancelled() -> None:
            if task.cancelling() > cancelling:  # a cancellation requested meanwhile, and not taken back
                raise asyncio.CancelledError(f"cancelled during {call.__qualname__}")

        try:
            result = await call(*args, **kwargs)
        except Exception:
            raise_if_cancelled()
            raise
        raise_if_cancelled()
        return result

    return keeping
