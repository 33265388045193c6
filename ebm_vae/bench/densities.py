"""Test densities whose log p is known exactly, for accuracy claims in nats.

Two families, each in any dimension D, each with exact sampling:

- `GaussianMixture`: a few Gaussians with full covariances; log p by log-sum-exp.
- `CoupledDoubleWell`: a Boltzmann density p = exp(-U) / Z with U a sum of tilted quartic
  double wells along rotated axes. In the rotated frame U separates, so Z is a product of
  1-D integrals (done by quadrature on a fine grid); the rotation has unit Jacobian, so
  log p stays exact while, in the state's own coordinates, every pair of components is
  coupled. It has 2^D wells of unequal depth.

And two 2-D cases shaped like real data (`bench/accuracy.py`):

- `TripleWell`: the Boltzmann density of the classic three-well potential of the
  metastability literature (two deep wells, one shallow, curved channels between them);
  Z by quadrature on a fine grid, sampling by rejection from that grid (exact).
- `GridLike`: a power grid's (frequency, phase angle): frequency normal around 50 Hz with a
  small spread, the phase von Mises around an angle that follows the frequency deviation,
  wrapped to (-pi, pi], so the density has hard edges at +/- pi (+inf energy beyond).

`log_prob` takes (n, D) arrays and returns (n,) float64 nats; `energy = -log_prob`. `mode` is
the global maximum of p, so `min_energy` is the lowest energy the density has.
"""

from __future__ import annotations

import math
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


class TripleWell(Density):
    """p(x, y) = exp(-beta U(x, y)) / Z with the three-well potential

        U = 3 g(x, y - 1/3) - 3 g(x, y - 5/3) - 5 g(x - 1, y) - 5 g(x + 1, y)
            + 0.2 x^4 + 0.2 (y - 1/3)^4,    g(a, b) = exp(-a^2 - b^2),

    in units where the frequency-like axis and the second axis are scaled by `scale`.
    """

    name = "triple_well"
    dim = 2

    def __init__(self, beta: float = 1.67, scale: tuple[float, float] = (1.0, 1.0),
                 box: tuple[float, float, float, float] = (-3.0, 3.0, -2.5, 3.5), cells: int = 1200):
        self.beta = beta
        self.scale = np.asarray(scale, dtype=np.float64)
        x0, x1, y0, y1 = box
        self._edges = (np.linspace(x0, x1, cells + 1), np.linspace(y0, y1, cells + 1))
        xx, yy = np.meshgrid(*self._edges, indexing="ij")
        u = self.potential(xx, yy)
        self._u_min = float(u.min())
        # the box ends where beta U is > 30 nats above its minimum: the mass outside is < 1e-12
        weight = np.exp(-beta * (u - self._u_min))
        cell = (x1 - x0) * (y1 - y0) / cells**2
        # Simpson in both directions (cells is even), accurate far beyond float32 energies
        simpson = np.ones(cells + 1)
        simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
        integral = float(simpson @ weight @ simpson) * cell / 9.0
        self.log_z = math.log(integral) - beta * self._u_min + float(np.sum(np.log(self.scale)))
        # rejection envelope per cell: the largest corner weight, doubled (far above the
        # in-cell variation of a smooth density on a 1200^2 grid; checked in `sample`)
        corners = np.maximum.reduce([weight[:-1, :-1], weight[1:, :-1], weight[:-1, 1:], weight[1:, 1:]])
        self._envelope = 2.0 * corners
        self._cell_p = (self._envelope / self._envelope.sum()).ravel()
        self._mode = self._find_mode(xx, yy, u)

    @staticmethod
    def potential(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        def g(a, b):
            return np.exp(-a * a - b * b)

        return (3 * g(x, y - 1 / 3) - 3 * g(x, y - 5 / 3) - 5 * g(x - 1, y) - 5 * g(x + 1, y)
                + 0.2 * x**4 + 0.2 * (y - 1 / 3) ** 4)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64) / self.scale
        return -self.beta * self.potential(x[:, 0], x[:, 1]) - self.log_z

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        (ex, ey), cells = self._edges, len(self._edges[0]) - 1
        out = np.empty((0, 2))
        while len(out) < n:
            m = int(1.6 * (n - len(out))) + 64
            index = rng.choice(self._cell_p.size, size=m, p=self._cell_p)
            i, j = np.divmod(index, cells)
            x = ex[i] + (ex[i + 1] - ex[i]) * rng.random(m)
            y = ey[j] + (ey[j + 1] - ey[j]) * rng.random(m)
            weight = np.exp(-self.beta * (self.potential(x, y) - self._u_min))
            ratio = weight / self._envelope[i, j]
            if np.any(ratio > 1.0):
                raise AssertionError("triple well: the rejection envelope is not an upper bound")
            keep = rng.random(m) < ratio
            out = np.concatenate([out, np.stack([x[keep], y[keep]], axis=1)])
        return out[:n] * self.scale

    @property
    def mode(self) -> np.ndarray:
        return self._mode

    def _find_mode(self, xx, yy, u) -> np.ndarray:
        """The grid minimum, polished by Newton steps on the analytic potential (numerical derivatives)."""
        i, j = np.unravel_index(np.argmin(u), u.shape)
        p = np.array([xx[i, j], yy[i, j]])
        h = 1e-4
        for _ in range(30):
            def grad(q):
                return np.array([(self.potential(q[0] + h, q[1]) - self.potential(q[0] - h, q[1])) / (2 * h),
                                 (self.potential(q[0], q[1] + h) - self.potential(q[0], q[1] - h)) / (2 * h)])
            hess = np.stack([(grad(p + [h, 0]) - grad(p - [h, 0])) / (2 * h),
                             (grad(p + [0, h]) - grad(p - [0, h])) / (2 * h)])
            p = p - np.linalg.solve(hess, grad(p))
        return p * self.scale


class GridLike(Density):
    """(frequency, phase angle): f ~ N(nominal, sigma^2) Hz, and given f the phase is von Mises
    on (-pi, pi] with concentration kappa around coupling * (f - nominal) / sigma radians."""

    name = "grid_like"
    dim = 2

    def __init__(self, nominal: float = 50.0, sigma: float = 0.02, kappa: float = 1.0, coupling: float = 1.0):
        self.nominal, self.sigma, self.kappa, self.coupling = nominal, sigma, kappa, coupling
        self._log_norm_phase = math.log(2 * math.pi * float(np.i0(kappa)))

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        t = (x[:, 0] - self.nominal) / self.sigma
        log_f = -0.5 * t * t - math.log(self.sigma) - 0.5 * LOG_2PI
        log_phase = self.kappa * np.cos(x[:, 1] - self.coupling * t) - self._log_norm_phase
        inside = (x[:, 1] > -math.pi) & (x[:, 1] <= math.pi)
        return np.where(inside, log_f + log_phase, -np.inf)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        t = rng.standard_normal(n)
        phase = rng.vonmises(self.coupling * t, self.kappa)  # in [-pi, pi]
        phase = np.where(phase <= -math.pi, phase + 2 * math.pi, phase)  # (-pi, pi], as the grid extractor
        return np.stack([self.nominal + self.sigma * t, phase], axis=1)

    @property
    def mode(self) -> np.ndarray:
        return np.array([self.nominal, 0.0])


DENSITIES = {"boltzmann": CoupledDoubleWell, "mixture": GaussianMixture}


def make_density(name: str, dim: int, seed: int = 0) -> Density:
    return DENSITIES[name].random(dim, seed=seed)
