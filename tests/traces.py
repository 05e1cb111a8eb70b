"""Reading a request's trace from the services' JSON-lines exports, for the tests that check it is whole."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from splitwise.telemetry.jsonl_exporter import read_spans

SCHEDULER_GENERATE = ("/splitwise.v1.Scheduler/Generate", "SERVER")


def request_trace(paths: list[Path], request_id: str) -> list[dict]:
    """Every exported span sharing a trace id with a span tagged with `request_id`."""
    spans = []
    for path in paths:
        try:
            spans += read_spans(path)
        except json.JSONDecodeError:  # a line being written right now: the next read gets it whole
            return []
    trace_ids = {s["trace_id"] for s in spans if s["attributes"].get("splitwise.request_id") == request_id}
    return [s for s in spans if s["trace_id"] in trace_ids]


def tops(spans: list[dict]) -> list[dict]:
    """The spans whose parent is not among `spans`."""
    ids = {s["span_id"] for s in spans}
    return [s for s in spans if s["parent_span_id"] not in ids]


def is_whole(spans: list[dict]) -> bool:
    """One trace, one tree: a single top span, either a root or the scheduler's Generate (whose parent is the
    client's span, exported by the client's process if it traces at all)."""
    top = tops(spans)
    return (len({s["trace_id"] for s in spans}) == 1 and len(top) == 1
            and (top[0]["parent_span_id"] is None or (top[0]["name"], top[0]["kind"]) == SCHEDULER_GENERATE))


async def wait_for_whole_trace(paths: list[Path], request_id: str, timeout_s: float = 10.0) -> list[dict]:
    """The request's spans once they form a whole tree (a service may end its span just after the client's
    last reply); after `timeout_s`, whatever is there, for the caller's assertions to describe."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = request_trace(paths, request_id)
        if (spans and is_whole(spans)) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)
