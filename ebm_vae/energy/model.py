"""`EnergyModel`: query a trained checkpoint for the energy of full states in physical units.

    model = EnergyModel.from_checkpoint("checkpoints/grid/last.ckpt")   # device None = auto
    model.energy(states, k=64)   # (N, D) flat, in state_names order, or (N, *state_shape)

The energy is -log p(x) in nats for the density in physical units (z-score Jacobian
included), on the same scale as the exported maps; k = 1 gives the negative ELBO, k > 1 the
importance-weighted bound, which approaches -log p(x) from above as k grows. Where a state's
estimate is unsure (standard error above 0.1 nats), k is raised for that state (up to
`max_k`); `model.estimate(states)` returns the whole account (`EnergyEstimate`: energy, std,
standard error, ensemble spread, k used per state).

Checkpoints are loaded with `torch.load(weights_only=True)`: a checkpoint is a file from
somewhere, and unpickling arbitrary objects would run code. Ours hold plain containers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebm_vae.data.readers.base import one_line
from ebm_vae.energy.evaluate import (
    MAX_K,
    TARGET_STDERR,
    EnergyEstimate,
    estimate_energy,
    resolve_device,
)
from ebm_vae.energy.states import validated_states


class CheckpointError(ValueError):
    """A file that is not a usable VAE checkpoint; the message names the file."""


def load_vae(path: str | Path, device: str | torch.device | None = None):
    """The `VAE` of a checkpoint, in eval mode on `device` ("cpu", "cuda", None/"auto")."""
    from ebm_vae.model.vae import VAE

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint; train one with `ebm-vae-train capsule=NAME` "
                                f"or pass ckpt=PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, pickles of arbitrary objects, not torch at all
        raise CheckpointError(f"{path}: not loadable as a checkpoint with weights_only=True: "
                              f"{one_line(exc)}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not an ebm-vae VAE checkpoint (no VAE hyper-parameters "
                              f"with a 'state', or no state_dict)")
    try:
        vae = VAE(**hparams)
        vae.load_state_dict(checkpoint["state_dict"])
        vae.on_load_checkpoint(checkpoint)
    except Exception as exc:  # other hyper-parameters or weights than this VAE's
        raise CheckpointError(f"{path}: incompatible VAE checkpoint: {one_line(exc)}") from None
    return vae.to(resolve_device(device)).eval()


class EnergyModel:
    """A trained VAE answering E(x) = -log p(x) for full physical states; see the module docstring."""

    def __init__(self, vae, checkpoint: str | Path | None = None):
        self.vae = vae
        self.checkpoint = None if checkpoint is None else Path(checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> EnergyModel:
        return cls(load_vae(path, device), path)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def capsule(self) -> str:
        return self.vae.hparams.capsule.get("name", "")

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.vae.state_info.names

    @property
    def state_units(self) -> tuple[str, ...]:
        return self.vae.state_info.units

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.vae.state_info.shape)

    def energy(self, states: Any, k: int = 64, seed: int = 0, chunk_points: int | None = None,
               progress: bool = False, return_std: bool = False,
               max_k: int | None = MAX_K) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(N,) float64 nats for `states` (N, D) or (N, *state_shape) in physical units.

        Evaluated in chunks sized to the device's memory; reproducible for a given `seed`.
        `return_std`: also (N,) the uncertainty of each energy in nats (the ensemble's spread
        and the Monte Carlo standard error combined; see `ebm_vae.energy.evaluate`).
        """
        estimate = self.estimate(states, k=k, seed=seed, chunk_points=chunk_points, progress=progress,
                                 max_k=max_k)
        return (estimate.energy, estimate.std) if return_std else estimate.energy

    def estimate(self, states: Any, k: int = 64, seed: int = 0, chunk_points: int | None = None,
                 progress: bool = False, max_k: int | None = MAX_K,
                 target_stderr: float = TARGET_STDERR) -> EnergyEstimate:
        """The energies of `states` with their uncertainty, standard error, spread and k used.

        Bad states (wrong shape or dtype, NaN/Inf) behave as `ebm_vae.energy.states` says.
        """
        batch = validated_states(states, self.state_shape, f"capsule '{self.capsule}'",
                                 fill=self.vae.norm_mean.cpu().numpy(), names=self.state_names)
        estimate = estimate_energy(self.vae, batch.chunk, len(batch), k=k, seed=seed, device=self.device,
                                   chunk_points=chunk_points, progress=progress, max_k=max_k,
                                   target_stderr=target_stderr)
        batch.finish(estimate.energy, estimate.std, estimate.stderr, estimate.spread)
        return estimate
