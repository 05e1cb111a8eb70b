"""`splitwise trace` draws one request's spans, gathered from every service's span file, as a waterfall."""

import json

import pytest

from splitwise.cli import main
from splitwise.telemetry.waterfall import find_trace, render_png, render_text, span_tree

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
MS = 1_000_000
T0 = 1_700_000_000_000 * MS


def span(name, service, span_id, parent, start_ms, end_ms, trace_id=TRACE, status="UNSET", message=None, events=(),
         **attributes):
    return {"name": name, "service": service, "trace_id": trace_id, "span_id": span_id, "parent_span_id": parent,
            "kind": "INTERNAL", "start_ns": T0 + start_ms * MS, "end_ns": T0 + end_ms * MS,
            "duration_ms": end_ms - start_ms, "status": status, "status_message": message,
            "attributes": {k.replace("__", "."): v for k, v in attributes.items()},
            "events": [{"name": n, "time_ns": T0 + t * MS, "attributes": {"attempt": 1} if n == "retry" else {}}
                       for n, t in events]}


SCHEDULER = [
    span("scheduler.generate", "scheduler", "a1", None, 0, 100, events=[("retry", 4), ("first_token", 40)],
         splitwise__request_id="req-1", prompt__tokens=12, finish_reason="STOP"),
    span("scheduler.route", "scheduler", "a2", "a1", 0, 0, route__prompt_worker="prompt-0"),
    span("scheduler.generate", "scheduler", "b1", None, 200, 210, trace_id="f" * 32, splitwise__request_id="req-2"),
]
TOKEN_WORKER = [
    span("token_worker.decode_request", "token_worker", "c1", "a1", 3, 99, splitwise__request_id="req-1"),
    span("token_worker.decode", "token_worker", "c3", "c1", 50, 98, events=[("first_token_here", 50)],
         decode__tokens=31),
    span("kv_transfer.receive", "token_worker", "c2", "c1", 10, 45, kv__bytes=3 * 1024 * 1024),
]
PROMPT_WORKER = [
    span("prompt_worker.prefill_request", "prompt_worker", "d1", "a1", 5, 30, status="ERROR",
         message="KV capacity exceeded", splitwise__request_id="req-1/attempt-2"),
    span("kv_transfer.send", "prompt_worker", "d2", "d1", 8, 44, events=[("kv.layer_sent", t) for t in (10, 20, 30)],
         kv__transport="grpc_stream", note="x" * 200),
    span("prompt_worker.prefill", "prompt_worker", "d3", "0123456789abcdef", 6, 9),
]


