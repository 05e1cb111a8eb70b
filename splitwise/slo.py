"""Latency percentiles, slowdowns against an idle baseline, the paper's nine SLOs, goodput, and their plots and files.

The Splitwise paper states its SLOs as slowdowns: a request's TTFT, each of its token gaps (TBT) and its end-to-end
latency, divided by the same quantity for the same request alone on an idle machine. All nine (P50/P90/P99 of the
three) must hold at once; goodput is the highest request rate at which they do.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tbt", "e2e")
PAPER_SLOS: dict[str, dict[int, float]] = {
    "ttft": {50: 2.0, 90: 3.0, 99: 6.0},
    "tbt": {50: 1.25, 90: 1.5, 99: 5.0},
    "e2e": {50: 1.25, 90: 1.5, 99: 5.0},
}
CSV_COLUMNS = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "ttft_s", "tbt_mean_s", "tbt_max_s",
               "e2e_s", "error")


@dataclass(frozen=True)
class RequestResult:
    """One replayed request as the client saw it; `arrival_s` is its scheduled arrival from the run start."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    tbt_s: list[float]  # gaps between consecutive output tokens; output_tokens - 1 of them when complete
    e2e_s: float | None
    error: str = ""

    @property
    def ok(self) -> bool:
        """Finished without an error, having received its first token and its last."""
        return not self.error and self.ttft_s is not None and self.e2e_s is not None

    @property
    def tbt_mean_s(self) -> float | None:
        return sum(self.tbt_s) / len(self.tbt_s) if self.tbt_s else None

    @property
    def tbt_max_s(self) -> float | None:
        return max(self.tbt_s) if self.tbt_s else None


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks, as numpy's default."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    # Failed requests are infinite slowdowns; numpy's interpolation can make nan of them (inf - inf, inf * 0).
    data = np.sort(data)
    rank = (data.size - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    if low == high or data[high] == data[low]:
        return float(data[low])
    return float(data[low] + (data[high] - data[low]) * (rank - low))


def _percentiles(metric: str, values: list[float]) -> dict[str, float | None]:
    return {f"{metric}_p{q}_s": (percentile(values, q) if values else None) for q in PERCENTILES}


def summarize(results: list[RequestResult]) -> dict:
    """Counts, throughput, and P50/P90/P99 of TTFT, TBT (every token gap of every ok request) and E2E, as flat keys
    (`ttft_p99_s`, ...; None without samples). Throughput counts ok requests and their output tokens over the span
    from the first arrival to the last completion."""
    ok = [r for r in results if r.ok]
    first_arrival_s = min((r.arrival_s for r in results), default=0.0)
    last_completion_s = max((r.arrival_s + r.e2e_s for r in ok), default=first_arrival_s)
    duration_s = last_completion_s - first_arrival_s
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else 0.0,
        "throughput_tokens_per_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        **_percentiles("ttft", [r.ttft_s for r in ok]),
        **_percentiles("tbt", [gap for r in ok for gap in r.tbt_s]),
        **_percentiles("e2e", [r.e2e_s for r in ok]),
    }


def _sorted_points(points) -> tuple[tuple[int, float], ...]:
    """Sorted by length; repeated measurements of one length are averaged."""
    by_length: dict[int, list[float]] = {}
    for length, seconds in points:
        by_length.setdefault(int(length), []).append(float(seconds))
    return tuple((length, sum(v) / len(v)) for length, v in sorted(by_length.items()))


def _interpolate(points: tuple[tuple[int, float], ...], x: float) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) == 1:
        return ys[0]
    if x < xs[0]:
        (x0, y0), (x1, y1) = points[0], points[1]
    elif x > xs[-1]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
    else:
        return float(np.interp(x, xs, ys))
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.5 * min(ys))


@dataclass(frozen=True)
class IdleBaseline:
    """Latencies of one request alone on an idle machine, measured at a few lengths and interpolated between them.

    Beyond the measured lengths it extrapolates the nearest segment, but never below half the smallest measurement.
    """

    ttft_points: tuple[tuple[int, float], ...]  # (prompt_tokens, ttft_s)
    tbt_points: tuple[tuple[int, float], ...]  # (context_tokens, tbt_s)

    def __post_init__(self):
        for name in ("ttft_points", "tbt_points"):
            points = _sorted_points(getattr(self, name))
            if not points:
                raise ValueError(f"IdleBaseline needs at least one measured point in {name}")
            if any(seconds <= 0 for _, seconds in points):
                raise ValueError(f"IdleBaseline {name} must be positive latencies, got {points}")
            object.__setattr__(self, name, points)

    def ttft(self, prompt_tokens: float) -> float:
        return _interpolate(self.ttft_points, prompt_tokens)

    def tbt(self, context_tokens: float) -> float:
        return _interpolate(self.tbt_points, context_tokens)

    def e2e(self, prompt_tokens: int, output_tokens: int) -> float:
        """TTFT plus every later token's gap, taken at the mean context over the output."""
        return self.ttft(prompt_tokens) + max(output_tokens - 1, 0) * self.tbt(prompt_tokens + output_tokens / 2)

    def to_dict(self) -> dict:
        return {"ttft_points": [list(p) for p in self.ttft_points], "tbt_points": [list(p) for p in self.tbt_points]}

    @classmethod
    def from_dict(cls, data: dict) -> IdleBaseline:
        return cls(ttft_points=data["ttft_points"], tbt_points=data["tbt_points"])


TBT_SAMPLES = ("gaps", "request_mean")


def slowdowns(results: list[RequestResult], baseline: IdleBaseline, tbt: str = "gaps") -> dict[str, list[float]]:
    """Per ok request, TTFT and E2E over their idle values. TBT, with tbt="gaps" (the default: like the TBT
    distribution), per token gap: the gap over the idle gap at that token's context (the gap before output token
    k+2, gap k from 0, attends the prompt and k+1 output tokens); with "request_mean", per request, as the paper's
    simulator measures it (it keeps no per-token times): the time after the first token over the number of output
    tokens, (E2E - TTFT) / n, against the idle gap at the prompt's size; a one-token request counts as 0."""
    if tbt not in TBT_SAMPLES:
        raise ValueError(f"unknown TBT sampling {tbt!r}; choose from {', '.join(TBT_SAMPLES)}")
    ok = [r for r in results if r.ok]
    if tbt == "gaps":
        tbt_values = [gap / baseline.tbt(r.prompt_tokens + k + 1) for r in ok for k, gap in enumerate(r.tbt_s)]
    else:
        tbt_values = [(r.e2e_s - r.ttft_s) / r.output_tokens / baseline.tbt(r.prompt_tokens)
                      for r in ok if r.output_tokens > 0]
    return {
        "ttft": [r.ttft_s / baseline.ttft(r.prompt_tokens) for r in ok],
        "tbt": tbt_values,
        "e2e": [r.e2e_s / baseline.e2e(r.prompt_tokens, r.output_tokens) for r in ok],
    }


@dataclass(frozen=True)
class SLOCheck:
    metric: str  # "ttft", "tbt" or "e2e"
    percentile: int
    slowdown: float | None  # None when the run had no sample of this metric (e.g. only one-token outputs)
    limit: float

    @property
    def met(self) -> bool:
        return self.slowdown is None or self.slowdown <= self.limit


@dataclass(frozen=True)
class SLOReport:
    checks: tuple[SLOCheck, ...]
    failed: int  # requests that are not ok: an error, no first token, or no end

    @property
    def all_met(self) -> bool:
        return self.failed == 0 and all(check.met for check in self.checks)

    def check(self, metric: str, percentile: int) -> SLOCheck:
        return next(c for c in self.checks if c.metric == metric and c.percentile == percentile)

    def slowdown(self, metric: str, percentile: int) -> float | None:
        return self.check(metric, percentile).slowdown

    def to_dict(self) -> dict:
        return {"all_met": self.all_met, "failed": self.failed,
                "checks": [{"metric": c.metric, "percentile": c.percentile, "slowdown": c.slowdown,
                            "limit": c.limit, "met": c.met} for c in self.checks]}


