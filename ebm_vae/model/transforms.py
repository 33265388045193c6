"""State transforms: physical states -> the coordinates a learned density works in.

The density of a physical state x is

    log p(x) = log p_core(u) + log_det(x),    (u, log_det) = transform(x)

where `p_core` is the learned part (the VAE's bound, or a flow) and `log_det` holds every
exact term: the log-Jacobian of the change of variables, and any part of the density that
is modelled in closed form rather than learned. Keeping those terms here means the learned
core only ever sees well-scaled coordinates, and the energy stays -log p(x) for the density
in the physical units of the state.

The stream yields physical float32 states; a transform runs inside the model (on its
device), so normalisation costs nothing on the data-loading side.

`build_transform` picks one per state: `PrincipalField` for field states (the learned core
models r whitened principal coefficients, an exact Gaussian the residual; it contains
probabilistic PCA), `Bounded` for vector states with physical bounds (log / logit, the exact
Jacobian, +inf outside), `Standardize` (z-scoring) for the other vector states.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.data.principal import noise_floor, noise_variance
from ebm_vae.data.support import component_bounds, support_inverse, support_map

LOG_2PI = math.log(2.0 * math.pi)


class AffineAxes(NamedTuple):
    """Map coordinates a = rows @ (x - origin) as a function of the model coordinates u (flat):
    a = offset + matrix @ u + e with e ~ N(0, residual) independent of u (float64 tensors)."""

    offset: Tensor  # (n,)
    matrix: Tensor  # (n, prod(out_shape))
    residual: Tensor  # (n, n)


class StateTransform(nn.Module, ABC):
    """Physical flat states (N, D) -> model coordinates u (N, *out_shape) and log_det (N,)."""

    def __init__(self, state: StateInfo):
        super().__init__()
        self.state = state

    @property
    @abstractmethod
    def out_shape(self) -> tuple[int, ...]:
        """The shape of one state in model coordinates (what the core density sees)."""

    @property
    @abstractmethod
    def log_scale(self) -> float:
        """The constant part of -log_det: the log-volume of the normalisation, in nats.

        Logged metrics in "normalised units" (`val/iwae`) leave it out; `val/iwae_phys` and
        every exported energy include it.
        """

    @abstractmethod
    def set_statistics(self, stats: Any) -> None:
        """Adopt the crawl's statistics (`ebm_vae.data.stats.Stats` or a look-alike)."""

    @abstractmethod
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(u, log_det) for physical states x (N, D) float32: u float32, log_det float64.

        float64 because log_det can be a sum over thousands of components (a 3 x 64 x 64
        field's -sum(log std) is ~1e4 nats), where float32 would round away 1e-3 nats.
        """

    def describe(self) -> dict[str, Any]:
        """What an energy map's metadata should say about the transform (bounds, rank, ...)."""
        return {}

    @abstractmethod
    def inverse(self, u: Tensor, generator: torch.Generator | None = None, *, draw: bool = True) -> Tensor:
        """Physical states (N, D) of model coordinates u: draws x ~ p(x | u), so that samples of
        the core density become samples of p(x) (a deterministic inverse where x is a function
        of u; a draw of the closed-form part, e.g. a residual, where it is not). `draw=False`
        gives the mean of p(x | u) instead (reconstructions)."""

    def affine_axes(self, rows: Tensor, origin: Tensor) -> AffineAxes | None:
        """How linear map axes a = rows @ (x - origin) (rows (n, D), origin (D,), float64) depend
        on the model coordinates, where they do affinely (`AffineAxes`); None where they do not
        (a nonlinear transform). Marginal energy maps integrate in model coordinates with it
        (ebm_vae/energy/methods/marginal.py)."""
        return None


class Standardize(StateTransform):
    """u = (x - mean) / std per component, reshaped to the state's shape; log_det = -sum log std."""

    def __init__(self, state: StateInfo):
        super().__init__(state)
        self.register_buffer("mean", torch.zeros(state.dim))
        self.register_buffer("std", torch.ones(state.dim))

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.state.shape)

    @property
    def log_scale(self) -> float:
        return float(torch.log(self.std.double()).sum())

    def set_statistics(self, stats: Any) -> None:
        dim = self.state.dim
        self.mean = torch.as_tensor(np.asarray(stats.mean, dtype=np.float32).reshape(dim),
                                    device=self.mean.device)
        self.std = torch.as_tensor(np.asarray(stats.std, dtype=np.float32).reshape(dim),
                                   device=self.std.device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = (x.reshape(x.shape[0], -1) - self.mean) / self.std
        log_det = torch.full((x.shape[0],), -self.log_scale, device=x.device, dtype=torch.float64)
        return u.reshape(x.shape[0], *self.out_shape), log_det

    def inverse(self, u: Tensor, generator: torch.Generator | None = None, *, draw: bool = True) -> Tensor:
        return u.reshape(u.shape[0], -1) * self.std + self.mean

    def affine_axes(self, rows: Tensor, origin: Tensor) -> AffineAxes:
        """x = mean + std * u exactly: a = rows (mean - origin) + (rows * std) u."""
        rows = rows.double()
        return AffineAxes(rows @ (self.mean.double() - origin), rows * self.std.double(),
                          torch.zeros(len(rows), len(rows), dtype=torch.float64, device=rows.device))


class PrincipalField(StateTransform):
    """The field density: r learned principal coefficients and an exact Gaussian residual.

    A field state x (D = C x H x W components, physical units) is split by an orthonormal
    basis W (r x D, the leading principal directions of the data) into coefficients and a
    residual in the (D - r)-dimensional orthogonal complement:

        c = x - mu,   a = W c,   u_j = a_j / sqrt(lambda_j),   e = c - W^T a.

    The learned core models only the whitened coefficients u; the residual is modelled
    exactly by isotropic noise N(0, s^2 I) in the complement. x -> (a, e) is orthogonal, so

        log p(x) = log p_core(u) - 1/2 sum_j log lambda_j - (D - r)/2 log(2 pi s^2) - |e|^2 / (2 s^2),

    every term after the first being `log_det`, and any bound on log p_core(u) (ELBO, IWAE) is
    a bound on log p(x). With a standard-normal core this is probabilistic PCA of rank r
    (Tipping & Bishop 1999: covariance W^T Lambda W + s^2 (I - W^T W)); with the statistics'
    lambda_j and s^2 (leading eigenvalues of the sample covariance, mean of the others) it is
    PPCA's maximum-likelihood fit, so the learned core starts from PPCA and adds what a
    Gaussian misses. Derivation, rank rule and limits: docs/ARCHITECTURE.md, "Field density".

    Buffers (float64, physical units): `mean` (D,), `basis` (r, D) orthonormal rows,
    `eigenvalues` (r,) the variances along them, `noise_variance` () s^2 of the residual.
    float64 throughout: the residual term sums hundreds of squares of small differences of
    large numbers (fields of ~300 K varying by 0.01 K), where float32 would cost nats.
    """

    def __init__(self, state: StateInfo, rank: int):
        super().__init__(state)
        dim = state.dim
        if not 1 <= rank < dim:
            raise ValueError(f"field rank must be in [1, {dim - 1}] for a state of {dim} components, got {rank}")
        self.rank = rank
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("basis", torch.eye(rank, dim, dtype=torch.float64))
        self.register_buffer("eigenvalues", torch.ones(rank, dtype=torch.float64))
        self.register_buffer("noise_variance", torch.ones((), dtype=torch.float64))

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.rank,)

    @property
    def log_scale(self) -> float:
        """The log-volume of whitening, x -> (u, e / s): 1/2 sum log lambda_j + (D - r) log s.

        So the logged `val/*` losses are -log p of the whitened state (u, e / s), the
        residual's standard-normal density included.
        """
        residual_dims = self.state.dim - self.rank
        return float(0.5 * torch.log(self.eigenvalues).sum() + 0.5 * residual_dims * torch.log(self.noise_variance))

    def set_statistics(self, stats: Any) -> None:
        """Basis, variances and residual variance from `stats.pca` (see `principal_summary`).

        The basis rows are re-orthonormalised in float64 (JSON round trips and float32 copies
        leave them orthonormal only to ~1e-7, and the Jacobian assumes exactly orthonormal).
        """
        pca = getattr(stats, "pca", None) or {}
        components = np.asarray(pca.get("components", np.zeros((0, self.state.dim))), dtype=np.float64)
        if len(components) < self.rank:
            raise ValueError(f"the statistics hold {len(components)} principal components; the field "
                             f"density needs {self.rank} (raise crawl.n_components and re-run the "
                             f"statistics pass)")
        mean = np.asarray(stats.mean, dtype=np.float64).reshape(self.state.dim)
        if "eigenvalues" in pca:
            eigenvalues = np.asarray(pca["eigenvalues"], dtype=np.float64)
            total = float(pca["total_variance"])
        else:  # statistics written before the spectrum was stored
            eigenvalues = np.square(np.asarray(pca["std"], dtype=np.float64))
            total = float(np.sum(np.square(np.asarray(stats.raw_std, dtype=np.float64))))
        floor = float(pca["noise_floor"]) if "noise_floor" in pca else noise_floor(mean, total)
        s2 = noise_variance(eigenvalues, total, self.state.dim, self.rank, floor)
        q, r = np.linalg.qr(components[: self.rank].T)
        basis = (q * np.sign(np.diag(r))).T  # the same directions, exactly orthonormal
        def buffer(values: Any) -> Tensor:
            return torch.as_tensor(values, dtype=torch.float64, device=self.mean.device)

        self.mean, self.basis = buffer(mean), buffer(basis)
        # PPCA's leading variances are never below the residual's (equal where the data are flat)
        self.eigenvalues = buffer(np.maximum(eigenvalues[: self.rank], s2))
        self.noise_variance = buffer(s2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        centred = x.reshape(x.shape[0], -1).double() - self.mean
        coefficients = centred @ self.basis.T
        residual = centred - coefficients @ self.basis
        u = coefficients / torch.sqrt(self.eigenvalues)
        residual_dims = self.state.dim - self.rank
        log_det = (-0.5 * torch.log(self.eigenvalues).sum()
                   - 0.5 * residual_dims * (LOG_2PI + torch.log(self.noise_variance))
                   - 0.5 * residual.square().sum(dim=1) / self.noise_variance)
        return u.float(), log_det

    def describe(self) -> dict[str, Any]:
        return {"field_rank": self.rank, "residual_std": float(torch.sqrt(self.noise_variance)),
                "energy": "-log p of the full field: the learned density of the leading principal "
                          "coefficients times an exact isotropic Gaussian of the residual"}

    def inverse(self, u: Tensor, generator: torch.Generator | None = None, *, draw: bool = True) -> Tensor:
        """mu + W^T (sqrt(lambda) u), plus a draw of the residual noise (without `draw`: the
        mean of p(x | u), the reconstruction from the coefficients alone)."""
        x = self.mean + (u.reshape(u.shape[0], -1).double() * torch.sqrt(self.eigenvalues)) @ self.basis
        if draw:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            noise = noise - (noise @ self.basis.T) @ self.basis  # projected onto the complement
            x = x + torch.sqrt(self.noise_variance) * noise
        return x.float()

    def affine_axes(self, rows: Tensor, origin: Tensor) -> AffineAxes:
        """x = mu + W^T (sqrt(lambda) u) + e, e ~ N(0, s^2 (I - W^T W)): a = rows (mu - origin)
        + (rows W^T sqrt(lambda)) u + rows e, the last with covariance s^2 (P P^T - P W^T W P^T)."""
        rows = rows.double()
        projected = rows @ self.basis.T  # (n, r)
        residual = self.noise_variance * (rows @ rows.T - projected @ projected.T)
        return AffineAxes(rows @ (self.mean - origin), projected * torch.sqrt(self.eigenvalues), residual)


class Bounded(StateTransform):
    """Vector states with physical bounds: y = log / logit of each bounded component
    (`ebm_vae.data.support.support_map`), then z-scoring of y with its own moments.

        log p(x) = log p_core(u) + sum_i log |dy_i/dx_i| - sum_i log std_i + log(1 - w)

    strictly inside every bound, and log_det = -inf at or beyond one (E = +inf: no mass there).
    The density is proper on the open support. w is the share of the data the statistics
    found at or beyond a bound (a point mass such as irradiance 0 at night), which the model
    leaves out of training: its energies are those of the continuous part, -log((1 - w) p_c),
    on the scale of a histogram of all samples. u stays finite for every input (the mean
    stands in at or beyond a bound), so the networks never see a NaN.
    """

    def __init__(self, state: StateInfo, lower: np.ndarray, upper: np.ndarray):
        super().__init__(state)
        self.register_buffer("lower", torch.as_tensor(lower, dtype=torch.float64))  # nan: none
        self.register_buffer("upper", torch.as_tensor(upper, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(state.dim, dtype=torch.float64))  # of y
        self.register_buffer("std", torch.ones(state.dim, dtype=torch.float64))
        self.register_buffer("log_mass", torch.zeros((), dtype=torch.float64))  # log(1 - w)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.state.shape)

    @property
    def log_scale(self) -> float:
        return float(torch.log(self.std).sum() - self.log_mass)

    def set_statistics(self, stats: Any) -> None:
        support = getattr(stats, "support", None)
        if support is None:
            raise ValueError("the capsule declares bounds but its statistics have no support summary: "
                             "re-run the statistics pass (ebm-vae-crawl)")
        device = self.mean.device
        self.mean = torch.as_tensor(support.mapped.mean, dtype=torch.float64, device=device)
        self.std = torch.as_tensor(support.std, dtype=torch.float64, device=device)
        kept = 1.0 - support.counts.excluded_fraction
        self.log_mass = torch.tensor(np.log(kept) if kept > 0 else -np.inf, dtype=torch.float64, device=device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.reshape(x.shape[0], -1).double()
        y, log_jacobian, inside = support_map(x, self.lower, self.upper, xp=torch)
        inside = inside.all(dim=1)
        u = torch.where(inside[:, None], (y - self.mean) / self.std, 0.0)
        log_det = log_jacobian.sum(dim=1) - self.log_scale
        return u.float(), torch.where(inside, log_det, -math.inf)

    def inverse(self, u: Tensor, generator: torch.Generator | None = None, *, draw: bool = True) -> Tensor:
        y = u.reshape(u.shape[0], -1).double() * self.std + self.mean
        return support_inverse(y, self.lower, self.upper, xp=torch).float()

    def describe(self) -> dict[str, Any]:
        names = self.state.names
        bounds = {names[i]: [None if math.isnan(lo) else lo, None if math.isnan(hi) else hi]
                  for i, (lo, hi) in enumerate(zip(self.lower.tolist(), self.upper.tolist(), strict=True))
                  if not (math.isnan(lo) and math.isnan(hi))}
        excluded = -math.expm1(float(self.log_mass))
        return {"bounds": bounds, "excluded_fraction": excluded,
                "energy": "-log((1 - excluded_fraction) p_c(x)) strictly inside the bounds, p_c the density "
                          "of the samples strictly inside every bound; +inf at and beyond a bound, where "
                          f"{100 * excluded:.3g}% of the samples sit (a point mass, e.g. a value of exactly "
                          "0, that no density holds)"}


def build_transform(state: StateInfo, capsule: dict[str, Any] | None = None,
                    field_rank: int | None = None) -> StateTransform:
    """The transform of a state: `PrincipalField` of `field_rank` coefficients for a field state
    (the rank the statistics chose: `Stats.field_rank`), `Bounded` for a vector state whose
    capsule declares bounds, z-scoring otherwise."""
    if state.kind == "field" and field_rank is not None:
        return PrincipalField(state, int(field_rank))
    lower, upper = component_bounds(state, (capsule or {}).get("bounds") or {})
    if not (np.isnan(lower).all() and np.isnan(upper).all()):
        return Bounded(state, lower, upper)
    return Standardize(state)
