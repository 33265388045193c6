"""Log-likelihood bounds of a Gaussian VAE, in nats per sample (pure torch).

The model: prior p(z) = N(0, I); decoder p(x|z) = N(mean(z), diag exp(logvar(z))) with a
learned variance per state component; encoder q(z|x) = N(mu(x), diag exp(logvar(x))).
Every value returned here is per sample, summed over state components (and latent
dimensions), so it is a log density of the whole state in nats. All arithmetic is float32
whatever precision the networks ran in: bf16 is fine for the layers, not for a bound
that sums thousands of squared residuals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)

Decoder = Callable[[Tensor], tuple[Tensor, Tensor]]  # z (M, L) -> (mean, logvar), each (M, *state)


def soft_floor_logvar(raw: Tensor, min_logvar: float, max_logvar: float) -> Tensor:
    """Smooth lower floor (softplus, so the gradient never vanishes) and a hard upper clamp.

    The floor bounds the likelihood of a near-deterministic component (a variance of 0 would
    give an infinite density); the clamp keeps exp() finite on outliers.
    """
    floored = min_logvar + torch.nn.functional.softplus(raw.float() - min_logvar)
    return floored.clamp(max=max_logvar)


def gaussian_log_density(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, exp(logvar)) per sample: summed over every dimension after the first."""
    x, mean, logvar = x.float(), mean.float(), logvar.float()
    elementwise = -0.5 * (LOG_2PI + logvar + (x - mean).square() * torch.exp(-logvar))
    return elementwise.flatten(1).sum(1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) per sample."""
    z = z.float()
    return (-0.5 * (LOG_2PI + z.square())).flatten(1).sum(1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, per sample."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.square() + torch.exp(logvar) - 1.0 - logvar)).flatten(1).sum(1)


def sample_latent(mu: Tensor, logvar: Tensor, n: int = 1,
                  generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised draws z = mu + sigma * eps, shape (n, N, L)."""
    mu, logvar = mu.float(), logvar.float()
    eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


@dataclass
class ElboTerms:
    """Per-sample terms of the evidence lower bound, shape (N,), nats."""

    recon: Tensor  # single-draw estimate of E_q[log p(x|z)]
    kl: Tensor  # KL(q(z|x) || p(z)), exact

    @property
    def elbo(self) -> Tensor:
        return self.recon - self.kl


def elbo_terms(x: Tensor, encoder_out: tuple[Tensor, Tensor], decoder: Decoder,
               generator: torch.Generator | None = None) -> ElboTerms:
    """ELBO of `x` (N, *state): one reparameterised draw for the reconstruction, exact KL."""
    mu, logvar = encoder_out
    z = sample_latent(mu, logvar, 1, generator)[0]
    dec_mean, dec_logvar = decoder(z)
    return ElboTerms(recon=gaussian_log_density(x, dec_mean, dec_logvar),
                     kl=kl_to_standard_normal(mu, logvar))


def iwae_bound(x: Tensor, encoder_out: tuple[Tensor, Tensor], decoder: Decoder, k: int,
               generator: torch.Generator | None = None, max_rows: int = 65536,
               return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q, per sample.

    Tighter than the ELBO and rising with K towards log p(x). The K draws are decoded a
    few at a time (at most `max_rows` decoder rows per call) and folded into a running
    logsumexp, so memory does not grow with K.

    `return_stderr`: also the standard error of the estimate, in nats, from the K weights w:
    by the delta method, sd(log mean w) ~ sd(w) / (sqrt(K) mean w). It is large where a few
    weights dominate (states far from the data, where the encoder's q misses the posterior),
    which is where the estimate cannot be trusted; nan for K = 1.
    """
    mu, logvar = encoder_out
    n = x.shape[0]
    per_chunk = max(1, min(k, max_rows // max(n, 1)))
    total = torch.full((n,), -math.inf, device=x.device, dtype=torch.float32)
    total_sq = torch.full((n,), -math.inf, device=x.device, dtype=torch.float32)  # log sum w^2
    done = 0
    while done < k:
        m = min(per_chunk, k - done)
        z = sample_latent(mu, logvar, m, generator)  # (m, N, L)
        z_rows = z.reshape(m * n, -1)
        dec_mean, dec_logvar = decoder(z_rows)
        x_rows = x.unsqueeze(0).expand(m, *x.shape).reshape(m * n, *x.shape[1:])
        log_px_z = gaussian_log_density(x_rows, dec_mean, dec_logvar).view(m, n)
        log_pz = standard_normal_log_density(z_rows).view(m, n)
        q_mu = mu.float().unsqueeze(0).expand_as(z).reshape(m * n, -1)
        q_logvar = logvar.float().unsqueeze(0).expand_as(z).reshape(m * n, -1)
        log_qz = gaussian_log_density(z_rows, q_mu, q_logvar).view(m, n)
        log_w = log_px_z + log_pz - log_qz
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        if return_stderr:
            total_sq = torch.logaddexp(total_sq, torch.logsumexp(2.0 * log_w, dim=0))
        done += m
    bound = total - math.log(k)
    if not return_stderr:
        return bound
    if k < 2:
        return bound, torch.full_like(bound, math.nan)
    # relative variance of the weights: mean(w^2) / mean(w)^2 - 1, from the log sums
    relative_var = torch.expm1((total_sq - math.log(k)) - 2.0 * bound).clamp(min=0.0) * k / (k - 1)
    return bound, torch.sqrt(relative_var / k)
