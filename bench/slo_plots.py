"""Plots of replay results: latency CDFs per configuration, and SLO attainment against request rate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from splitwise.slo import RequestResult, goodput


def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def _plain_log_x(ax) -> None:
    """A log x axis whose tick labels read 0.25 rather than 2.5x10^-1 (they crowd on short ranges otherwise)."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PlainLogFormatter())
    ax.xaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def plot_latency_cdfs(configs: dict[str, list[RequestResult]], path: str | Path) -> None:
    """TTFT, TBT (per token gap) and E2E CDFs of the ok requests, one line per configuration, on log time axes."""
    fig, axes = _figure(15, 4.5, columns=3)
    for ax, title in zip(axes, ("TTFT", "TBT", "E2E")):
        for i, (name, results) in enumerate(configs.items()):
            ok = [r for r in results if r.ok]
            values = {"TTFT": [r.ttft_s for r in ok], "TBT": [g for r in ok for g in r.tbt_s],
                      "E2E": [r.e2e_s for r in ok]}[title]
            values = np.sort([v for v in values if v > 0])  # a log axis has no zero
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", color=f"C{i % 10}",
                        label=name)
        _plain_log_x(ax)
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of " + ("token gaps" if title == "TBT" else "requests"))
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_goodput(sweeps: dict[str, list[tuple[float, bool, float | None]]], path: str | Path,
                 metric_label: str = "P99 TBT slowdown", limit: float | None = 5.0) -> None:
    """Per configuration, a slowdown metric against request rate from (rate, all_met, slowdown) sweep points:
    filled markers where all SLOs held, crosses where not, and a dashed vertical line at the configuration's goodput.
    Infinite or missing slowdowns (failed requests) are left off the line; their crosses sit on the top edge."""
    sweeps = {name: [(r, m, math.inf if s is None else s) for r, m, s in points] for name, points in sweeps.items()}
    fig, (ax,) = _figure(7, 4.5)
    finite = [s for points in sweeps.values() for _, _, s in points if math.isfinite(s)]
    top = max(finite + [limit or 0.0, 1.0]) * 1.2
    for i, (name, points) in enumerate(sweeps.items()):
        color = f"C{i % 10}"
        points = sorted(points, key=lambda p: p[0])
        ax.plot([r for r, _, s in points if math.isfinite(s)], [s for _, _, s in points if math.isfinite(s)],
                color=color, label=name)
        met = [(r, s) for r, m, s in points if m]
        missed = [(r, min(s, top)) for r, m, s in points if not m]
        if met:
            ax.plot(*zip(*met), marker="o", linestyle="none", color=color)
        if missed:
            ax.plot(*zip(*missed), marker="x", markersize=8, linestyle="none", color=color)
        rate = goodput([(r, m) for r, m, _ in points])
        if rate is not None:
            ax.axvline(rate, color=color, linestyle="--", alpha=0.7, label=f"{name} goodput {rate:.2f} req/s")
    if limit is not None:
        ax.axhline(limit, color="gray", linestyle=":", label=f"SLO {limit:g}x")
    ax.set_ylim(0, top)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(metric_label)
    ax.set_title("SLO attainment vs load (o all nine SLOs met, x not met)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
