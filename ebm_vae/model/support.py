"""A bounded, uniform sample of the training states, kept in the checkpoint (the *support*).

A map needs to say where its energies rest on data and where they are extrapolations, and the
marginal map is computed from the checkpoint alone (no re-read of the data). So the VAE keeps a
reservoir of `capacity` training states (Vitter's algorithm R: after n draws every draw is in it
with probability capacity / n), in the coordinates a map can bin:

- vector states: the physical flat state (D values);
- field states: the coefficients on the crawl's principal basis, (x - mean) @ pca_components.T
  (k values; 12,288-pixel maps would make the reservoir too large).

With `seen` draws behind it, a bin holding c of the n reservoir states has about
c * seen / n training states (`VAE.support_samples` caps `seen` at the data's sample count, as
epochs repeat states). Updates are vectorised per batch and reproducible for a given
generator seed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reservoir_update(states: Tensor, seen: int, batch: Tensor, capacity: int,
                     generator: torch.Generator) -> Tensor:
    """The reservoir `states` (n <= capacity, C) after the draws `batch` (B, C); `seen` draws came before.

    Fills up to `capacity` first; then draw number i (0-based) replaces a uniform slot with
    probability capacity / (i + 1), later draws of a batch winning a slot over earlier ones,
    exactly as one at a time. The random numbers come from `generator` (on the CPU).
    """
    batch = batch.detach().to(states.device, states.dtype)
    take = max(0, min(len(batch), capacity - len(states)))
    if take:
        states = torch.cat([states, batch[:take]])
    rest = batch[take:]
    if not len(rest):
        return states
    index = torch.arange(len(rest), dtype=torch.float64) + float(seen + take)  # 0-based draw numbers
    slot = torch.floor(torch.rand(len(rest), generator=generator, dtype=torch.float64) * (index + 1.0))
    accepted = torch.nonzero(slot < capacity).flatten()
    if not len(accepted):
        return states
    slots = slot[accepted].long()
    # the last draw of the batch to land on a slot is the one that stays
    order = torch.argsort(slots, stable=True)
    slots, accepted = slots[order], accepted[order]
    _, counts = torch.unique_consecutive(slots, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    states = states.clone()
    states[slots[last].to(states.device)] = rest[accepted[last].to(rest.device)]
    return states
