"""Process logging: one JSON object per record (or a text line), with the current trace and span ids."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from opentelemetry import trace

# LogRecord attributes that are not the caller's `extra=` fields.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "trace_id", "span_id"}


class _TraceContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return True


class JsonFormatter(logging.Formatter):
    """Field names follow the OpenTelemetry log data model, so collectors map them without configuration."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds"),
            "severity": record.levelname,
            "service.name": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.trace_id:
            entry["trace_id"] = record.trace_id
            entry["span_id"] = record.span_id
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StreamEndDetachFilter(logging.Filter):
    """opentelemetry-instrumentation-grpc's server interceptor holds its span's context across the `yield` of a
    streaming RPC; when the stream is closed rather than exhausted (the scheduler ends a token worker's Decode
    stream once it has what it needs, a client cancels), the generator is finalised in another context and
    opentelemetry.context logs "Failed to detach context" at ERROR, though the span has ended and nothing
    else went wrong (open-telemetry/opentelemetry-python-contrib#2357, open). Such records go to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "opentelemetry.context" and record.getMessage() == "Failed to detach context":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_TraceContextFilter())
    handler.addFilter(_StreamEndDetachFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {service} [trace=%(trace_id)s span=%(span_id)s] %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