@pytest.fixture
def traces(tmp_path):
    for service, spans in [("scheduler", SCHEDULER), ("token_worker", TOKEN_WORKER), ("prompt_worker", PROMPT_WORKER)]:
        (tmp_path / f"{service}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in spans))
    (tmp_path / "notes.txt").write_text("not spans")
    return tmp_path


def test_a_request_trace_gathers_its_spans_from_every_service_file(traces):
    spans, num_traces = find_trace([traces], "req-1")
    assert num_traces == 1
    assert {s["span_id"] for s in spans} == {"a1", "a2", "c1", "c2", "c3", "d1", "d2", "d3"}


def test_retried_worker_spans_lead_to_the_trace_and_ids_match_whole(traces):
    spans, _ = find_trace([traces / "prompt_worker.jsonl"], "req-1")  # only "req-1/attempt-2" there
    assert {s["span_id"] for s in spans} == {"d1", "d2", "d3"}
    with pytest.raises(LookupError):
        find_trace([traces], "req")


def test_spans_are_ordered_as_a_tree_with_children_by_start_time(traces):
    spans, _ = find_trace([traces], "req-1")
    rows = [(r.span["name"], r.depth, r.parent_missing) for r in span_tree(spans)]
    assert rows == [
        ("scheduler.generate", 0, False),
        ("scheduler.route", 1, False),
        ("token_worker.decode_request", 1, False),
        ("kv_transfer.receive", 2, False),
        ("token_worker.decode", 2, False),
        ("prompt_worker.prefill_request", 1, False),
        ("kv_transfer.send", 2, False),
        ("prompt_worker.prefill", 0, True),
    ]


def test_text_waterfall_shows_header_indented_tree_errors_attributes_and_bars(traces):
    spans, _ = find_trace([traces], "req-1")
    lines = render_text(spans, width=160).splitlines()
    assert lines[0] == (f"trace {TRACE}  request req-1  100.0 ms  8 spans  3 services "
                        "(scheduler, token_worker, prompt_worker)")
    body = [line for line in lines[2:] if "│" in line]
    assert [line.split("│")[0].rstrip().rsplit(" ", 1)[0].rstrip() for line in body] == [
        "scheduler.generate", "  scheduler.route", "  token_worker.decode_request", "    kv_transfer.receive",
        "    token_worker.decode", "  prompt_worker.prefill_request", "    kv_transfer.send", "prompt_worker.prefill"]
    assert lines[3].split() == ["prompt.tokens=12", "finish_reason=STOP", "retry@4.0ms(attempt=1)",
                                "first_token@40.0ms"]  # wrapped under the bar
    assert all(len(line) <= 160 for line in lines)
    root, route, receive, error, send, orphan = body[0], body[1], body[3], body[5], body[6], body[7]
    root_bar = root.split("│")[1]
    assert root_bar.count("▼") == 1 and set(root_bar) == {"█", "▼", "|"}  # the whole range, first token marked
    assert route.split("│")[1].count("█") == 1  # an instant still gets a character
    assert route.endswith("route.prompt_worker=prompt-0") and receive.endswith("kv.bytes=3.0 MiB")
    assert error.endswith("✗ ERROR: KV capacity exceeded  attempt-2")
    assert send.endswith("kv.transport=grpc_stream  kv.layer_sent×3")  # the 200-character value is left out
    assert send.split("│")[1].count("|") == 3
    assert orphan.endswith("(parent missing)")
    assert error.split("│")[2].split()[:2] == ["5.0", "25.0"]


def test_narrow_text_waterfall_wraps_details_under_the_bar(traces):
    spans, _ = find_trace([traces], "req-1")
    lines = render_text(spans, width=100).splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert render_text(spans, width=40)  # too narrow to fit, but still drawn
    error = next(i for i, line in enumerate(lines) if line.startswith("  prompt_worker.prefill_request"))
    bar_column = lines[error].index("│") + 1
    assert lines[error + 1][bar_column:] == "✗ ERROR: KV capacity exceeded  attempt-2"


def test_the_most_recent_of_several_traces_is_chosen(traces):
    again = span("scheduler.generate", "scheduler", "e1", None, 500, 520, trace_id="e" * 32,
                 splitwise__request_id="req-1")
    (traces / "later.jsonl").write_text(json.dumps(again) + "\n{truncated line")
    spans, num_traces = find_trace([traces], "req-1")
    assert num_traces == 2 and [s["span_id"] for s in spans] == ["e1"]


def test_png_waterfall_is_a_picture(traces, tmp_path):
    pytest.importorskip("matplotlib")
    spans, _ = find_trace([traces], "req-1")
    png = tmp_path / "req-1.png"
    render_png(spans, png)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_cli_prints_the_waterfall_and_writes_the_png(traces, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exit:
        main(["trace", "req-1", "--traces", str(traces / "scheduler.jsonl"), str(traces / "token_worker.jsonl"),
              "--png", str(png), "--width", "120"])
    out, err = capsys.readouterr()
    assert exit.value.code == 0
    assert "5 spans  2 services" in out.splitlines()[0] and "prompt_worker.prefill" not in out
    assert png.read_bytes().startswith(b"\x89PNG") and f"wrote {png}" in err


def test_cli_fails_with_what_it_searched_for_an_unknown_request(traces, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["trace", "nope", "--traces", str(traces)])
    out, err = capsys.readouterr()
    assert exit.value.code == 1 and out == ""
    assert "no span carries request id 'nope': searched 9 spans in 3 files" in err
    assert "most recent: req-2, req-1" in err


def test_cli_fails_when_there_are_no_span_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["trace", "req-1", "--traces", str(tmp_path / "missing")])
    assert exit.value.code == 1 and "no span files" in capsys.readouterr().err
