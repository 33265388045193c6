"""Test densities whose log p is known exactly, for accuracy claims in nats.

Two families, each in any dimension D, each with exact sampling:

- `GaussianMixture`: a few Gaussians with full covariances; log p by log-sum-exp.
- `CoupledDoubleWell`: a Boltzmann density p = exp(-U) / Z with U a sum of tilted quartic
  double wells along rotated axes. In the rotated frame U separates, so Z is a product of
  1-D integrals (done by quadrature on a fine grid); the rotation has unit Jacobian, so
  log p stays exact while, in the state's own coordinates, every pair of components is
  coupled. It has 2^D wells of unequal depth.

`log_prob` takes (n, D) arrays and returns (n,) float64 nats; `energy = -log_prob`. `mode` is
the global maximum of p, so `min_energy` is the lowest energy the density has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

LOG_2PI = float(np.log(2.0 * np.pi))


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(a - top), axis=axis))


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


class Density(ABC):
    name: str
    dim: int

    @abstractmethod
    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """(n, D) -> (n,) exact log density in nats."""

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, D) float64 independent exact samples."""

    @property
    @abstractmethod
    def mode(self) -> np.ndarray:
        """(D,) the global maximum of p."""

    def energy(self, x: np.ndarray) -> np.ndarray:
        return -self.log_prob(x)

    @property
    def min_energy(self) -> float:
        return float(self.energy(self.mode[None])[0])


class GaussianMixture(Density):
    """sum_k w_k N(mu_k, A_k A_k^T) with A_k = Q_k diag(s_k), Q_k a rotation."""

    name = "mixture"

    def __init__(self, weights: np.ndarray, means: np.ndarray, rotations: np.ndarray,
                 scales: np.ndarray):
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.means = np.asarray(means, dtype=np.float64)  # (K, D)
        self.rotations = np.asarray(rotations, dtype=np.float64)  # (K, D, D)
        self.scales = np.asarray(scales, dtype=np.float64)  # (K, D)
        self.dim = self.means.shape[1]
        self._mode = self._find_mode()

    @classmethod
    def random(cls, dim: int, n_components: int = 6, seed: int = 0) -> GaussianMixture:
        """Components spread over [-3, 3]^D, widths 0.35 to 0.9, weights 0.5 to 1.5 (normalised)."""
        rng = np.random.default_rng([seed, dim, 1])
        means = rng.uniform(-3.0, 3.0, size=(n_components, dim))
        rotations = np.stack([random_rotation(dim, rng) for _ in range(n_components)])
        scales = rng.uniform(0.35, 0.9, size=(n_components, dim))
        weights = rng.uniform(0.5, 1.5, size=n_components)
        return cls(weights, means, rotations, scales)

    def component_log_prob(self, x: np.ndarray) -> np.ndarray:
        """(n, K): log w_k + log N(x; mu_k, Sigma_k)."""
        x = np.asarray(x, dtype=np.float64)
        diff = x[:, None, :] - self.means[None]  # (n, K, D)
        white = np.einsum("nkd,kde->nke", diff, self.rotations) / self.scales[None]  # A_k^-1 (x - mu_k)
        log_det = np.sum(np.log(self.scales), axis=1)  # log |det A_k|
        return (np.log(self.weights)[None] - 0.5 * np.sum(white**2, axis=2) - log_det[None]
                - 0.5 * self.dim * LOG_2PI)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return logsumexp(self.component_log_prob(x), axis=1)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        x = rng.standard_normal((n, self.dim))
        for k in range(len(self.weights)):
            chosen = labels == k
            x[chosen] = self.means[k] + (x[chosen] * self.scales[k]) @ self.rotations[k].T
        return x

    @property
    def mode(self) -> np.ndarray:
        return self._mode

    def _find_mode(self, iterations: int = 200) -> np.ndarray:
        """Fixed-point (mean-shift) iteration from every component mean; keep the best.

        grad log p = sum_k r_k P_k (mu_k - x) = 0 with P_k = Sigma_k^-1 and r_k the
        responsibilities, so x = (sum r_k P_k)^-1 sum r_k P_k mu_k at a stationary point.
        """
        precisions = np.einsum("kde,ke,kfe->kdf", self.rotations, self.scales**-2, self.rotations)
        x = self.means.copy()
        for _ in range(iterations):
            comp = self.component_log_prob(x)
            resp = np.exp(comp - logsumexp(comp, axis=1)[:, None])  # (m, K)
            precision = np.einsum("mk,kdf->mdf", resp, precisions)
            pulled = np.einsum("mk,kdf,kf->md", resp, precisions, self.means)
            x = np.linalg.solve(precision, pulled[..., None])[..., 0]
        return x[np.argmax(self.log_prob(x))]


