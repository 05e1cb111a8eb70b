"""Performance models: how long a prefill, decode or mixed engine step takes on one machine, from profiled points.

A profile is the CSV the paper's simulator published (`data/perf_model.csv`) or one `splitwise profile` measured
here, in the same columns. Prefill time is interpolated over the batch's prompt tokens (the median of every row
with that many: prompt_size x batch_size). Decode time is read one of two ways (`decode_curve`):
- "batch_size": over the decode batch's size, the median of every row of that batch size (what the columns say);
- "splitwisesim": as the paper's simulator reads it, over the same prompt_size x batch_size axis as prefill, at x =
  the number of decoding sequences. Its profiled x starts at 128 tokens, so decode steps come out almost flat in
  the batch size (about 43 ms on a DGX-A100 from 1 to 2048 sequences): the model behind the paper's cluster results;
- "batch_context": over the batch size and the sequences' mean context (token_size), for profiles measured on a
  grid of both (`splitwise profile`'s): attention reads every sequence's KV, so a step grows with the context.
Beyond the profiled points the nearest segment is extrapolated, never below half the smallest.
"""

from __future__ import annotations

import bisect
import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PAPER_PROFILES = Path(__file__).resolve().parent / "data" / "perf_model.csv"
CSV_COLUMNS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "peak_power", "average_power",
               "prompt_time", "token_time", "e2e_time", "tensor_parallel")
# Where a profile has no power columns (the paper's H100 rows): prefill runs near TDP, decode well below it
# (the paper's A100 rows: about 0.45 of rated power on average over a decode-dominated run).
DEFAULT_PROMPT_POWER = 1.0
DEFAULT_TOKEN_POWER = 0.45


class _Curve:
    """Piecewise-linear y(x) through sorted points, extrapolated by the end segments, floored at half the least y."""

    def __init__(self, points: tuple[tuple[float, float], ...]):
        if not points:
            raise ValueError("a performance curve needs at least one point")
        self.xs = [float(x) for x, _ in points]
        self.ys = [float(y) for _, y in points]
        self.floor = 0.5 * min(self.ys)
        self._cache: dict[float, float] = {}

    def __call__(self, x: float) -> float:
        cached = self._cache.get(x)
        if cached is not None:
            return cached
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            y = ys[0]
        else:
            i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            y = max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), self.floor)
        if len(self._cache) < 1 << 16:
            self._cache[x] = y
        return y


@dataclass(frozen=True)
class PerfModel:
    """Step times of one model on one machine type."""

    model: str
    hardware: str
    tensor_parallel: int
    prompt_points: tuple[tuple[float, float], ...]  # (prompt tokens in the batch, seconds of the step)
    token_points: tuple[tuple[float, float], ...]  # (sequences in the decode batch, seconds of the step)
    prompt_power: float = DEFAULT_PROMPT_POWER  # fraction of the machine's rated power while prefilling
    token_power: float = DEFAULT_TOKEN_POWER  # ... while decoding
    # (batch size, mean context, seconds): where given, decode steps are read over both (the "batch_context" curve)
    decode_grid: tuple[tuple[float, float, float], ...] = ()
    decode_curve: str = "batch_size"  # how token_points were read from the profile (DECODE_CURVES)
    _prefill: _Curve = field(init=False, repr=False, compare=False)
    _decode: _Curve = field(init=False, repr=False, compare=False)
    _by_batch: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("prompt_points", "token_points"):
            points = tuple(sorted((float(x), float(y)) for x, y in getattr(self, name)))
            if not points or any(x <= 0 or y <= 0 for x, y in points):
                raise ValueError(f"{self.name}: {name} must be positive (size, seconds) points, got {points}")
            object.__setattr__(self, name, points)
        object.__setattr__(self, "_prefill", _Curve(self.prompt_points))
        object.__setattr__(self, "_decode", _Curve(self.token_points))
        by_batch: dict[float, list[tuple[float, float]]] = defaultdict(list)
        for batch, context, seconds in self.decode_grid:
            by_batch[float(batch)].append((float(context), float(seconds)))
        object.__setattr__(self, "_by_batch", (tuple(sorted(by_batch)),
                                               tuple(_Curve(tuple(sorted(by_batch[b]))) for b in sorted(by_batch))))

    @property
    def context_aware(self) -> bool:
        return bool(self.decode_grid)

    @property
    def name(self) -> str:
        return f"{self.model}@{self.hardware}/tp{self.tensor_parallel}"

    def prefill_s(self, batch_tokens: int) -> float:
        return self._prefill(batch_tokens)

    def decode_s(self, batch_size: int, context_tokens: float | None = None) -> float:
        """One decode step of batch_size sequences; with a context-aware profile, at their mean context (None:
        the batch-size curve, the median over the profiled contexts)."""
        batches, curves = self._by_batch
        if context_tokens is None or not batches:
            return self._decode(batch_size)
        i = min(max(bisect.bisect_right(batches, batch_size), 1), len(batches) - 1) if len(batches) > 1 else 0
        if len(batches) == 1:
            return curves[0](context_tokens)
        b0, b1 = batches[i - 1], batches[i]
        y0, y1 = curves[i - 1](context_tokens), curves[i](context_tokens)
        return max(y0 + (y1 - y0) * (batch_size - b0) / (b1 - b0), 0.5 * min(y0, y1))

    def decode_alone_s(self, context_tokens: float) -> float:
        """A decode step of one request alone at this context: the reference of the TBT SLO. Read as the curve was:
        the paper's simulator reads its token curve at x = the request's prompt size (`splitwisesim`); a measured
        grid at batch 1 and this context (`batch_context`); else batch 1."""
        if self.decode_curve == "splitwisesim":
            return self._decode(context_tokens)
        return self.decode_s(1, context_tokens if self.context_aware else None)

    def step_s(self, prompt_tokens: int, decode_seqs: int, decode_context: float | None = None) -> float:
        """One engine step: prompt tokens (chunks of prompts) and one new token for each decoding sequence (at
        their mean context). A mixed step costs a prefill over all its tokens, never less than its decodes alone."""
        if prompt_tokens <= 0:
            return self.decode_s(decode_seqs, decode_context) if decode_seqs else 0.0
        if decode_seqs <= 0:
            return self.prefill_s(prompt_tokens)
        return max(self.prefill_s(prompt_tokens + decode_seqs), self.decode_s(decode_seqs, decode_context))

    def scaled(self, prompt_factor: float = 1.0, token_factor: float = 1.0, hardware: str | None = None) -> PerfModel:
        """The same curves with step times multiplied (a slower or faster variant of the machine)."""
        return PerfModel(self.model, hardware or self.hardware, self.tensor_parallel,
                         tuple((x, y * prompt_factor) for x, y in self.prompt_points),
                         tuple((x, y * token_factor) for x, y in self.token_points),
                         self.prompt_power, self.token_power,
                         tuple((b, c, y * token_factor) for b, c, y in self.decode_grid), self.decode_curve)


