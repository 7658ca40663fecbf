"""Dynamic bandwidth (the paper's Fig. 11): requests served while the link changes under them.

A `BandwidthTrace` says each device's uplink rate over time: the paper's synthetic one (a
Markov chain between 20 and 100 Mbit/s whose transitions favour nearby states, after Pensieve;
`markov_trace`, seeded) or a CSV of `time,mbps` rows (`read_trace_csv`).

How the requests are timed: every method's prefill is measured for real (astra.bench, the same
runtime and link model as every other number) at the trace's bandwidth states; between them the
time is interpolated linearly in 1/bandwidth (`MeasuredTimes`). A closed-loop client then
replays the trace: it sends a request, the request takes the method's time at the bandwidth
when it starts, the next one follows at once, and the count within the duration is the
method's score (`replay`). How well each method follows compute + bytes/bandwidth (`fit_link`)
is reported beside it.

Bitrate that follows the link (`AdaptivePolicy`): with codebooks for several G measured, each
request takes the richest G (most groups, best accuracy) whose transfer fits the bandwidth the
previous request saw: its predicted time there within `tolerance` of its time on the fastest
measured link; `min_groups` is the quality floor.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKOV_STATES_MBPS = (20.0, 40.0, 60.0, 80.0, 100.0)  # the paper's range, in even steps


@dataclass(frozen=True)
class BandwidthTrace:
    """Piecewise-constant uplink rate: `mbps[i]` from `times_s[i]` until the next time."""

    times_s: tuple[float, ...]
    mbps: tuple[float, ...]
    duration_s: float
    source: str  # "markov(seed=0)" or the CSV path

    def __post_init__(self) -> None:
        if not self.times_s or len(self.times_s) != len(self.mbps):
            raise ValueError("a trace needs one or more (time, mbps) points")
        if self.times_s[0] != 0.0:
            raise ValueError(f"a trace starts at time 0, this one at {self.times_s[0]}")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:])):
            raise ValueError("trace times must increase strictly")
        if any(not (math.isfinite(m) and m > 0) for m in self.mbps):
            raise ValueError(f"trace rates must be positive Mbit/s, got {min(self.mbps)}")
        if not self.duration_s > self.times_s[-1]:
            raise ValueError(f"duration {self.duration_s} s ends before the trace's last point")

    def at(self, t_s: float) -> float:
        """The rate at time t (the last point's rate after it)."""
        lo, hi = 0, len(self.times_s) - 1
        while lo < hi:  # the last point at or before t
            mid = (lo + hi + 1) // 2
            if self.times_s[mid] <= t_s:
                lo = mid
            else:
                hi = mid - 1
        return self.mbps[lo]

    def states(self, max_states: int = 5) -> tuple[float, ...]:
        """The rates to measure at: the distinct ones, or `max_states` spread over the range."""
        distinct = sorted(set(self.mbps))
        if len(distinct) <= max_states:
            return tuple(distinct)
        lo, hi = distinct[0], distinct[-1]
        return tuple(round(lo + (hi - lo) * i / (max_states - 1), 3) for i in range(max_states))


def markov_trace(
    duration_s: float = 600.0,
    step_s: float = 1.0,
    states: tuple[float, ...] = MARKOV_STATES_MBPS,
    stay: float = 0.8,
    seed: int = 0,
) -> BandwidthTrace:
    """A Pensieve-style Markov chain: every step the rate stays with probability `stay`, else
    moves to another state with probability falling with the distance (1/2^d: nearby states
    are likelier), as in the paper's dynamic-network experiment (§ dynamic network)."""
    if not 0.0 <= stay < 1.0:
        raise ValueError(f"stay must be in [0, 1), got {stay}")
    if duration_s <= 0 or step_s <= 0:
        raise ValueError(f"duration ({duration_s}) and step ({step_s}) must be > 0 seconds")
    rng = random.Random(seed)
    state = rng.randrange(len(states))
    times, rates = [], []
    for i in range(math.ceil(duration_s / step_s)):
        times.append(i * step_s)
        rates.append(float(states[state]))
        if rng.random() >= stay:
            others = [j for j in range(len(states)) if j != state]
            weights = [0.5 ** abs(j - state) for j in others]
            state = rng.choices(others, weights)[0]
    return BandwidthTrace(tuple(times), tuple(rates), float(duration_s), f"markov(seed={seed})")


def read_trace_csv(path: str | Path, duration_s: float | None = None) -> BandwidthTrace:
    """`time,mbps` rows (seconds from 0, Mbit/s); a header row is allowed. The trace lasts
    `duration_s`, or one median step past its last point."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path} (a CSV of time,mbps rows)")
    times, rates = [], []
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                t, mbps = float(row[0]), float(row[1])
            except (ValueError, IndexError):
                if line_no == 1:
                    continue  # a header
                raise ValueError(
                    f"{path}:{line_no}: expected 'time,mbps' numbers, got {','.join(row)!r}"
                ) from None
            times.append(t)
            rates.append(mbps)
    if not times:
        raise ValueError(f"{path}: no time,mbps rows")
    if duration_s is None:
        steps = sorted(b - a for a, b in zip(times, times[1:])) or [1.0]
        duration_s = times[-1] + steps[len(steps) // 2]
    return BandwidthTrace(tuple(times), tuple(rates), float(duration_s), str(path))


@dataclass(frozen=True)
class LinkFit:
    """seconds(bandwidth) = compute_s + transfer_s_mbps / bandwidth: the link model's own form,
    fitted to report how well a method follows it (`max_residual`). A streamed prefill hides
    transfer behind compute until the link is slow enough, so the replay uses the measured
    points themselves (`MeasuredTimes`), not this fit."""

    compute_s: float  # everything that does not shrink with bandwidth (latency included)
    transfer_s_mbps: float  # seconds at 1 Mbit/s of what does
    max_residual: float  # largest |fit - measured| / measured over the measured points

    def seconds(self, mbps: float) -> float:
        return self.compute_s + self.transfer_s_mbps / mbps


def fit_link(points: list[tuple[float, float]]) -> LinkFit:
    """Least squares of seconds = a + b / mbps through (mbps, seconds) points (b >= 0)."""
    if not points:
        raise ValueError("no measured points to fit")
    xs = [1.0 / m for m, _ in points]
    ys = [s for _, s in points]
    n = len(points)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var > 0 else 0.0
    a = my - b * mx
    residual = max(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    return LinkFit(a, b, residual)


@dataclass(frozen=True)
class MeasuredTimes:
    """A method's measured prefill time at a few rates; between them, linear in 1/bandwidth
    (exact at the measured rates, which are the Markov trace's own states); outside them, the
    nearest measurement."""

    points: tuple[tuple[float, float], ...]  # (mbps, seconds), any order

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("no measured points")

    def seconds(self, mbps: float) -> float:
        pts = sorted(self.points)  # by rate
        if mbps <= pts[0][0]:
            return pts[0][1]
        if mbps >= pts[-1][0]:
            return pts[-1][1]
        for (m0, s0), (m1, s1) in zip(pts, pts[1:]):
            if m0 <= mbps <= m1:
                w = (1 / mbps - 1 / m0) / (1 / m1 - 1 / m0)
                return s0 + w * (s1 - s0)
        raise AssertionError("unreachable")

    @property
    def best_s(self) -> float:
        """The time at the fastest measured rate: the method with the link out of the way."""
        return max(self.points)[1]


@dataclass(frozen=True)
class Served:
    start_s: float
    seconds: float
    mbps: float  # the rate when the request started
    label: str  # what ran it (a method, or the G the adaptive policy chose)


def replay(
    trace: BandwidthTrace, choose: Callable[[float, float | None], tuple[str, float]]
) -> list[Served]:
    """A closed-loop client over the trace: each request starts when the previous one ends.
    choose(mbps_now, mbps_seen_by_the_previous_request) -> (label, seconds) for that request;
    requests that would end after the trace are not counted."""
    t, seen, out = 0.0, None, []
    while True:
        mbps = trace.at(t)
        label, seconds = choose(mbps, seen)
        if seconds <= 0:
            raise ValueError(f"a request of {seconds} s: the fit for {label} is broken")
        if t + seconds > trace.duration_s:
            return out
        out.append(Served(t, seconds, mbps, label))
        t, seen = t + seconds, mbps


@dataclass(frozen=True)
class AdaptivePolicy:
    """Bitrate that follows the link: per request, the richest G (most groups, best accuracy)
    whose transfer fits the bandwidth the previous request saw (the first request: the
    current one), i.e. whose predicted time there is within `tolerance` of its own time on
    the fastest measured link. When no G above the floor fits, the floor."""

    times: dict[int, MeasuredTimes]  # G -> its measured prefill times
    min_groups: int = 1  # the quality floor: never fewer groups than this
    tolerance: float = 0.10

    def __post_init__(self) -> None:
        if not any(g >= self.min_groups for g in self.times):
            raise ValueError(
                f"no measured G reaches the quality floor {self.min_groups}: {sorted(self.times)}"
            )

    def choose(self, mbps_now: float, mbps_seen: float | None) -> tuple[str, float]:
        measured = mbps_seen if mbps_seen is not None else mbps_now
        allowed = {g: t for g, t in self.times.items() if g >= self.min_groups}
        fits = [
            g for g, t in allowed.items() if t.seconds(measured) <= t.best_s * (1 + self.tolerance)
        ]
        g = max(fits) if fits else min(allowed)
        return f"G={g}", allowed[g].seconds(mbps_now)  # it runs at the rate it meets
