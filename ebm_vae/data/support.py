"""Physical bounds of vector states: the map into unbounded coordinates, and what the
statistics pass learns about the support (moments of the mapped values, mass at the bounds,
point masses anywhere).

A capsule declares `bounds: {humidity: [0, 100], irradiance: [0, null]}`. A bounded component
is learned in a coordinate that is unbounded: y = log(x - lo) for a lower bound,
y = -log(hi - x) for an upper one, y = logit((x - lo) / (hi - lo)) for both (every map
increasing). The model adds log |dy/dx| (exact), so its density of x is proper on the open
support (lo, hi) and zero outside: E = +inf there (`ebm_vae.model.transforms.Bounded`).

Values exactly at a bound (irradiance 0 at night: about half of the samples) are a point mass
that no density on the open interval can hold. They are counted here, per component and side,
and the model leaves them out: it learns the density of the continuous part, and its energy is
-log((1 - w) p_c(x)) with w the fraction of samples left out, so that away from the bounds it
matches a histogram of all samples. The map says so in its metadata (`Bounded.describe`).

`PointMasses` finds any single value holding a large share of a component's samples (a
stuck sensor, a fill value, a bound the capsule did not declare), mergeably, with Misra-Gries
summaries (Agarwal et al. 2012, "Mergeable summaries").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.data.moments import Moments, floored_std

log = logging.getLogger(__name__)

POINT_MASS_WARN = 0.05  # warn about a single value holding at least this share of a component
HEAVY_HITTER_SLOTS = 32  # Misra-Gries counters per component: counts are low by <= n / 33


def component_bounds(state: StateInfo, bounds: Mapping[str, Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) per flat component (nan: none) from the capsule's bounds by variable.

    A component is a variable's when its name is the variable's or the variable's with a
    suffix `_<bus>` (the grid extractor's per-bus names); field states are not bounded here.
    """
    lower, upper = np.full(state.dim, np.nan), np.full(state.dim, np.nan)
    if not bounds or state.kind == "field":
        if bounds:
            log.warning("bounds %s ignored: bounds apply to vector states", sorted(bounds))
        return lower, upper
    for i, name in enumerate(state.names):
        owners = [v for v in bounds if name == v or name.startswith(f"{v}_")]
        if owners:
            lo, hi = bounds[max(owners, key=len)]
            lower[i] = np.nan if lo is None else float(lo)
            upper[i] = np.nan if hi is None else float(hi)
    return lower, upper


def support_map(x: Any, lower: Any, upper: Any, xp: Any = np) -> tuple[Any, Any, Any]:
    """(y, log |dy/dx|, inside) per component of states x (n, D) float64, for numpy or torch (`xp`).

    `lower`, `upper` (D,) hold nan where a component has no bound. `inside` is True strictly
    inside the bounds; elsewhere y and log |dy/dx| are finite stand-ins (never NaN), for the
    caller to mask.
    """
    has_lo, has_hi = ~xp.isnan(lower), ~xp.isnan(upper)
    above_lo = xp.where(has_lo, x - xp.where(has_lo, lower, 0.0), 1.0)
    below_hi = xp.where(has_hi, xp.where(has_hi, upper, 0.0) - x, 1.0)
    inside = (above_lo > 0) & (below_hi > 0)
    log_lo = xp.log(xp.where(inside, above_lo, 1.0))
    log_hi = xp.log(xp.where(inside, below_hi, 1.0))
    width = xp.where(has_lo & has_hi, upper - lower, 1.0)
    y = xp.where(has_lo | has_hi, log_lo - log_hi, x)
    log_jacobian = xp.where(has_lo | has_hi, xp.log(width) - log_lo - log_hi, 0.0 * x)
    return y, log_jacobian, inside


def support_inverse(y: Any, lower: Any, upper: Any, xp: Any = np) -> Any:
    """The x of coordinates y (the inverse of `support_map` strictly inside the bounds)."""
    has_lo, has_hi = ~xp.isnan(lower), ~xp.isnan(upper)
    lo, hi = xp.where(has_lo, lower, 0.0), xp.where(has_hi, upper, 0.0)
    both = lo + xp.where(has_lo & has_hi, upper - lower, 1.0) / (1.0 + xp.exp(-y))
    return xp.where(has_lo & has_hi, both,
                    xp.where(has_lo, lo + xp.exp(y), xp.where(has_hi, hi - xp.exp(-y), y)))


