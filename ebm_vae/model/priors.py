"""Priors p(z) over the latents of an ensemble of M VAEs, one interface:
`log_prob(z (M, R, L)) -> (M, R)` and `sample(n, generator) -> (M, n, L)`.

- `standard`: N(0, I), the classic VAE prior; its KL to a Gaussian q has a closed form.
- `flow`: a neural spline flow per member (masked autoregressive, as `zuko.flows.NSF`:
  monotonic rational-quadratic splines on [-5, 5] whose bins come from a MADE conditioner,
  the order of the features reversed from one layer to the next), over a N(0, I) base. A
  learned prior puts the latent mass where the encoder puts the data, so the KL term stops
  paying for an aggregate posterior that is not Gaussian. With a latent of the core's own size
  and residual networks (`ebm_vae.model.networks`), the flow carries the density's shape and
  the bound becomes nearly as sharp as a pure flow's, while staying a proper bound.

The splines are zuko's (`zuko.transforms.MonotonicRQSTransform`, which takes parameters of any
batch shape); the conditioners are `EnsembleLinear` layers, so the M members' flows run as one
batched computation: the spline's many small operations, which dominate a flow's time at these
sizes, are paid once rather than M times. Both priors compute in float32 with autocast off: a
spline's bin search and log-derivatives in bf16 would cost tenths of nats.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ebm_vae.model.networks import ensemble_mlp

LOG_2PI = math.log(2.0 * math.pi)
PRIORS = ("standard", "flow")
SPLINE_BOUND = 5.0  # the splines act on [-B, B]; outside it each layer is the identity
SPLINE_MIN_SLOPE = 1e-3


class Prior(nn.Module, ABC):
    """M densities over latents z: exact log_prob and reproducible draws."""

    def __init__(self, members: int, dim: int):
        super().__init__()
        self.members, self.dim = members, dim
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows the module's device

    @property
    def is_standard_normal(self) -> bool:
        """True where KL(q || p) has the Gaussian closed form (lower-variance ELBO)."""
        return False

    @abstractmethod
    def log_prob(self, z: Tensor) -> Tensor:
        """log p_m(z) per row, (M, R, L) -> (M, R) float32."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(M, n, L) float32: n draws of every member, reproducible given `generator`."""
        eps = torch.randn((self.members, n, self.dim), generator=generator, device=self.anchor.device)
        return self.from_base(eps)

    def from_base(self, eps: Tensor) -> Tensor:
        """The latents of base draws eps ~ N(0, I)."""
        return eps


class StandardNormal(Prior):
    @property
    def is_standard_normal(self) -> bool:
        return True

    def log_prob(self, z: Tensor) -> Tensor:
        return (-0.5 * (LOG_2PI + z.float().square())).sum(-1)


def made_masks(dim: int, hidden: int, n_hidden: int, outputs_per_feature: int,
               descending: bool) -> list[Tensor]:
    """Masks of a MADE conditioner: the outputs of feature i see only the features before it
    in the layer's order (ascending or descending), so the Jacobian is triangular."""
    rank = torch.arange(dim)
    if descending:
        rank = rank.flip(0)
    degree = torch.arange(hidden) % max(1, dim - 1)  # hidden units see features of rank <= degree
    masks = [(rank[None, :] <= degree[:, None]).float()]
    masks += [(degree[:, None] >= degree[None, :]).float() for _ in range(n_hidden - 1)]
    out_rank = rank.repeat_interleave(outputs_per_feature)
    masks.append((degree[None, :] < out_rank[:, None]).float())
    return masks


class FlowPrior(Prior):
    """`transforms` autoregressive spline layers of `bins` bins per member, each conditioned by a
    masked MLP of two `hidden`-unit layers."""

    def __init__(self, members: int, dim: int, transforms: int = 4, bins: int = 12, hidden: int = 128):
        super().__init__(members, dim)
        self.bins = bins
        per_feature = 3 * bins - 1  # widths, heights, inner knot derivatives
        self.conditioners = nn.ModuleList(
            ensemble_mlp(members, [dim, hidden, hidden, dim * per_feature],
                         made_masks(dim, hidden, 2, per_feature, descending=bool(t % 2)))
            for t in range(transforms))

    def _spline(self, conditioner: nn.Module, y: Tensor):
        from zuko.transforms import MonotonicRQSTransform

        phi = conditioner(y).unflatten(-1, (self.dim, 3 * self.bins - 1))
        widths, heights, derivatives = phi.split([self.bins, self.bins, self.bins - 1], dim=-1)
        return MonotonicRQSTransform(widths, heights, derivatives, bound=SPLINE_BOUND, slope=SPLINE_MIN_SLOPE)

    def log_prob(self, z: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            y = z.float()
            log_det = y.new_zeros(y.shape[:-1])
            for conditioner in self.conditioners:
                y, ladj = self._spline(conditioner, y).call_and_ladj(y)
                log_det = log_det + ladj.sum(-1)
            return (-0.5 * (LOG_2PI + y.square())).sum(-1) + log_det

    def from_base(self, eps: Tensor) -> Tensor:
        """Invert the layers, last first; each needs `dim` passes of its conditioner (feature i
        is exact after pass i), which is cheap at latent sizes."""
        with torch.autocast(eps.device.type, enabled=False):
            y = eps.float()
            for conditioner in reversed(self.conditioners):
                x = torch.zeros_like(y)
                for _ in range(self.dim):
                    x = self._spline(conditioner, x).inv(y)
                y = x
            return y


def build_prior(kind: str, members: int, dim: int, transforms: int = 4, bins: int = 12,
                hidden: int = 128) -> Prior:
    """The prior named `kind` ("standard" or "flow") of M members over a `dim`-dimensional latent."""
    if kind == "standard":
        return StandardNormal(members, dim)
    if kind == "flow":
        return FlowPrior(members, dim, transforms=transforms, bins=bins, hidden=hidden)
    raise ValueError(f"unknown model.prior '{kind}'; known: {', '.join(PRIORS)}")
