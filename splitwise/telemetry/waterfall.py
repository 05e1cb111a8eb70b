"""Renders one request's trace, read from the JSON-lines span files, as a waterfall in the terminal or as a PNG."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

REQUEST_ID = "splitwise.request_id"
KEY_ATTRIBUTES = ("prompt.tokens", "completion.tokens", "decode.tokens", "kv.bytes", "kv.layers", "kv.transport",
                  "kv.bandwidth_mbps", "finish_reason", "route.prompt_worker", "route.token_worker")
MAX_VALUE_CHARS = 24


@dataclass
class Row:
    span: dict
    depth: int
    parent_missing: bool


def load_spans(paths: Iterable[str | Path]) -> tuple[list[dict], list[Path]]:
    """All spans in the given files, a directory meaning every *.jsonl in it; and the files read."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.is_file() else []
    spans = []
    for file in files:
        for line in file.read_text().splitlines():
            try:
                spans.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # blank, or a line a live service is writing right now
    return spans, files


def _carries(span: dict, request_id: str) -> bool:
    rid = str(span.get("attributes", {}).get(REQUEST_ID, ""))
    return rid == request_id or rid.startswith(request_id + "/")  # retries: "<rid>/attempt-2" on worker spans


def find_trace(paths: Iterable[str | Path], request_id: str) -> tuple[list[dict], int]:
    """The spans of the most recent trace carrying request_id, and how many traces carry it."""
    paths = list(paths)
    spans, files = load_spans(paths)
    latest_start_ns: dict[str, int] = {}
    for s in spans:
        if _carries(s, request_id):
            latest_start_ns[s["trace_id"]] = max(latest_start_ns.get(s["trace_id"], 0), s["start_ns"])
    if not latest_start_ns:
        where = ", ".join(map(str, paths))
        if not files:
            raise LookupError(f"no span files (*.jsonl) at {where}; `splitwise up` writes them to RUN_DIR/traces")
        recent = sorted((s for s in spans if s.get("parent_span_id") is None and REQUEST_ID in s["attributes"]),
                        key=lambda s: s["start_ns"])[-3:]
        hint = f"; most recent: {', '.join(s['attributes'][REQUEST_ID] for s in reversed(recent))}" if recent else ""
        raise LookupError(f"no span carries request id {request_id!r}: searched {len(spans)} spans "
                          f"in {len(files)} files at {where}{hint}")
    trace_id = max(latest_start_ns, key=latest_start_ns.get)
    return [s for s in spans if s["trace_id"] == trace_id], len(latest_start_ns)


def span_tree(spans: list[dict]) -> list[Row]:
    """Spans depth-first, children by start time; a span whose parent is not in the trace starts a new tree."""
    ids = {s["span_id"] for s in spans}
    children, roots = defaultdict(list), []
    for s in sorted(spans, key=lambda s: s["start_ns"]):
        parent = s.get("parent_span_id")
        (children[parent] if parent in ids else roots).append(s)
    rows = []

    def visit(span: dict, depth: int, parent_missing: bool) -> None:
        rows.append(Row(span, depth, parent_missing))
        for child in children[span["span_id"]]:
            visit(child, depth + 1, False)

    for root in roots:
        visit(root, 0, root.get("parent_span_id") is not None)
    return rows


def _end_ns(span: dict) -> int:
    return span.get("end_ns") or span["start_ns"]


def _bounds_ns(spans: list[dict]) -> tuple[int, int]:
    return min(s["start_ns"] for s in spans), max(_end_ns(s) for s in spans)


def _request_id(spans: list[dict]) -> str:
    carrying = sorted((s for s in spans if REQUEST_ID in s.get("attributes", {})), key=lambda s: s["start_ns"])
    return str(carrying[0]["attributes"][REQUEST_ID]) if carrying else "?"


def _value(key: str, value) -> str | None:
    if key.endswith(".bytes") and isinstance(value, (int, float)):
        for unit in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or unit == "GiB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else None


def _is_noise(key: str, value) -> bool:
    """The gRPC instrumentation's bookkeeping, which the span's name already says (a failure's status stays)."""
    if key == "rpc.grpc.status_code":
        return value == 0
    return key.startswith(("net.", "rpc.", "network.", "server.", "client."))


def _details(row: Row, t0_ns: int, request_id: str) -> list[str]:
    s, attrs = row.span, row.span.get("attributes", {})
    parts = []
    if s.get("status") == "ERROR":
        parts.append(f"✗ ERROR: {s.get('status_message') or 'no message'}")
    if row.parent_missing:
        parts.append("(parent missing)")
    rid = str(attrs.get(REQUEST_ID, request_id))
    if rid != request_id:
        parts.append(rid.removeprefix(request_id + "/") if rid.startswith(request_id + "/") else f"request={rid}")
    keys = [k for k in KEY_ATTRIBUTES if k in attrs] + sorted(k for k in attrs if k not in KEY_ATTRIBUTES
                                                              and not _is_noise(k, attrs[k]))
    parts += [f"{k}={v}" for k in keys if k != REQUEST_ID and (v := _value(k, attrs[k])) is not None]
    counts = Counter(e["name"] for e in s.get("events", []))
    for name, count in counts.items():
        if count > 1:
            parts.append(f"{name}×{count}")
            continue
        event = next(e for e in s["events"] if e["name"] == name)
        shown = [f"{k}={v}" for k, value in event.get("attributes", {}).items() if (v := _value(k, value)) is not None]
        parts.append(f"{name}@{(event['time_ns'] - t0_ns) / 1e6:.1f}ms" + (f"({','.join(shown)})" if shown else ""))
    return parts


