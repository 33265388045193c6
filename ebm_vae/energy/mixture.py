"""Gaussian mixtures with full covariances: fitted by EM, conditioned on linear observations.

The marginal maps (`ebm_vae.energy.methods.marginal`) integrate a model's density over the
directions off the map axes by importance sampling. Their proposal is a mixture fitted to
the model's own samples, because the conditional of a Gaussian mixture given a linear
function of its variable is again a Gaussian mixture, in closed form: for each grid point it
proposes the off-axis directions where the model puts its mass given the axes.

Everything here is float64 torch on the CPU (small dimensions; BLAS batched over components).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
REGULARISATION = 1e-6  # added to every covariance's diagonal, relative to the data's mean variance
EM_ITERATIONS = 100
EM_TOLERANCE = 1e-4  # nats per sample between iterations


@dataclass
class GaussianMixture:
    weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    covariances: Tensor  # (K, d, d)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, y: Tensor) -> Tensor:
        """(N, d) -> (N,) log density."""
        return torch.logsumexp(self._component_log_prob(y) + torch.log(self.weights), dim=1)

    def _component_log_prob(self, y: Tensor) -> Tensor:
        """(N, K) log N(y; mu_k, S_k)."""
        return _gaussian_log_prob(y[:, None, :] - self.means[None], *_whitener(self.covariances))

    @classmethod
    def fit(cls, y: Tensor, components: int, generator: torch.Generator) -> GaussianMixture:
        """EM from a k-means++ start; covariances floored by REGULARISATION for stability."""
        y = y.double()
        n, d = y.shape
        components = max(1, min(components, n // (2 * (d + 1))))
        floor = REGULARISATION * float(y.var(dim=0).mean()) * torch.eye(d, dtype=torch.float64)
        means = _kmeans_plus_plus(y, components, generator)
        resp = torch.nn.functional.one_hot(torch.cdist(y, means).argmin(dim=1), components).double()
        previous = -math.inf
        for _ in range(EM_ITERATIONS):
            mixture = cls._maximise(y, resp, floor)
            joint = mixture._component_log_prob(y) + torch.log(mixture.weights)
            total = torch.logsumexp(joint, dim=1)
            resp = torch.exp(joint - total[:, None])
            current = float(total.mean())
            if current - previous < EM_TOLERANCE:
                break
            previous = current
        return cls._maximise(y, resp, floor)

    @classmethod
    def _maximise(cls, y: Tensor, resp: Tensor, floor: Tensor) -> GaussianMixture:
        mass = resp.sum(dim=0) + 1e-12
        means = (resp.T @ y) / mass[:, None]
        centred = y[None] - means[:, None]  # (K, N, d)
        covariances = torch.bmm((centred * resp.T[..., None]).transpose(1, 2), centred) / mass[:, None, None] + floor
        keep = mass > 1.0  # drop components that lost their samples
        weights = mass[keep] / mass[keep].sum()
        return cls(weights, means[keep], covariances[keep])

    def broadened(self, factor: float) -> GaussianMixture:
        """One Gaussian with the mixture's mean and `factor`^2 times its covariance."""
        mean = self.weights @ self.means
        centred = self.means - mean
        covariance = torch.einsum("k,kij->ij", self.weights, self.covariances) + \
            torch.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None], factor**2 * covariance[None])

    def condition(self, observe: Tensor, noise: Tensor, free: Tensor) -> ConditionalMixture:
        """The mixture of `free @ y` given the observation `o = observe @ y + e`, e ~ N(0, noise).

        observe (n, d), noise (n, n) (zero for an exact observation), free (f, d). With y's
        components N(mu_k, S_k): o ~ N(H mu_k, H S_k H^T + R) and, given o, F y is Gaussian with
        mean F mu_k + F S_k H^T G_k^-1 (o - H mu_k) and covariance F S_k F^T - F S_k H^T G_k^-1 H S_k F^T.
        """
        h, f, s = observe.double(), free.double(), self.covariances
        g = h @ s @ h.T + noise.double()  # (K, n, n)
        cross = f @ s @ h.T  # (K, f, n)
        gain = torch.linalg.solve(g, cross.transpose(1, 2)).transpose(1, 2)  # cross G^-1
        covariance = f @ s @ f.T - gain @ cross.transpose(1, 2)
        covariance = 0.5 * (covariance + covariance.transpose(1, 2))
        chol = torch.linalg.cholesky(covariance)
        return ConditionalMixture(torch.log(self.weights), self.means @ h.T, *_whitener(g), self.means @ f.T,
                                  gain, chol, *_whitener(covariance))


