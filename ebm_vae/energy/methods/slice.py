"""The joint energy of the full state on a slice: the checkpoint's bound at every grid point.

Components off the map axes are held at the reference state (the mean, or
`export.reference`); on pc axes the state is mean + sum_i c_i * pc_i. For a state with as
many components as map axes the slice is the whole state, so it is also the marginal.
"""

from __future__ import annotations

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.methods.common import (
    MapRequest,
    map_metadata,
    normalization,
    pc_arrays,
    vae_grid_stats,
)

DEFINITION = (
    "E(x) = -log p(x) in nats, p the VAE's density of the full state in its physical units "
    "(z-score Jacobian sum(log std) included), estimated by the negative ELBO (k = 1) or the "
    "negative importance-weighted bound with k samples (above the true E, tightening as k grows); "
    "components off the map axes are held at reference_state (the joint energy on that slice; "
    "on pc axes the state is mean + sum_i c_i * pc_i)"
)


def slice_map(request: MapRequest) -> EnergyMap:
    from ebm_vae.energy.evaluate import evaluate_energy

    ex, vae = request.export, request.vae
    grid = request.grid(vae.state_info, vae_grid_stats(vae, request.index_stats),
                        bounds=vae.hparams.capsule.get("bounds") or {})
    energy = evaluate_energy(vae, grid.states, grid.n_points, k=ex.k, seed=ex.seed, device=ex.device,
                             chunk_points=ex.chunk_points, progress=ex.progress,
                             description=f"export {request.capsule.name}")
    meta = vae.hparams.stats_meta
    metadata = map_metadata(
        request.capsule, grid, method="vae-elbo" if ex.k == 1 else "vae-iwae", k=int(ex.k),
        quantity="slice" if grid.state.dim > len(grid.axes) else "marginal", definition=DEFINITION, source_files=meta.get("files", []),
        checkpoint=request.checkpoint_metadata(),
        normalization=normalization(vae.state_info, grid.stats, float(vae.log_jacobian)),
        extra={"seed": int(ex.seed), "training_samples": meta.get("count"),
               "statistics_created": meta.get("created")},
    )
    return EnergyMap(energy.reshape(grid.shape), [a.values for a in grid.axes], metadata, **pc_arrays(grid))
