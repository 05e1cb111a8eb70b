"""`splitwise plan`: searches cluster designs for the most throughput under a cost or power budget, or the least cost
or power for a request rate, all nine of the paper's SLOs met.

A design's throughput is the highest Poisson request rate (lengths drawn from the trace) at which the simulated
cluster meets every SLO, found by bisection. Families are the paper's: colocated baselines of each machine type and
Splitwise pairs (prompt type, token type); within a budget a Splitwise family is tried at several prompt:token
splits. `scale` < 1 simulates a proportionally smaller cluster at a proportionally lower rate and scales the
throughput back up (faster; large clusters multiplex a little better than the small one shows).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from splitwise.slo import IdleBaseline, RequestResult, write_csv
from splitwise.sim.designs import FAMILIES, ClusterDesign, baseline, splitwise
from splitwise.sim.machines import MACHINES, paper_profile
from splitwise.sim.simulator import SimConfig, SimResult, idle_baseline, simulate
from splitwise.sim.workload import poisson

# Token machines' share of a Splitwise design's machines: a coarse grid, then the two midpoints around the best.
TOKEN_SHARES = (0.1, 0.2, 0.35, 0.5)


@dataclass(frozen=True)
class Workload:
    lengths: list[tuple[int, int]]
    duration_s: float = 60.0
    seed: int = 0

    def at(self, rate: float):
        return poisson(rate, self.duration_s, self.lengths, self.seed)


@dataclass(frozen=True)
class SLOSpec:
    """The paper's nine SLOs against a request alone on `baseline`'s machine; TBT sampled per gap or per request."""

    baseline: IdleBaseline
    tbt: str = "gaps"

    def met(self, result: SimResult) -> bool:
        return result.slo(self.baseline, self.tbt).all_met


@dataclass
class Evaluated:
    family: str
    design: ClusterDesign
    scale: float
    throughput_rps: float  # the highest rate meeting the SLOs, scaled back to the full design
    result: SimResult | None  # the simulation at that rate

    @property
    def cost_per_hour(self) -> float:
        return self.design.cost_per_hour

    @property
    def power_kw(self) -> float:
        return self.design.power_kw


def design_of(family: str, machines: int, token_share: float = 0.0, model: str = "llama2-70b",
              decode_curve: str = "batch_size") -> ClusterDesign:
    prompt_m, token_m = FAMILIES[family]
    if token_m is None:
        return baseline(prompt_m, max(machines, 1), model, decode_curve)
    tokens = min(max(round(machines * token_share), 1), machines - 1)
    return splitwise(prompt_m, machines - tokens, token_m, tokens, model, decode_curve)


def scaled(design: ClusterDesign, scale: float) -> ClusterDesign:
    """The design with every pool's count times scale (at least one machine each)."""
    if scale == 1:
        return design
    from dataclasses import replace
    return ClusterDesign(design.name, tuple(replace(p, count=max(round(p.count * scale), 1)) for p in design.pools))


def meets(design: ClusterDesign, rate: float, workload: Workload, config: SimConfig,
          slo: SLOSpec) -> tuple[bool, SimResult]:
    result = simulate(design, workload.at(rate), config)
    return slo.met(result), result


def max_rate(design: ClusterDesign, workload: Workload, config: SimConfig, slo: SLOSpec,
             scale: float = 1.0, iterations: int = 7, progress: Callable[[str], None] = lambda _: None) -> Evaluated:
    """Bisection on the request rate for the highest that meets every SLO, on the design scaled by `scale`."""
    small = scaled(design, scale)
    guess = 2.0 * small.machines  # req/s: about what a DGX serves of the paper's workloads; only a start
    low, high, best = 0.0, None, None
    rate = guess
    for _ in range(iterations + 8):
        ok, result = meets(small, rate, workload, config, slo)
        progress(f"  {design.name} x{scale:g}: {rate:7.2f} req/s {'meets' if ok else 'misses'} the SLOs")
        if ok:
            low, best = rate, result
        else:
            high = rate
        if high is None:
            rate *= 2
        elif low == 0 and high < 0.05 * guess:
            break
        else:
            iterations -= 1
            if iterations <= 0:
                break
            rate = (low + high) / 2
    return Evaluated("", design, scale, low / scale, best)


def best_within(family: str, budget: float, per_machine: Callable[[ClusterDesign], float], workload: Workload,
                config: SimConfig, slo: SLOSpec, scale: float, model: str, decode_curve: str,
                progress: Callable[[str], None]) -> list[Evaluated]:
    """The family's designs that the budget buys (as many machines as fit), at the token shares of a coarse grid
    and then around the best of them, evaluated."""
    prompt_m, token_m = FAMILIES[family]
    evaluated: dict[str, Evaluated] = {}

    def evaluate(share: float) -> None:
        machines = 1
        while per_machine(design_of(family, machines + 1, share, model, decode_curve)) <= budget:
            machines += 1
        design = design_of(family, machines, share, model, decode_curve)
        if design.name in evaluated or per_machine(design) > budget or (token_m is not None and machines < 2):
            return
        e = max_rate(design, workload, config, slo, scale, progress=progress)
        e.family = family
        evaluated[design.name] = e
        progress(f"{family} {design.short}: {e.throughput_rps:.1f} req/s")

    if token_m is None:
        evaluate(0.0)
        return list(evaluated.values())
    for share in TOKEN_SHARES:
        evaluate(share)
    if evaluated:
        best = max(evaluated.values(), key=lambda e: e.throughput_rps).design
        share = best.count("token") / best.machines
        grid = sorted({*TOKEN_SHARES, share})
        i = grid.index(share)
        for neighbour in (grid[i - 1] if i else 0.0, grid[i + 1] if i + 1 < len(grid) else 1.0):
            evaluate((share + neighbour) / 2)
    return sorted(evaluated.values(), key=lambda e: -e.throughput_rps)


