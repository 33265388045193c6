"""Marginal energies: F(a) = -log p(a) of linear map axes, every other direction integrated out.

Computed from a model's density and samples alone (no data is read); the map method around it
is `ebm_vae.energy.methods.marginal`. The derivation, the estimator's properties and its
measured accuracy are in docs/ARCHITECTURE.md, "Marginal maps". In short:

- The model's density is a function of coordinates y (the transform's model coordinates when
  the axes are affine in them, `StateTransform.affine_axes`; for vector states otherwise the
  z-scored state), and the axes are a = c + A y + e with e ~ N(0, R) exact and independent.
- Axes with R = 0 ("exact"): with A = U diag(S) V1^T, y = V1 s + V2 w and s = S^-1 U^T (a - c),
  p(a) = (1 / prod S) * integral p_y(V1 s + V2 w) dw over the off-axis directions w.
  Axes along which the model is only the exact residual (A = 0) multiply by their Gaussian.
- Axes with R > 0 (pixels of a field): p(a) = integral p_y(y) N(a; c + A y, R) dy.
- The integral is importance-sampled, k draws per grid point, from a proposal built from the
  model itself: a Gaussian mixture fitted to the model's samples (in y), conditioned on the
  grid point in closed form (`ebm_vae.energy.mixture`), plus a broad defensive Gaussian. Each
  draw is weighted by the model's own single-sample bound: exp(ELBO) is an unbiased estimate of
  p_y, so the mean weight is an unbiased estimate of p(a) and -log of it is, in expectation,
  an upper bound on F that tightens as k grows, as an importance-weighted bound does.
- The Monte Carlo standard error of F at each grid point comes from its k weights (delta
  method); points where it exceeds `TARGET_STDERR` get more draws, up to `MAX_K_FACTOR` x k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from ebm_vae.energy.mixture import ConditionalMixture, GaussianMixture
from ebm_vae.errors import ConfigError

log = logging.getLogger(__name__)

FIT_SAMPLES = 16384  # model samples the proposal mixture is fitted to
MAX_COMPONENTS = 32
DEFENSIVE_WEIGHT = 0.1  # share of draws from the broad Gaussian (bounds the weights in the tails)
DEFENSIVE_SCALE = 2.0  # its standard deviations relative to the model's
TARGET_STDERR = 0.05  # nats: grid points above it get more draws ...
MAX_K_FACTOR = 8  # ... up to this multiple of k
REFINE_NATS = 12.0  # ... when they lie within this many nats of the map's minimum
EXACT_TOLERANCE = 1e-6  # residual variance of an axis below this fraction of its total: exact
MAX_MODEL_DIM = 64  # coordinates beyond which importance sampling is not attempted
ROWS_PER_CALL = 65536  # model evaluations per call
PROPOSAL_ELEMENTS = 2**22  # float64 elements of the proposal's largest intermediate (32 MB)


class MarginalError(ConfigError):
    """A marginal map this model cannot give; the message says what to do instead."""


@dataclass
class ModelCoordinates:
    """The density to integrate: p_y over coordinates y (m), and the axes a = offset + matrix y + e."""

    dim: int
    log_density: Callable[[Tensor, torch.Generator], Tensor]  # (N, m) f64 -> (N,) f64, log of an unbiased estimate
    sample: Callable[[int, torch.Generator], Tensor]  # n -> (n, m) f64 draws of y from the model
    offset: Tensor  # (n,)
    matrix: Tensor  # (n, m)
    residual: Tensor  # (n, n)
    description: str = ""


@dataclass
class MarginalResult:
    energy: np.ndarray  # (G,) F in nats
    stderr: np.ndarray  # (G,) Monte Carlo standard error of F in nats
    draws: np.ndarray  # (G,) draws used per grid point
    info: dict = field(default_factory=dict)


def marginal_energy(coords: ModelCoordinates, points: np.ndarray, k: int, seed: int = 0,
                    progress: bool = False, description: str = "marginal") -> MarginalResult:
    """F(a) = -log p(a) in nats at the grid points (G, n) of the axes, from the model alone."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    generator = torch.Generator().manual_seed(int(seed))
    points = torch.as_tensor(np.asarray(points, dtype=np.float64))
    plan = _Plan.of(coords)
    if not plan.kernel and not bool(plan.exact.any()):  # only residual axes: the model integrates to 1
        energy = -plan.residual_log_density(points).numpy()
        return MarginalResult(energy, np.zeros_like(energy), np.zeros(len(energy), dtype=np.int64),
                              {"coordinates": coords.description, "integrated_dims": 0,
                               "residual_axes": plan.residual_axes})
    mixture, components = _fit_proposal(coords, generator)
    proposal = plan.proposal(mixture)
    defensive = plan.proposal(mixture.broadened(DEFENSIVE_SCALE))
    observed = plan.observed(points)
    g = len(points)
    total = torch.full((g,), -math.inf, dtype=torch.float64)  # log sum of weights
    total_sq = torch.full((g,), -math.inf, dtype=torch.float64)  # log sum of squared weights
    draws = torch.zeros(g, dtype=torch.int64)
    # grid points per pass: ROWS_PER_CALL model rows, and the proposal's (points, draws, components,
    # dims) differences within PROPOSAL_ELEMENTS
    components_total = len(mixture.weights) + 1
    chunk = max(1, min(ROWS_PER_CALL // k, PROPOSAL_ELEMENTS // (k * components_total * max(plan.free_dim, 1))))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"{description} (k={k}, {plan.free_dim} dims integrated)", total=g)
        pending = torch.arange(g)
        while len(pending):
            for start in range(0, len(pending), chunk):
                index = pending[start:start + chunk]
                log_w = _weights(coords, plan, proposal, defensive, observed[index], points[index], k, generator)
                total[index] = torch.logaddexp(total[index], torch.logsumexp(log_w, dim=1))
                total_sq[index] = torch.logaddexp(total_sq[index], torch.logsumexp(2 * log_w, dim=1))
                draws[index] += k
                if int(draws[index].min()) == k:
                    bar.advance(task, len(index))
            pending = _to_refine(total, total_sq, draws, k)
    log_p = total - torch.log(draws.double())
    energy = (-log_p + plan.log_scale).numpy() - plan.residual_log_density(points).numpy()
    stderr = _stderr(total, total_sq, draws).numpy()
    info = {"coordinates": coords.description, "integrated_dims": plan.free_dim,
            "proposal": {"fit_samples": FIT_SAMPLES, "components": components,
                         "defensive_weight": DEFENSIVE_WEIGHT, "defensive_scale": DEFENSIVE_SCALE},
            "k": k, "k_max": MAX_K_FACTOR * k, "target_stderr_nats": TARGET_STDERR,
            "points_refined": int((draws > k).sum()), "exact_axes": plan.exact_axes,
            "residual_axes": plan.residual_axes, "kernel_axes": plan.kernel_axes}
    return MarginalResult(energy, stderr, draws.numpy(), info)


def _weights(coords, plan, proposal, defensive, observed, points, k, generator) -> Tensor:
    """log importance weights (G, k): log p_y(y) (+ kernel) - log q, draws from the proposal."""
    g = len(observed)
    if plan.free_dim == 0:  # nothing to integrate: the density on the axes' point itself
        y = plan.state(observed, torch.zeros(g, k, 0, dtype=torch.float64))
        return coords.log_density(y.reshape(g * k, -1), generator).view(g, k)
    mix_w, mix_means = proposal.at(observed)
    def_w, def_means = defensive.at(observed)
    from_defensive = torch.rand((g, k), generator=generator, dtype=torch.float64) < DEFENSIVE_WEIGHT
    w = torch.where(from_defensive[..., None], defensive.sample(def_w, def_means, k, generator),
                    proposal.sample(mix_w, mix_means, k, generator))
    log_q = torch.logaddexp(math.log1p(-DEFENSIVE_WEIGHT) + proposal.log_prob(w, mix_w, mix_means),
                            math.log(DEFENSIVE_WEIGHT) + defensive.log_prob(w, def_w, def_means))
    y = plan.state(observed, w)
    log_p = coords.log_density(y.reshape(g * k, -1), generator).view(g, k)
    return log_p + plan.kernel_log_density(points, y) - log_q


def _stderr(total: Tensor, total_sq: Tensor, draws: Tensor) -> Tensor:
    """Delta-method standard error of log(mean w) from the sums of w and w^2 (0 for one draw)."""
    n = draws.double()
    relative_var = torch.expm1(total_sq + torch.log(n) - 2 * total).clamp(min=0.0) / (n - 1).clamp(min=1)
    return torch.sqrt(relative_var)


def _to_refine(total: Tensor, total_sq: Tensor, draws: Tensor, k: int) -> Tensor:
    """Grid points near the minimum whose standard error is above target and k not yet at its cap."""
    energy = -(total - torch.log(draws.double()))
    near = energy <= energy[torch.isfinite(energy)].min() + REFINE_NATS if torch.isfinite(energy).any() \
        else torch.ones_like(energy, dtype=torch.bool)
    noisy = (_stderr(total, total_sq, draws) > TARGET_STDERR) | ~torch.isfinite(energy)
    return torch.nonzero(near & noisy & (draws < MAX_K_FACTOR * k)).flatten()


def _fit_proposal(coords: ModelCoordinates, generator: torch.Generator) -> tuple[GaussianMixture, int]:
    """The mixture of the model's samples; components doubled while a held-out fifth gains."""
    y = coords.sample(FIT_SAMPLES, generator).double()
    y = y[torch.isfinite(y).all(dim=1)]
    held = len(y) // 5
    train, test = y[held:], y[:held]
    best, best_score, components = None, -math.inf, 1
    while components <= MAX_COMPONENTS:
        mixture = GaussianMixture.fit(train, components, generator)
        score = float(mixture.log_prob(test).mean())
        if score < best_score + 0.01:
            break
        best, best_score = mixture, score
        components *= 2
    return best, len(best.weights)


@dataclass
class _Plan:
    """Which axes are exact, residual-only or blurred by the residual, and the coordinates that follow."""

    coords: ModelCoordinates
    exact: Tensor  # bool (n,)
    residual_only: Tensor  # bool (n,)
    kernel: bool  # every axis blurred by the residual: p(a) = integral p_y(y) N(a; c + A y, R) dy
    u: Tensor | None = None  # exact axes: SVD pieces of A
    singular: Tensor | None = None
    v1: Tensor | None = None
    v2: Tensor | None = None

    @classmethod
    def of(cls, coords: ModelCoordinates) -> _Plan:
        a, r = coords.matrix.double(), coords.residual.double()
        if coords.dim > MAX_MODEL_DIM:
            raise MarginalError(f"the model's density lives in {coords.dim} coordinates here ({coords.description}); "
                                f"a marginal map integrates at most {MAX_MODEL_DIM}: use export.quantity=slice, "
                                f"or method=histogram")
        signal = (a.square()).sum(dim=1)
        noise = torch.diagonal(r)
        exact = noise <= EXACT_TOLERANCE * (signal + noise)
        residual_only = signal <= EXACT_TOLERANCE * (signal + noise)
        if bool((exact | residual_only).all()):
            plan = cls(coords, exact, residual_only & ~exact, kernel=False)
            if bool(plan.exact.any()):
                u, s, vt = torch.linalg.svd(a[plan.exact], full_matrices=True)
                n = int(plan.exact.sum())
                if float(s.min()) <= 1e-12 * float(s.max()):
                    raise MarginalError("export.axes: the map axes are not independent directions of the model")
                plan.u, plan.singular, plan.v1, plan.v2 = u, s, vt[:n].T, vt[n:].T
            return plan
        try:
            torch.linalg.cholesky(r)
        except RuntimeError:
            raise MarginalError("export.axes: some axes mix modelled and residual directions while others are "
                                "exact; map them separately") from None
        return cls(coords, torch.zeros_like(exact), torch.zeros_like(exact), kernel=True)

    @property
    def free_dim(self) -> int:
        if self.kernel:
            return self.coords.dim
        return self.coords.dim - int(self.exact.sum())

    @property
    def exact_axes(self) -> list[int]:
        return torch.nonzero(self.exact).flatten().tolist()

    @property
    def residual_axes(self) -> list[int]:
        return torch.nonzero(self.residual_only).flatten().tolist()

    @property
    def kernel_axes(self) -> list[int]:
        return list(range(len(self.exact))) if self.kernel else []

    @property
    def log_scale(self) -> float:
        """log prod S: the Jacobian from the exact axes to their coordinates s."""
        return 0.0 if self.singular is None else float(torch.log(self.singular).sum())

    def proposal(self, mixture: GaussianMixture) -> ConditionalMixture | None:
        if self.free_dim == 0:
            return None
        if self.kernel:
            return mixture.condition(self.coords.matrix, self.coords.residual,
                                     torch.eye(self.coords.dim, dtype=torch.float64))
        return mixture.condition(self.v1.T, torch.zeros(len(self.singular), len(self.singular), dtype=torch.float64),
                                 self.v2.T)

    def observed(self, points: Tensor) -> Tensor:
        """What the proposal conditions on: s of the exact axes, or a - c for the kernel."""
        centred = points - self.coords.offset
        if self.kernel:
            return centred
        if self.singular is None:
            return centred[:, :0]
        return (centred[:, self.exact] @ self.u) / self.singular

    def state(self, observed: Tensor, w: Tensor) -> Tensor:
        """y (G, S, m) of the free coordinates w (G, S, f) at the observations."""
        if self.kernel:
            return w
        y = w @ self.v2.T if self.v2 is not None else w.new_zeros(*w.shape[:2], self.coords.dim)
        if self.v1 is not None:
            y = y + (observed @ self.v1.T)[:, None, :]
        return y

    def kernel_log_density(self, points: Tensor, y: Tensor) -> Tensor:
        """log N(a; c + A y, R) of the kernel case (G, S); 0 otherwise."""
        if not self.kernel:
            return torch.zeros(y.shape[:2], dtype=torch.float64)
        mean = self.coords.offset + y @ self.coords.matrix.T  # (G, S, n)
        chol = torch.linalg.cholesky(self.coords.residual)
        white = torch.linalg.solve_triangular(chol, (points[:, None, :] - mean).transpose(1, 2), upper=False)
        log_det = torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (white.square().sum(dim=1) + len(chol) * math.log(2 * math.pi)) - log_det

    def residual_log_density(self, points: Tensor) -> Tensor:
        """log N(a_res; c_res, R_res) of the residual-only axes, independent of the model's part."""
        if not bool(self.residual_only.any()):
            return torch.zeros(len(points), dtype=torch.float64)
        idx = self.residual_only
        r = self.coords.residual[idx][:, idx]
        chol = torch.linalg.cholesky(r)
        centred = (points[:, idx] - self.coords.offset[idx]).T
        white = torch.linalg.solve_triangular(chol, centred, upper=False)
        return -0.5 * (white.square().sum(dim=0) + len(r) * math.log(2 * math.pi)) - torch.log(torch.diagonal(chol)).sum()