def _bar(span: dict, t0_ns: int, ns_per_char: float, width: int) -> str:
    start = min(int((span["start_ns"] - t0_ns) / ns_per_char), width - 1)
    end = max(start + 1, min(math.ceil((_end_ns(span) - t0_ns) / ns_per_char), width))
    cells = [" "] * start + ["█"] * (end - start) + [" "] * (width - end)
    for event in span.get("events", []):
        col = max(0, min(int((event["time_ns"] - t0_ns) / ns_per_char), width - 1))
        cells[col] = "▼" if event["name"].startswith("first_token") else "|"
    return "".join(cells)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_text(spans: list[dict], width: int | None = None) -> str:
    """A header, an axis, and per span: name (indented by depth), service, bar, start and duration in ms, details.

    Details that do not fit beside the bar go on the next lines, under it."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = span_tree(spans)
    t0_ns, t1_ns = _bounds_ns(spans)
    total_ms = (t1_ns - t0_ns) / 1e6
    request_id = _request_id(spans)
    services = list(dict.fromkeys(r.span.get("service") or "?" for r in rows))
    name_w = min(36, max(len("  " * r.depth + r.span["name"]) for r in rows))
    service_w = min(16, max(map(len, services)))
    indent = " " * (name_w + service_w + 2)
    bar_w = max(16, min(60, (width - len(indent) - 2 * 9 - 4) // 2))
    ns_per_char = max(t1_ns - t0_ns, 1) / bar_w
    lines = [
        _fit(f"trace {spans[0]['trace_id']}  request {request_id}  {total_ms:.1f} ms  {len(spans)} spans  "
             f"{len(services)} services ({', '.join(services)})", width),
        f"{'span':<{name_w}} {'service':<{service_w}} │{'0 ms':<{bar_w - 12}}{f'{total_ms:.1f} ms':>12}│"
        f" {'start ms':>9}{'dur ms':>9}",
    ]
    for row in rows:
        s = row.span
        name = _fit("  " * row.depth + s["name"], name_w)
        line = (f"{name:<{name_w}} {_fit(s.get('service') or '?', service_w):<{service_w}} "
                f"│{_bar(s, t0_ns, ns_per_char, bar_w)}│ {(s['start_ns'] - t0_ns) / 1e6:>9.1f}"
                f"{(_end_ns(s) - s['start_ns']) / 1e6:>9.1f}")
        details = "  ".join(_details(row, t0_ns, request_id))
        if len(line) + 2 + len(details) <= width:
            lines.append(f"{line}  {details}".rstrip())
        else:
            lines += [line, *textwrap.wrap(details, max(width, len(indent) + 40), initial_indent=indent + " ",
                                           subsequent_indent=indent + " ", break_on_hyphens=False)]
    lines.append(f"{indent}█ span  ▼ first token  | other event")
    return "\n".join(lines)


def render_png(spans: list[dict], path: str | Path) -> None:
    """A horizontal bar per span in tree order, colored by service; event ticks; error spans outlined in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = span_tree(spans)
    t0_ns, t1_ns = _bounds_ns(spans)
    services = list(dict.fromkeys(r.span.get("service") or "?" for r in rows))
    fig = Figure(figsize=(12, max(2.5, 0.4 * len(rows) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {name: f"C{i % 10}" for i, name in enumerate(services)}
    min_width_ms = (t1_ns - t0_ns) / 1e6 / 400  # an instant span still shows
    for y, row in enumerate(rows):
        s, error = row.span, row.span.get("status") == "ERROR"
        start_ms, dur_ms = (s["start_ns"] - t0_ns) / 1e6, (_end_ns(s) - s["start_ns"]) / 1e6
        ax.barh(y, max(dur_ms, min_width_ms), left=start_ms, height=0.6, color=colors[s.get("service") or "?"],
                edgecolor="red" if error else "none", linewidth=2 if error else 0)
        for event in s.get("events", []):
            x = (event["time_ns"] - t0_ns) / 1e6
            if event["name"].startswith("first_token"):
                ax.plot(x, y - 0.42, marker="v", color="black", markersize=6)
            else:
                ax.vlines(x, y - 0.3, y + 0.3, color="black", linewidth=0.6)
    labels = [f"{'   ' * r.depth}{r.span['name']} ({r.span.get('service') or '?'})"
              + (" (parent missing)" if r.parent_missing else "") for r in rows]
    # Left-aligned monospace labels, so that the indentation shows the tree.
    ax.set_yticks(range(len(rows)), labels, fontsize=8, fontfamily="monospace")
    ax.tick_params(axis="y", pad=0.6 * 8 * max(map(len, labels)) + 4)
    for tick, row in zip(ax.get_yticklabels(), rows):
        tick.set_horizontalalignment("left")
        if row.span.get("status") == "ERROR":
            tick.set_color("red")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("ms from trace start")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"request {_request_id(spans)}: {(t1_ns - t0_ns) / 1e6:.1f} ms (trace {spans[0]['trace_id'][:16]})")
    handles = [Patch(color=colors[name], label=name) for name in services]
    handles += [Line2D([], [], color="black", marker="v", linestyle="none", label="first token"),
                Line2D([], [], color="black", marker="|", linestyle="none", label="event"),
                Patch(facecolor="white", edgecolor="red", linewidth=2, label="error")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