class CoupledDoubleWell(Density):
    """p(x) = exp(-sum_i u_i((R^T x)_i)) / Z, u_i(y) = a_i (t^2 - 1)^2 + b_i t with t = y / s_i.

    a_i is the barrier height (nats) of the untilted well, b_i the tilt that makes one side
    deeper, s_i the distance of the minima from the origin.
    """

    name = "boltzmann"

    def __init__(self, barriers: np.ndarray, tilts: np.ndarray, widths: np.ndarray,
                 rotation: np.ndarray, grid_points: int = 20001, half_range: float = 3.0):
        self.barriers = np.asarray(barriers, dtype=np.float64)
        self.tilts = np.asarray(tilts, dtype=np.float64)
        self.widths = np.asarray(widths, dtype=np.float64)
        self.rotation = np.asarray(rotation, dtype=np.float64)
        self.dim = len(self.barriers)
        # Per-axis quadrature grid (G, D): beyond |t| = 3 the potential is >= 64 a_i nats above
        # its minimum, so the truncated mass is far below float64 resolution of log Z.
        t = np.linspace(-half_range, half_range, grid_points)
        self._grid = t[:, None] * self.widths[None, :]
        u = self.axis_potential(self._grid)
        u_min = u.min(axis=0)
        weight = np.exp(-(u - u_min))
        cells = 0.5 * (weight[1:] + weight[:-1]) * (self._grid[1] - self._grid[0])  # trapezoid
        self.log_z = np.log(cells.sum(axis=0)) - u_min  # (D,)
        self._cdf = np.concatenate([np.zeros((1, self.dim)), np.cumsum(cells, axis=0)])
        self._cdf /= self._cdf[-1]
        grid_min = self._grid[u.argmin(axis=0), np.arange(self.dim)]
        self._mode = self.rotation @ self._axis_minima(grid_min)

    @classmethod
    def random(cls, dim: int, seed: int = 0) -> CoupledDoubleWell:
        """Barriers 1 to 2.5 nats, tilts within +/-0.6 nats, minima at +/-(0.7 to 1.4)."""
        rng = np.random.default_rng([seed, dim, 2])
        return cls(barriers=rng.uniform(1.0, 2.5, dim), tilts=rng.uniform(-0.6, 0.6, dim),
                   widths=rng.uniform(0.7, 1.4, dim), rotation=random_rotation(dim, rng))

    def axis_potential(self, y: np.ndarray) -> np.ndarray:
        """u_i(y_i) elementwise for y of shape (..., D) in the rotated frame."""
        t = y / self.widths
        return self.barriers * (t**2 - 1.0) ** 2 + self.tilts * t

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64) @ self.rotation  # rows are R^T x
        return -np.sum(self.axis_potential(y), axis=1) - float(np.sum(self.log_z))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Inverse CDF per rotated axis on the quadrature grid, then rotate."""
        uniform = rng.random((n, self.dim))
        y = np.stack([np.interp(uniform[:, i], self._cdf[:, i], self._grid[:, i])
                      for i in range(self.dim)], axis=1)
        return y @ self.rotation.T

    @property
    def mode(self) -> np.ndarray:
        return self._mode

    def _axis_minima(self, y0: np.ndarray) -> np.ndarray:
        """Newton steps on u_i'(y) = 0 from the grid minimum (accurate to float64)."""
        a, b, s = self.barriers, self.tilts, self.widths
        t = y0 / s
        for _ in range(20):
            t = t - (4 * a * t**3 - 4 * a * t + b) / (12 * a * t**2 - 4 * a)
        return t * s


DENSITIES = {"boltzmann": CoupledDoubleWell, "mixture": GaussianMixture}


def make_density(name: str, dim: int, seed: int = 0) -> Density:
    return DENSITIES[name].random(dim, seed=seed)