def smallest_for(family: str, rate: float, objective: Callable[[ClusterDesign], float], workload: Workload,
                 config: SimConfig, slo: SLOSpec, scale: float, model: str, decode_curve: str,
                 progress: Callable[[str], None], max_machines: int = 400) -> list[Evaluated]:
    """For each split, the fewest machines meeting every SLO at `rate` (bisection on the machine count)."""
    prompt_m, token_m = FAMILIES[family]
    shares = (0.0,) if token_m is None else TOKEN_SHARES
    found = []
    for share in shares:
        low, high, best = 1 if token_m is None else 2, None, None
        n = max(low, int(rate / 2))
        while True:
            design = design_of(family, n, share, model, decode_curve)
            ok, result = meets(scaled(design, scale), rate * scale, workload, config, slo)
            progress(f"  {design.name} x{scale:g} at {rate:g} req/s: {'meets' if ok else 'misses'} the SLOs")
            if ok:
                high, best = n, (design, result)
            else:
                low = n + 1
            if high is None:
                if n >= max_machines:
                    break
                n = min(n * 2, max_machines)
            elif low >= high:
                break
            else:
                n = (low + high) // 2
        if best is not None:
            found.append(Evaluated(family, best[0], scale, rate, best[1]))
            progress(f"{family} {best[0].short}: meets {rate:g} req/s at ${best[0].cost_per_hour:.0f}/h, "
                     f"{best[0].power_kw:.0f} kW")
    return found


def pareto(points: list[Evaluated], cost: Callable[[Evaluated], float]) -> list[Evaluated]:
    """The designs no other design beats on both throughput and the cost measure."""
    front, best = [], -math.inf
    for e in sorted(points, key=lambda e: (cost(e), -e.throughput_rps)):
        if e.throughput_rps > best:
            front.append(e)
            best = e.throughput_rps
    return front


def table(points: list[Evaluated]) -> str:
    rows = [("family", "design", "machines", "req/s", "$/h", "kW", "req/s per $/h", "req/s per kW", "avg kW")]
    for e in points:
        avg = e.result.average_power_kw / e.scale if e.result else float("nan")
        rows.append((e.family, e.design.short, str(e.design.machines), f"{e.throughput_rps:.1f}",
                     f"{e.cost_per_hour:.0f}", f"{e.power_kw:.0f}", f"{e.throughput_rps / e.cost_per_hour:.3f}",
                     f"{e.throughput_rps / e.power_kw:.3f}", f"{avg:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_outputs(points: list[Evaluated], out_dir: Path) -> list[Path]:
    """designs.csv (one row per design), requests-<design>.csv (per request, at its throughput), and plots of
    throughput against cost and against power with the Pareto fronts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "designs.csv"]
    with open(written[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["family", "design", "prompt_machines", "token_machines", "mixed_machines", "throughput_rps",
                         "cost_per_hour", "power_kw", "avg_power_kw", "scale"])
        for e in points:
            writer.writerow([e.family, e.design.name, e.design.count("prompt"), e.design.count("token"),
                             e.design.count("mixed"), round(e.throughput_rps, 3), e.cost_per_hour, e.power_kw,
                             round(e.result.average_power_kw / e.scale, 1) if e.result else "", e.scale])
    for e in points:
        if e.result is not None:
            path = out_dir / f"requests-{e.family}-{e.design.short}.csv"
            write_csv(e.result.requests, path, with_gaps=False)
            written.append(path)
    written.append(_plot(points, out_dir / "throughput-vs-cost-and-power.png"))
    return written


def _plot(points: list[Evaluated], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (label, measure) in zip(axes, (("cost ($/h)", lambda e: e.cost_per_hour),
                                           ("provisioned power (kW)", lambda e: e.power_kw))):
        for family in dict.fromkeys(e.family for e in points):
            mine = [e for e in points if e.family == family]
            ax.scatter([measure(e) for e in mine], [e.throughput_rps for e in mine], label=family, s=22)
        front = pareto(points, measure)
        ax.plot([measure(e) for e in front], [e.throughput_rps for e in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("throughput meeting the SLOs (req/s)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def a100_baseline(model: str = "llama2-70b", decode_curve: str = "batch_size") -> IdleBaseline:
    """The paper's SLO reference: the request alone on a DGX-A100."""
    return idle_baseline(paper_profile(model, "dgx-a100", decode_curve=decode_curve))


def paper_slos(model: str = "llama2-70b", decode_curve: str = "batch_size", tbt: str = "gaps") -> SLOSpec:
    return SLOSpec(a100_baseline(model, decode_curve), tbt)


def known_machines() -> str:
    return ", ".join(MACHINES)


def results_of(points: list[Evaluated]) -> dict[str, list[RequestResult]]:
    return {f"{e.family} {e.design.short}": e.result.requests for e in points if e.result}
