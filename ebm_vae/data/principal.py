"""The principal basis of field states: streaming accumulators, the spectrum, and the rank rule.

The field density (`ebm_vae.model.field`) models the leading r principal coefficients with the
learned core and the orthogonal residual as isotropic Gaussian noise; its quality at the
0.1-nat level rests on the basis and eigenvalues computed here. Two accumulators, both with
an exact `merge` (so workers, files and ranks can each hold one):

- `Covariance`: the exact covariance (float64, Chan's update of the co-moment matrix) for
  states of moderate size (D <= `crawl.exact_covariance_max_dim`; 768 components: 4.7 MB);
  its eigen-decomposition is the exact principal basis of all samples.
- `Reservoir`: a uniform random sample of at most `size` states for larger states, whose
  randomised SVD (Halko et al.) estimates the leading directions; its merge is exact and
  independent of the merge order (the states of smallest random key).

The rank is chosen by the Marchenko-Pastur rule (`choose_rank`); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RANK_FLOOR = 1  # the learned core needs at least one coefficient
NOISE_FLOOR_RELATIVE = 1e-6  # residual std floor, relative to the state's scale (as for z-scoring)


def finite_rows(states: np.ndarray) -> np.ndarray:
    """The rows of `states` with every component finite (what the statistics and the stream use)."""
    keep = np.isfinite(states).all(axis=1)
    return states if keep.all() else states[keep]


@dataclass
class Covariance:
    """Count, mean and co-moment matrix sum (x - mean)(x - mean)^T of finite states, float64."""

    count: int
    mean: np.ndarray
    comoment: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> Covariance:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, states: np.ndarray) -> Covariance:
        x = finite_rows(states).astype(np.float64)
        if not len(x):
            return cls.empty(states.shape[1])
        mean = x.mean(axis=0)
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)

    def merge(self, other: Covariance) -> Covariance:
        """Chan et al.'s pairwise update, exact for any split of the samples."""
        n = self.count + other.count
        if other.count == 0 or self.count == 0:
            return other if self.count == 0 else self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        comoment = self.comoment + other.comoment + np.outer(delta, delta) * (self.count * other.count / n)
        return Covariance(n, mean, comoment)

    def add(self, states: np.ndarray) -> None:
        merged = self.merge(Covariance.of(states))
        self.count, self.mean, self.comoment = merged.count, merged.mean, merged.comoment

    def spectrum(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues (D,) descending, the top-k eigenvectors as rows (k, D)) of the ML covariance."""
        values, vectors = np.linalg.eigh(self.comoment / max(self.count, 1))
        order = np.argsort(values)[::-1]
        return np.clip(values[order], 0.0, None), vectors[:, order[:k]].T


class Reservoir:
    """A uniform random sample without replacement of at most `size` states from a stream.

    Every finite state gets a random key, drawn in stream order from the reservoir's generator,
    and the sample is the `size` states of smallest key (a bottom-k sample). `merge` keeps the
    smallest keys of both, so the merge of reservoirs of disjoint streams is exactly the
    reservoir of their union, in any order and grouping: workers, files and ranks (each seeding
    its reservoirs per file) give the sample of one pass. `sample` is in key order, so it is
    the same array whatever the order of the merges. Storage grows with the states seen, up to
    `size` (a reservoir per small file stays small); a state that enters a full reservoir takes
    the row of the one it evicts, so a merge copies the entering states only (rebuilding the
    sample in key order on every merge made the statistics pass's serial part: 2 of 6 s on
    600 MB of 3 x 32 x 32 fields).
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        self.size, self.dim = size, dim
        self.data = np.empty((0, dim), dtype=np.float32)  # row i holds the state of keys[i]
        self.keys = np.empty(0)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    @property
    def sample(self) -> np.ndarray:
        """The kept states, in key order."""
        return self.data[np.argsort(self.keys, kind="stable")]

    def add(self, states: np.ndarray) -> None:
        """Take in a chunk: each of its finite states with a key of its own."""
        states = finite_rows(states)
        self.seen += len(states)
        self._keep(self.rng.random(len(states)), states)

    def merge(self, other: Reservoir) -> Reservoir:
        """Merge `other` (a reservoir of a disjoint stream) into this one, in place."""
        self.seen += other.seen
        self._keep(other.keys, other.data)
        return self

    def _keep(self, keys: np.ndarray, states: np.ndarray) -> None:
        held = len(self.keys)
        if held >= self.size and len(keys):  # only keys below the largest kept can enter
            entering = keys < self.keys.max()
            keys, states = keys[entering], states[entering]
        if not len(keys):
            return
        every = np.concatenate([self.keys, keys])
        if len(every) <= self.size:  # room for all: append
            self.keys, self.data = every, np.concatenate([self.data, states])
            return
        kept = np.argpartition(every, self.size - 1)[: self.size]
        entered = kept[kept >= held] - held
        # the rows of the evicted states, then new rows up to `size`: one per entering state
        evicted = np.setdiff1d(np.arange(held), kept[kept < held], assume_unique=True)
        rows = np.concatenate([evicted, np.arange(held, self.size)])
        if held < self.size:
            self.keys = np.concatenate([self.keys, np.empty(self.size - held)])
            self.data = np.concatenate([self.data, np.empty((self.size - held, self.dim), np.float32)])
        self.keys[rows] = keys[entered]
        self.data[rows] = states[entered]

    def spectrum(self, mean: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
        """(leading eigenvalues (<= k), eigenvectors as rows, total variance) of the sample's
        covariance about `mean`.

        The total is the sample's own, not the exact one of all states: the residual variance
        is total minus leading eigenvalues, and only totals and eigenvalues of one sample let
        their estimation errors cancel (with the exact total, a 2 % error of a leading
        eigenvalue of a strong mode would move a small residual variance by tens of percent).
        """
        sample = self.sample  # sorted into key order once
        basis = principal_basis(sample, mean, k, seed=seed)
        if basis is None:
            return np.zeros(0), np.zeros((0, self.dim)), 0.0
        total = sum(float(np.sum(np.square(block.astype(np.float64) - mean)))
                    for block in np.array_split(sample, max(1, len(sample) // 256)))
        return np.square(basis["std"]), basis["components"], total / len(sample)


Accumulator = Covariance | Reservoir


def principal_accumulator(dim: int, max_covariance_dim: int, reservoir_size: int,
                          seed: int = 0) -> Accumulator:
    """The exact covariance for states of up to `max_covariance_dim` components, else a reservoir."""
    if dim <= max_covariance_dim:
        return Covariance.empty(dim)
    return Reservoir(reservoir_size, dim, seed=seed)


def principal_basis(sample: np.ndarray, mean: np.ndarray, k: int, seed: int = 0,
                    power_iterations: int = 3, block_rows: int = 256) -> dict[str, np.ndarray] | None:
    """Top-k principal directions (unit rows, physical units, centred at `mean`) and the std
    along each, by a randomised SVD (Halko et al.) of the centred sample.

    The sample is centred block by block in float64, never copied whole: a reservoir of 4096
    states of 3 x 64 x 64 is 200 MB in float32 and a full SVD of it would need gigabytes.
    With k + 10 >= the sample's rank the result is the exact SVD's.
    """
    n, dim = sample.shape
    if n < 2:
        return None
    k = min(k, n, dim)
    rank = min(k + 10, n, dim)
    blocks = [slice(i, min(n, i + block_rows)) for i in range(0, n, block_rows)]

    def centred(rows: slice) -> np.ndarray:
        return sample[rows].astype(np.float64) - mean

    def times(v: np.ndarray) -> np.ndarray:  # X_c v: (n, r)
        return np.concatenate([centred(b) @ v for b in blocks])

    def transposed_times(u: np.ndarray) -> np.ndarray:  # X_c^T u: (dim, r)
        return sum(centred(b).T @ u[b] for b in blocks)

    q = np.linalg.qr(times(np.random.default_rng(seed).normal(size=(dim, rank))))[0]
    for _ in range(power_iterations):
        q = np.linalg.qr(times(np.linalg.qr(transposed_times(q))[0]))[0]
    _, s, vt = np.linalg.svd(transposed_times(q).T, full_matrices=False)
    return {"components": vt[:k], "std": s[:k] / np.sqrt(n)}


def noise_floor(mean: np.ndarray, total_variance: float) -> float:
    """The smallest residual variance the field density uses: (1e-6 x the state's scale)^2.

    Without it an exactly low-rank field (a sum of a few modes, stored in float32) would get a
    residual variance of float32 rounding noise, energies of -1e4 nats, and a wall against any
    state a rounding error off the data's subspace.
    """
    dim = len(mean)
    scale = max(float(np.sqrt(np.mean(np.square(mean)))), float(np.sqrt(total_variance / dim)))
    return max(NOISE_FLOOR_RELATIVE * scale, 1e-12) ** 2


def noise_variance(eigenvalues: np.ndarray, total_variance: float, dim: int, rank: int,
                   floor: float) -> float:
    """PPCA's maximum-likelihood residual variance: the mean of the D - r trailing eigenvalues.

    The trailing eigenvalues sum to the total variance (exact, from the per-component moments)
    minus the r leading ones, so they need not be known one by one.
    """
    if rank >= dim:
        return floor
    return max((total_variance - float(np.sum(eigenvalues[:rank]))) / (dim - rank), floor)


TRACY_WIDOM_QUANTILE = 2.0  # ~99th percentile of the TW1 law: noise eigenvalues above the edge


def choose_rank(eigenvalues: np.ndarray, total_variance: float, dim: int, samples: int,
                cap: int, floor: float) -> int:
    """The number of leading eigenvalues above the Marchenko-Pastur edge of the noise.

    White noise of variance s^2 in D dimensions, seen through n samples, has sample eigenvalues
    up to s^2 (1 + sqrt(D / n))^2 (plus Tracy-Widom fluctuations of relative size
    (sqrt(n) + sqrt(D)) (1/sqrt(n) + 1/sqrt(D))^(1/3) / n; Johnstone 2001). An eigenvalue above
    that edge is signal. s^2 is PPCA's estimate given the rank, so the two are iterated to a
    fixed point (the rank only grows, as each signal eigenvalue removed lowers s^2). Capped at
    `cap` (the stored components) and at least 1.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    cap = max(RANK_FLOOR, min(cap, len(eigenvalues), dim - 1, samples - 1))
    n, d = max(samples, 1), dim
    edge = (1.0 + np.sqrt(d / n)) ** 2
    edge += TRACY_WIDOM_QUANTILE * (np.sqrt(n) + np.sqrt(d)) * (1 / np.sqrt(n) + 1 / np.sqrt(d)) ** (1 / 3) / n
    rank = 0
    while True:
        noise = noise_variance(eigenvalues, total_variance, dim, rank, floor)
        above = int(np.sum(eigenvalues[:cap] > edge * noise))
        if above <= rank:
            return max(RANK_FLOOR, min(rank, cap))
        rank = above


def principal_summary(accumulator: Accumulator, mean: np.ndarray, variance: np.ndarray,
                      k: int) -> dict[str, Any] | None:
    """What `Stats.pca` stores: the top-k directions and stds, the spectrum and the chosen rank.

    `mean`, `variance`: the exact per-component moments of the same states. With the exact
    covariance the total variance is their sum (so the residual variance is exact, though
    only the leading eigenvalues are stored); with a reservoir it is the sample's own (see
    `Reservoir.spectrum`). `total_variance` is the one that goes with the eigenvalues.
    """
    dim = len(mean)
    if isinstance(accumulator, Covariance):
        eigenvalues, components = accumulator.spectrum(k)
        samples, total = accumulator.count, float(np.sum(variance))
    else:
        eigenvalues, components, total = accumulator.spectrum(mean, k)
        samples = len(accumulator.keys)  # the states held (`sample` would sort them)
    if samples < 2 or not len(components):
        return None
    floor = noise_floor(mean, float(np.sum(variance)))
    rank = choose_rank(eigenvalues, total, dim, samples, len(components), floor)
    return {"components": components, "std": np.sqrt(eigenvalues[: len(components)]),
            "eigenvalues": eigenvalues, "total_variance": total, "samples": samples, "rank": rank,
            "noise_variance": noise_variance(eigenvalues, total, dim, rank, floor),
            "noise_floor": floor}
