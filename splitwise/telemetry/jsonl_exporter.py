"""A span exporter that appends one JSON object per finished span to a file, for local inspection."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


# One encoder for every line (json.dumps with an argument builds a new encoder per call: half a span's export cost).
_ENCODER = json.JSONEncoder(default=str)


def _plain(attributes) -> dict:
    """A span's or event's attributes as a dict: the SDK's BoundedAttributes read through its dict (its mapping
    interface takes a lock per key)."""
    if not attributes:
        return {}
    return dict(getattr(attributes, "_dict", attributes))


def span_to_dict(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "duration_ms": (span.end_time - span.start_time) / 1e6 if span.end_time else None,
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "attributes": _plain(span.attributes),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": _plain(e.attributes)} for e in span.events],
    }


class JsonLinesSpanExporter(SpanExporter):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = None  # opened at the first span, kept open: a span costs a write, not an open and a close

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(_ENCODER.encode(span_to_dict(s)) + "\n" for s in spans)
        with self._lock:
            if self._file is None:
                self._file = self.path.open("a")
            self._file.write(lines)
            self._file.flush()  # in the file when export returns, as a reader of a finished request expects
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_spans(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
