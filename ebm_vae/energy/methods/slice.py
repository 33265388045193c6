"""The joint energy of the full state on a slice: the checkpoint's bound at every grid point.

Components off the map axes are held at the reference state (the mean, or
`export.reference`); on pc axes the state is mean + sum_i c_i * pc_i. For a state with as
many components as map axes the slice is the whole state, so it is also the marginal.
"""

from __future__ import annotations

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.methods.common import (
    MapRequest,
    learned_map_metadata,
    pc_arrays,
    support_map,
    vae_grid_stats,
)

DEFINITION = (
    "E(x) = -log p(x) in nats, p the VAE's density of the full state in its physical units "
    "(z-score Jacobian sum(log std) included), estimated by the negative ELBO (k = 1) or the "
    "negative importance-weighted bound with k samples (above the true E, tightening as k grows); "
    "components off the map axes are held at reference_state (the joint energy on that slice; "
    "on pc axes the state is mean + sum_i c_i * pc_i); k is raised where the estimate's standard "
    "error is large (metadata uncertainty); energy_std = sqrt(spread^2 + stderr^2): the ensemble "
    "members' spread and the Monte Carlo standard error"
)


def slice_map(request: MapRequest) -> EnergyMap:
    from ebm_vae.energy.evaluate import estimate_energy

    ex, vae = request.export, request.vae
    grid = request.grid(vae.state_info, vae_grid_stats(vae, request.index_stats),
                        bounds=vae.hparams.capsule.get("bounds") or {})
    estimate = estimate_energy(vae, grid.states, grid.n_points, k=ex.k, seed=ex.seed, device=ex.device,
                               chunk_points=ex.chunk_points, progress=ex.progress,
                               description=f"export {request.capsule.name}")
    metadata = learned_map_metadata(
        request, vae, grid, method="vae-elbo" if ex.k == 1 else "vae-iwae",
        quantity="slice" if grid.state.dim > len(grid.axes) else "marginal", definition=DEFINITION,
        estimate=estimate, extra={})
    return EnergyMap(estimate.energy.reshape(grid.shape), [a.values for a in grid.axes], metadata,
                     energy_std=estimate.std.reshape(grid.shape), support=support_map(vae, grid), **pc_arrays(grid))
