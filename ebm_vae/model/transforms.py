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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ebm_vae.data.extractors.base import StateInfo


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

    @abstractmethod
    def inverse(self, u: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Physical states (N, D) of model coordinates u: draws x ~ p(x | u), so that samples of
        the core density become samples of p(x) (a deterministic inverse where x is a function
        of u; a draw of the closed-form part, e.g. a residual, where it is not)."""


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

    def inverse(self, u: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return u.reshape(u.shape[0], -1) * self.std + self.mean


def build_transform(state: StateInfo, capsule: dict[str, Any] | None = None) -> StateTransform:
    """The transform of a state: z-scoring per component (more kinds plug in here)."""
    return Standardize(state)
