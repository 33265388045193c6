"""Per-component moments of states, mergeable exactly (Chan et al.), and the std floor of z-scoring.

The statistics pass (`ebm_vae.data.stats`) and the support statistics of bounded components
(`ebm_vae.data.support`) both accumulate them chunk by chunk and merge them over files,
workers and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STD_FLOOR_RELATIVE = 1e-6  # a std below this fraction of the component's scale is "constant"
STD_FLOOR_ABSOLUTE = 1e-12


@dataclass
class Moments:
    """Count, mean, sum of squared deviations (m2), min, max over finite samples; NaN/Inf counts."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nan_count: np.ndarray
    inf_count: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros(dim), np.full(dim, np.inf), np.full(dim, -np.inf),
                   np.zeros(dim, np.int64), np.zeros(dim, np.int64))

    @classmethod
    def of(cls, states: np.ndarray) -> Moments:
        """Moments of one chunk (n, D); rows with a non-finite component are counted, not used."""
        nan = np.isnan(states)
        inf = np.isinf(states)
        finite_rows = ~(nan | inf).any(axis=1)
        x = states[finite_rows].astype(np.float64) if not finite_rows.all() else states.astype(np.float64)
        out = cls.empty(states.shape[1])
        out.nan_count, out.inf_count = nan.sum(axis=0), inf.sum(axis=0)
        if len(x):
            out.count = len(x)
            out.mean = x.mean(axis=0)
            out.m2 = np.square(x - out.mean).sum(axis=0)
            out.min, out.max = x.min(axis=0), x.max(axis=0)
        return out

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s parallel update: exact for any split of the samples."""
        n = self.count + other.count
        if n == 0:
            mean, m2 = self.mean, self.m2
        else:
            delta = other.mean - self.mean
            mean = self.mean + delta * (other.count / n)
            m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n)
        return Moments(n, mean, m2, np.minimum(self.min, other.min), np.maximum(self.max, other.max),
                       self.nan_count + other.nan_count, self.inf_count + other.inf_count)

    @property
    def raw_std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count) if self.count else np.zeros_like(self.m2)


def floored_std(mean: np.ndarray, raw_std: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Floor near-constant components so z-scoring stays finite; returns (std, floored indices).

    The floor is relative to the component's magnitude (|mean|) or the state's largest std,
    whichever is larger, so it does not depend on the units.
    """
    scale = np.maximum(np.abs(mean), raw_std.max(initial=0.0))
    floor = np.maximum(STD_FLOOR_RELATIVE * scale, STD_FLOOR_ABSOLUTE)
    low = raw_std < floor
    return np.where(low, floor, raw_std), np.flatnonzero(low).tolist()