DECODE_CURVES = ("batch_size", "splitwisesim", "batch_context")


def read_profiles(path: str | Path = PAPER_PROFILES, decode_curve: str = "batch_size") -> dict[tuple[str, str, int], PerfModel]:
    """Every (model, hardware, tensor_parallel) in a profile CSV, as a PerfModel."""
    if decode_curve not in DECODE_CURVES:
        raise ValueError(f"unknown decode curve {decode_curve!r}; choose from {', '.join(DECODE_CURVES)}")
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"model", "hardware", "prompt_size", "batch_size", "prompt_time", "token_time"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a performance profile; columns {sorted(missing)} are missing")
        for row in reader:
            groups[(row["model"], row["hardware"], int(row.get("tensor_parallel") or 1))].append(row)
    if not groups:
        raise ValueError(f"{path}: a performance profile with no rows")
    return {key: _model_of(key, rows, decode_curve) for key, rows in groups.items()}


def _model_of(key: tuple[str, str, int], rows: list[dict], decode_curve: str) -> PerfModel:
    prompt: dict[int, list[float]] = defaultdict(list)
    token: dict[int, list[float]] = defaultdict(list)
    grid: dict[tuple[int, int], list[float]] = defaultdict(list)
    peak, average = [], []
    for row in rows:
        batch = int(row["batch_size"])
        prompt[int(row["prompt_size"]) * batch].append(float(row["prompt_time"]) / 1000)
        x = int(row["prompt_size"]) * batch if decode_curve == "splitwisesim" else batch
        token[x].append(float(row["token_time"]) / 1000)
        if decode_curve == "batch_context":
            grid[batch, int(row.get("token_size") or row["prompt_size"])].append(float(row["token_time"]) / 1000)
        if float(row.get("peak_power") or 0) > 0:
            peak.append(float(row["peak_power"]))
        if float(row.get("average_power") or 0) > 0:
            average.append(float(row["average_power"]))
    return PerfModel(
        *key,
        prompt_points=tuple((x, statistics.median(v)) for x, v in prompt.items()),
        token_points=tuple((x, statistics.median(v)) for x, v in token.items()),
        prompt_power=min(statistics.quantiles(peak, n=10)[-1], 1.0) if len(peak) > 1 else DEFAULT_PROMPT_POWER,
        token_power=statistics.median(average) if average else DEFAULT_TOKEN_POWER,
        decode_grid=tuple((b, c, statistics.median(v)) for (b, c), v in grid.items()),
        decode_curve=decode_curve,
    )


def load_profile(path: str | Path = PAPER_PROFILES, model: str | None = None, hardware: str | None = None,
                 tensor_parallel: int | None = None, decode_curve: str = "batch_size") -> PerfModel:
    """The one profile of `path` matching the given fields (all of them may be left out where only one matches)."""
    profiles = read_profiles(path, decode_curve)
    matches = [p for (m, h, tp), p in profiles.items()
               if (model is None or m == model) and (hardware is None or h == hardware)
               and (tensor_parallel is None or tp == tensor_parallel)]
    if len(matches) != 1:
        known = ", ".join(sorted(p.name for p in profiles.values()))
        wanted = f"model={model} hardware={hardware} tensor_parallel={tensor_parallel}"
        raise ValueError(f"{path}: {len(matches)} profiles match {wanted}; it has {known}")
    return matches[0]


def write_profile_rows(path: str | Path, rows: list[dict]) -> None:
    """Writes measured rows in the profile columns (what `splitwise profile` makes)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, 0) for column in CSV_COLUMNS})