def slo_attainment(results: list[RequestResult], baseline: IdleBaseline,
                   slos: dict[str, dict[int, float]] = PAPER_SLOS, tbt: str = "gaps") -> SLOReport:
    """Measured slowdown at each SLO percentile against its limit.

    A failed request (not ok: an error, no first token, or no end) counts as one infinite slowdown in each of the
    three metrics, so failures raise the percentiles they reach, and any failure at all makes `all_met` False.
    """
    if not results:
        raise ValueError("SLO attainment of no requests")
    failed = sum(not r.ok for r in results)
    measured = {metric: values + [math.inf] * failed for metric, values in slowdowns(results, baseline, tbt).items()}
    checks = tuple(SLOCheck(metric, q, percentile(measured[metric], q) if measured[metric] else None, limit)
                   for metric, limits in slos.items() for q, limit in sorted(limits.items()))
    return SLOReport(checks=checks, failed=failed)


def goodput(points: list[tuple[float, bool]]) -> float | None:
    """The highest swept request rate that meets all SLOs with every lower swept rate meeting them too."""
    best = None
    for rate, all_met in sorted(points, key=lambda p: p[0]):
        if not all_met:
            break
        best = rate
    return best


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _float_or_none(text: str) -> float | None:
    return float(text) if text else None


def gaps_path(csv_path: str | Path) -> Path:
    """Where `write_csv` keeps the token gaps of `csv_path`: requests.csv -> requests.gaps.jsonl."""
    return Path(csv_path).with_suffix(".gaps.jsonl")


def write_csv(results: list[RequestResult], path: str | Path, with_gaps: bool = True) -> None:
    """One row per request, and unless told otherwise every request's token gaps as JSON lines in `gaps_path`."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            writer.writerow([_cell(getattr(r, column)) for column in CSV_COLUMNS])
    if with_gaps:
        with open(gaps_path(path), "w") as f:
            for r in results:
                f.write(json.dumps({"request_id": r.request_id, "tbt_s": r.tbt_s}) + "\n")


def read_csv(path: str | Path) -> list[RequestResult]:
    """Results from `write_csv`, with their token gaps if `gaps_path` exists; without it every `tbt_s` is empty, so
    `tbt_mean_s` and `tbt_max_s` are None and TBT slowdowns cannot be computed."""
    gaps: dict[str, list[float]] = {}
    if gaps_path(path).exists():
        with open(gaps_path(path)) as f:
            gaps = {row["request_id"]: row["tbt_s"] for row in map(json.loads, f) if row}
    with open(path, newline="") as f:
        return [RequestResult(request_id=row["request_id"], arrival_s=float(row["arrival_s"]),
                              prompt_tokens=int(row["prompt_tokens"]), output_tokens=int(row["output_tokens"]),
                              ttft_s=_float_or_none(row["ttft_s"]), tbt_s=gaps.get(row["request_id"], []),
                              e2e_s=_float_or_none(row["e2e_s"]), error=row["error"])
                for row in csv.DictReader(f)]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def format_report(summary: dict, slo_report: SLOReport | None = None) -> str:
    """The summary's latency table and, if given, the nine SLO checks, as markdown."""
    lines = [f"{summary['ok']} ok, {summary['failed']} failed in {summary['duration_s']:.1f} s: "
             f"{summary['throughput_rps']:.2f} req/s, {summary['throughput_tokens_per_s']:.1f} tokens/s",
             "", "| latency (ms) | P50 | P90 | P99 |", "|---|---:|---:|---:|"]
    for metric in METRICS:
        cells = " | ".join(_ms(summary[f"{metric}_p{q}_s"]) for q in PERCENTILES)
        lines.append(f"| {metric.upper()} | {cells} |")
    if slo_report is not None:
        lines += ["", "| SLO | slowdown | limit | met |", "|---|---:|---:|:---:|"]
        for c in slo_report.checks:
            slowdown = "-" if c.slowdown is None else f"{c.slowdown:.2f}x"
            lines.append(f"| P{c.percentile} {c.metric.upper()} | {slowdown} | {c.limit:g}x | "
                         f"{'yes' if c.met else '**no**'} |")
        verdict = "all SLOs met" if slo_report.all_met else "SLOs not met"
        lines += ["", f"**{verdict}**" + (f" ({slo_report.failed} failed)" if slo_report.failed else "")]
    return "\n".join(lines)