@dataclass
class ConditionalMixture:
    """A mixture conditioned on linear observations: `at(o)` gives the mixture at observations o."""

    log_weights: Tensor  # (K,)
    observed_means: Tensor  # (K, n)
    observed_whitener: Tensor  # (K, n, n) inverse Cholesky factor of the observation's covariance
    observed_log_det: Tensor  # (K,) its log |det| (of the factor)
    free_means: Tensor  # (K, f)
    gain: Tensor  # (K, f, n)
    chol: Tensor  # (K, f, f) Cholesky factor of the conditional covariance
    whitener: Tensor  # (K, f, f) its inverse
    log_det: Tensor  # (K,)

    def at(self, o: Tensor) -> tuple[Tensor, Tensor]:
        """(log weights (G, K), means (G, K, f)) of the conditional mixture at observations o (G, n)."""
        diff = o[:, None, :] - self.observed_means[None]  # (G, K, n)
        log_w = self.log_weights + _gaussian_log_prob(diff, self.observed_whitener, self.observed_log_det)
        log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
        means = self.free_means[None] + torch.einsum("kfn,gkn->gkf", self.gain, diff)
        return log_w, means

    def log_prob(self, w: Tensor, log_w: Tensor, means: Tensor) -> Tensor:
        """log q(w) of draws w (G, S, f) under the conditional mixtures (log_w, means) of `at`."""
        diff = w[:, :, None, :] - means[:, None]  # (G, S, K, f)
        return torch.logsumexp(log_w[:, None] + _gaussian_log_prob(diff, self.whitener, self.log_det), dim=2)

    def sample(self, log_w: Tensor, means: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """n draws per observation: (G, n, f)."""
        g, k, f = means.shape
        pick = torch.multinomial(torch.exp(log_w), n, replacement=True, generator=generator)  # (G, n)
        draws = torch.gather(means, 1, pick[..., None].expand(g, n, f))
        eps = torch.randn((g, n, f), generator=generator, dtype=torch.float64)
        for component in range(k):  # one matrix product per component, not a (G, n, f, f) gather
            chosen = pick == component
            draws[chosen] += eps[chosen] @ self.chol[component].T
        return draws


def _whitener(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """(L^-1, log |det L|) per component of covariances (K, d, d) = L L^T."""
    chol = torch.linalg.cholesky(covariance)
    eye = torch.eye(covariance.shape[-1], dtype=torch.float64).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False), torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def _gaussian_log_prob(diff: Tensor, whitener: Tensor, log_det: Tensor) -> Tensor:
    """log N(diff; 0, S_k) over the last axis of diff (..., K, d), per component k."""
    *lead, k, d = diff.shape
    per_component = diff.reshape(-1, k, d).transpose(0, 1)  # (K, M, d): one matrix product per component
    squared = torch.bmm(per_component, whitener.transpose(1, 2)).square().sum(-1)  # (K, M)
    return (-0.5 * (squared.T.reshape(*lead, k) + d * LOG_2PI)) - log_det


def _kmeans_plus_plus(y: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: spread starting means, each drawn in proportion to its squared distance."""
    first = torch.randint(len(y), (1,), generator=generator)
    centres = [y[first]]
    distance = (y - centres[0]).square().sum(dim=1)
    for _ in range(1, k):
        pick = torch.multinomial(distance / distance.sum(), 1, generator=generator)
        centres.append(y[pick])
        distance = torch.minimum(distance, (y - centres[-1]).square().sum(dim=1))
    return torch.cat(centres)
