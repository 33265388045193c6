"""M latent-variable densities of the core's coordinates u, trained and evaluated together.

Each member is a complete VAE: p_m(u) = int p_m(z) p_m(u|z) dz with its own inference network
q_m(z|u), independently initialised. The networks (`ebm_vae.model.networks`) and priors
(`ebm_vae.model.priors`) hold all members and run them as one batched computation, so that
an ensemble of small members costs little more than one of them. Everything here works in
model coordinates u (what `StateTransform` produces), flattened to (N, D); the exact terms of
the transform are added by the VAE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ebm_vae.model.elbo import ElboTerms, elbo_terms, iwae_bound, soft_floor_logvar
from ebm_vae.model.networks import build_networks
from ebm_vae.model.priors import build_prior

INPUT_CLIP = 1e3  # model units; only the encoder's input is clipped (any q gives a valid bound)
Q_LOGVAR_RANGE = (-20.0, 10.0)  # encoder log-variance clamp: exp() stays finite


class Ensemble(nn.Module):
    """Gaussian encoders and decoders and a prior, M members of each; see the module docstring."""

    def __init__(self, members: int, arch: str, core_shape: tuple[int, ...], latent_dim: int, hidden: int,
                 n_layers: int, channels: int, residual: bool, prior: str, prior_transforms: int,
                 prior_bins: int, min_logvar: float, max_logvar: float):
        super().__init__()
        self.size = members
        self.core_shape = tuple(core_shape)
        self.latent_dim = latent_dim
        self.min_logvar, self.max_logvar = min_logvar, max_logvar
        self.encoder, self.decoder = build_networks(arch, members, self.core_shape, latent_dim, hidden,
                                                    n_layers, channels, residual)
        self.prior = build_prior(prior, members, latent_dim, prior_transforms, prior_bins, hidden)

    def encode(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """q_m(z|u) of every member: (mu, logvar), each (M, N, L)."""
        mu, logvar = self.encoder(u.reshape(u.shape[0], *self.core_shape).clamp(-INPUT_CLIP, INPUT_CLIP))
        return mu.float(), logvar.float().clamp(*Q_LOGVAR_RANGE)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """p_m(u|z) of every member for z (M, R, L): (mean, logvar), each (M, R, D) flat."""
        mean, raw_logvar = self.decoder(z)
        return mean.float(), soft_floor_logvar(raw_logvar, self.min_logvar, self.max_logvar)

    def elbo_terms(self, u: Tensor, generator: torch.Generator | None = None) -> ElboTerms:
        """Per member and state (M, N): reconstruction and KL terms of the ELBO."""
        return elbo_terms(u.reshape(u.shape[0], -1), self.encode(u), self.decode, generator, self.prior)

    def bound(self, u: Tensor, k: int, generator: torch.Generator | None = None, max_rows: int = 65536,
              return_stderr: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Each member's bound on log p_m(u), (M, N): the ELBO for k = 1, the importance-weighted
        bound for k > 1, with its standard error when asked (nan for the ELBO). Differentiable."""
        if k == 1:
            elbo = self.elbo_terms(u, generator).elbo
            return (elbo, torch.full_like(elbo, math.nan)) if return_stderr else elbo
        return iwae_bound(u.reshape(u.shape[0], -1), self.encode(u), self.decode, k, generator, max_rows,
                          return_stderr, self.prior)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws u ~ p_m(u) of every member, (M, n, D) float32."""
        mean, logvar = self.decode(self.prior.sample(n, generator))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise
