"""Log-likelihood bounds of a Gaussian VAE, in nats per sample (pure torch).

The model: a prior p(z) (`ebm_vae.model.priors`: N(0, I) or a flow); decoder
p(x|z) = N(mean(z), diag exp(logvar(z))) with a learned variance per component; encoder
q(z|x) = N(mu(x), diag exp(logvar(x))). Every value returned here is per sample, summed over
state components (and latent dimensions), so it is a log density of the whole state in nats.

Shapes carry the ensemble as a leading member axis: states x are (N, D) (flat model
coordinates, shared by the members), encoder outputs (M, N, L), decoder outputs (M, R, D),
and every bound comes back as (M, N), one row per member.
All arithmetic is float32 whatever precision the networks ran in: bf16 is fine for the
layers, not for a bound that sums thousands of squared residuals.

Ensembles: the density of M members is their mixture, p(x) = (1/M) sum_m p_m(x). Since each
member's importance-weighted estimate is (in expectation of its log) below log p_m(x), the
log of the mean of the members' estimates is a bound of the same kind on log p(x)
(`mixture_bound`); its standard error follows from the members' by the delta method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)

Decoder = Callable[[Tensor], tuple[Tensor, Tensor]]  # z (M, R, L) -> (mean, logvar), each (M, R, D)


def soft_floor_logvar(raw: Tensor, min_logvar: float, max_logvar: float) -> Tensor:
    """Smooth lower floor (softplus, so the gradient never vanishes) and a hard upper clamp.

    The floor bounds the likelihood of a near-deterministic component (a variance of 0 would
    give an infinite density); the clamp keeps exp() finite on outliers.
    """
    floored = min_logvar + torch.nn.functional.softplus(raw.float() - min_logvar)
    return floored.clamp(max=max_logvar)


def gaussian_log_density(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, exp(logvar)) per sample: summed over the last dimension (broadcasting)."""
    x, mean, logvar = x.float(), mean.float(), logvar.float()
    return (-0.5 * (LOG_2PI + logvar + (x - mean).square() * torch.exp(-logvar))).sum(-1)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I) per sample (summed over the last dimension)."""
    return (-0.5 * (LOG_2PI + z.float().square())).sum(-1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, per sample (last dimension summed)."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.square() + torch.exp(logvar) - 1.0 - logvar)).sum(-1)


def sample_latent(mu: Tensor, logvar: Tensor, n: int = 1,
                  generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised draws z = mu + sigma * eps of q (M, N, L): shape (M, n, N, L)."""
    mu, logvar = mu.float(), logvar.float()
    eps = torch.randn((mu.shape[0], n, *mu.shape[1:]), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps


def _prior_log_prob(prior, z: Tensor) -> Tensor:
    """log p(z) per row: the prior's (`ebm_vae.model.priors.Prior`), or N(0, I) for None."""
    return standard_normal_log_density(z) if prior is None else prior.log_prob(z).float()


@dataclass
class ElboTerms:
    """Per-sample terms of the evidence lower bound, shape (M, N), nats."""

    recon: Tensor  # single-draw estimate of E_q[log p(x|z)]
    kl: Tensor  # KL(q(z|x) || p(z)): exact for N(0, I), else the single-draw log q(z|x) - log p(z)

    @property
    def elbo(self) -> Tensor:
        return self.recon - self.kl


def elbo_terms(x: Tensor, encoder_out: tuple[Tensor, Tensor], decoder: Decoder,
               generator: torch.Generator | None = None, prior=None) -> ElboTerms:
    """ELBO of `x` (N, D) under each member: one reparameterised draw; the KL in closed form
    where the prior is N(0, I) (`prior` None or standard), else estimated at the same draw."""
    mu, logvar = encoder_out
    z = sample_latent(mu, logvar, 1, generator)[:, 0]  # (M, N, L)
    dec_mean, dec_logvar = decoder(z)
    recon = gaussian_log_density(x, dec_mean, dec_logvar)
    if prior is None or prior.is_standard_normal:
        return ElboTerms(recon=recon, kl=kl_to_standard_normal(mu, logvar))
    log_q = gaussian_log_density(z, mu, logvar)
    return ElboTerms(recon=recon, kl=log_q - _prior_log_prob(prior, z))


def iwae_bound(x: Tensor, encoder_out: tuple[Tensor, Tensor], decoder: Decoder, k: int,
               generator: torch.Generator | None = None, max_rows: int = 65536,
               return_stderr: bool = False, prior=None) -> Tensor | tuple[Tensor, Tensor]:
    """Importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q, per member and
    sample: x (N, D), encoder output (M, N, L) -> (M, N).

    Tighter than the ELBO and rising with K towards log p(x). The K draws are decoded a
    few at a time (at most `max_rows` decoder rows per call, over all members) and folded into
    a running logsumexp, so memory does not grow with K. Differentiable (IWAE training).

    `return_stderr`: also the standard error of the estimate, in nats, from the K weights w:
    by the delta method, sd(log mean w) ~ sd(w) / (sqrt(K) mean w). It is large where a few
    weights dominate (states far from the data, where the encoder's q misses the posterior),
    which is where the estimate cannot be trusted; nan for K = 1.
    """
    mu, logvar = encoder_out
    members, n = mu.shape[0], x.shape[0]
    per_chunk = max(1, min(k, max_rows // max(members * n, 1)))
    total = torch.full((members, n), -math.inf, device=x.device, dtype=torch.float32)
    total_sq = torch.full((members, n), -math.inf, device=x.device, dtype=torch.float32)  # log sum w^2
    done = 0
    while done < k:
        m = min(per_chunk, k - done)
        z = sample_latent(mu, logvar, m, generator)  # (M, m, N, L)
        z_rows = z.reshape(members, m * n, -1)
        dec_mean, dec_logvar = decoder(z_rows)  # (M, m N, D)
        log_px_z = gaussian_log_density(x.repeat(m, 1), dec_mean, dec_logvar).view(members, m, n)
        log_pz = _prior_log_prob(prior, z_rows).view(members, m, n)
        log_qz = gaussian_log_density(z, mu.float().unsqueeze(1), logvar.float().unsqueeze(1))
        log_w = log_px_z + log_pz - log_qz
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=1))
        if return_stderr:
            total_sq = torch.logaddexp(total_sq, torch.logsumexp(2.0 * log_w.detach(), dim=1))
        done += m
    bound = total - math.log(k)
    if not return_stderr:
        return bound
    if k < 2:
        return bound, torch.full_like(bound, math.nan)
    # relative variance of the weights: mean(w^2) / mean(w)^2 - 1, from the log sums
    relative_var = torch.expm1((total_sq - math.log(k)) - 2.0 * bound.detach()).clamp(min=0.0) * k / (k - 1)
    return bound, torch.sqrt(relative_var / k)


def mixture_bound(bounds: Tensor, stderr: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The bound of an equal-weight mixture of M members, from each member's (M, N) -> (N,).

    log p(x) >= log (1/M) sum_m exp(b_m): each exp(b_m) is an unbiased estimate of a lower
    bound on p_m(x) (IWAE) or is one (ELBO), and log is monotone and concave. Standard error
    (delta method, independent members): sqrt(sum_m se_m^2 exp(2 b_m)) / sum_m exp(b_m), where
    se_m is member m's standard error of b_m (nan where a member has none, as for the ELBO).
    """
    count = bounds.shape[0]
    total = torch.logsumexp(bounds, dim=0)
    if stderr is None:
        return total - math.log(count), torch.full_like(total, math.nan)
    # log sqrt(sum se^2 e^(2b)) - log sum e^b, with se = 0 rows contributing nothing
    log_var = torch.logsumexp(2.0 * (bounds + torch.log(stderr)), dim=0)
    return total - math.log(count), torch.exp(0.5 * log_var - total)