@dataclass
class SupportCounts:
    """Per component: samples exactly at the lower / upper bound, and below / above them; rows
    with every component strictly inside; mergeable by addition."""

    at_lower: np.ndarray
    at_upper: np.ndarray
    below: np.ndarray
    above: np.ndarray
    inside_rows: int = 0
    rows: int = 0

    @classmethod
    def empty(cls, dim: int) -> SupportCounts:
        return cls(*(np.zeros(dim, np.int64) for _ in range(4)))

    @classmethod
    def of(cls, x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> SupportCounts:
        """Counts of finite states x (n, D)."""
        with np.errstate(invalid="ignore"):  # comparisons with nan (no bound) are False
            return cls((x == lower).sum(0), (x == upper).sum(0), (x < lower).sum(0), (x > upper).sum(0),
                       int(((x > np.nan_to_num(lower, nan=-np.inf)) & (x < np.nan_to_num(upper, nan=np.inf)))
                           .all(axis=1).sum()), len(x))

    def merge(self, other: SupportCounts) -> SupportCounts:
        return SupportCounts(self.at_lower + other.at_lower, self.at_upper + other.at_upper,
                             self.below + other.below, self.above + other.above,
                             self.inside_rows + other.inside_rows, self.rows + other.rows)

    @property
    def excluded_fraction(self) -> float:
        """The share of samples the model leaves out: some component at or beyond a bound."""
        return 1.0 - self.inside_rows / self.rows if self.rows else 0.0


@dataclass
class PointMasses:
    """Misra-Gries summaries of each component's values: [{value: count}] with at most
    `HEAVY_HITTER_SLOTS` entries; a value with a share above 1 / (slots + 1) is always kept,
    its count low by at most n / (slots + 1)."""

    counters: list[dict[float, int]] = field(default_factory=list)
    count: int = 0

    @classmethod
    def of(cls, x: np.ndarray) -> PointMasses:
        counters = []
        for column in x.T:
            values, counts = np.unique(column, return_counts=True)
            counters.append(_reduce(dict(zip(values.tolist(), counts.tolist(), strict=True))))
        return cls(counters, len(x))

    def merge(self, other: PointMasses) -> PointMasses:
        if not self.counters or not other.counters:
            return other if not self.counters else self
        merged = []
        for a, b in zip(self.counters, other.counters, strict=True):
            both = dict(a)
            for value, count in b.items():
                both[value] = both.get(value, 0) + count
            merged.append(_reduce(both))
        return PointMasses(merged, self.count + other.count)

    def large(self, threshold: float = POINT_MASS_WARN) -> list[tuple[int, float, float]]:
        """(component, value, share at least) of every value holding >= `threshold` of its component."""
        out = []
        for i, counter in enumerate(self.counters):
            for value, count in counter.items():
                if self.count and count / self.count >= threshold:
                    out.append((i, value, count / self.count))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "counters": [[[v, c] for v, c in sorted(k.items())] for k in self.counters]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointMasses:
        return cls([{float(v): int(c) for v, c in pairs} for pairs in d["counters"]], int(d["count"]))


def _reduce(counter: dict[float, int]) -> dict[float, int]:
    """Keep at most `HEAVY_HITTER_SLOTS` counters: subtract the next-largest count from all."""
    if len(counter) <= HEAVY_HITTER_SLOTS:
        return counter
    cut = sorted(counter.values(), reverse=True)[HEAVY_HITTER_SLOTS]
    return {v: c - cut for v, c in counter.items() if c > cut}


@dataclass
class Support:
    """What the statistics pass learns of a capsule's bounded components (`ebm_vae.data.support`):
    counts at and beyond the bounds, and the moments of the mapped values y (log / logit) over
    the samples strictly inside every bound, which the model z-scores y with. Mergeable."""

    lower: np.ndarray  # (D,), nan: no bound
    upper: np.ndarray
    counts: SupportCounts
    mapped: Moments

    @classmethod
    def empty(cls, lower: np.ndarray, upper: np.ndarray) -> Support:
        return cls(lower, upper, SupportCounts.empty(len(lower)), Moments.empty(len(lower)))

    def add(self, states: np.ndarray) -> None:
        x = states[np.isfinite(states).all(axis=1)].astype(np.float64)
        y, _, inside = support_map(x, self.lower, self.upper)
        self.counts = self.counts.merge(SupportCounts.of(x, self.lower, self.upper))
        self.mapped = self.mapped.merge(Moments.of(y[inside.all(axis=1)]))

    def merge(self, other: Support) -> Support:
        return Support(self.lower, self.upper, self.counts.merge(other.counts), self.mapped.merge(other.mapped))

    @property
    def std(self) -> np.ndarray:
        return floored_std(self.mapped.mean, self.mapped.raw_std)[0]

    def to_dict(self) -> dict[str, Any]:
        def bound(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in values]

        m, c = self.mapped, self.counts
        return {"lower": bound(self.lower), "upper": bound(self.upper),
                "at_lower": c.at_lower.tolist(), "at_upper": c.at_upper.tolist(),
                "below": c.below.tolist(), "above": c.above.tolist(), "inside_rows": c.inside_rows,
                "rows": c.rows, "excluded_fraction": c.excluded_fraction,
                "mapped": {"count": m.count, "mean": m.mean.tolist(), "m2": m.m2.tolist(),
                           "min": m.min.tolist(), "max": m.max.tolist()},
                "mean": m.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Support:
        def bound(values: list[float | None]) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        ints = {k: np.asarray(d[k], dtype=np.int64) for k in ("at_lower", "at_upper", "below", "above")}
        m = d["mapped"]
        zeros = np.zeros(len(m["mean"]), np.int64)
        mapped = Moments(int(m["count"]), *(np.asarray(m[k], dtype=np.float64) for k in ("mean", "m2", "min", "max")),
                         zeros, zeros)
        return cls(bound(d["lower"]), bound(d["upper"]),
                   SupportCounts(**ints, inside_rows=int(d["inside_rows"]), rows=int(d["rows"])), mapped)

    def report(self, capsule: str, names: tuple[str, ...]) -> None:
        """Warn about samples at or beyond the bounds: what the model leaves out, and why."""
        c = self.counts
        for i, name in enumerate(names):
            for what, counts, side in (("exactly at", c.at_lower, self.lower), ("exactly at", c.at_upper, self.upper),
                                       ("below", c.below, self.lower), ("above", c.above, self.upper)):
                if counts[i]:
                    log.warning("%s: %.3g%% of %s values are %s its bound %g (a point mass or outside the "
                                "support: left out of the density; see its metadata)",
                                capsule, 100.0 * counts[i] / max(c.rows, 1), name, what, side[i])
        if c.rows and c.inside_rows < c.rows:
            log.warning("%s: the model learns the density strictly inside the bounds, from %.3g%% of the "
                        "samples; its energies carry -log(1 - %.3g) for the %.3g%% left out",
                        capsule, 100.0 * c.inside_rows / c.rows, c.excluded_fraction,
                        100.0 * c.excluded_fraction)
