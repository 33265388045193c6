"""The checkpoint's marginal of the map axes: F(a) = -log p(a), every other direction integrated out.

The quantity the histogram counts, so a learned map and a counted one share one scale; see
`ebm_vae.energy.marginal` for the integration. Here: which coordinates the model's density is
integrated in, and the map around the result.

- Where the transform says how the axes depend on its model coordinates
  (`StateTransform.affine_axes`: z-scoring, the principal-coefficient field density), the
  integral runs over the model coordinates with the core's own bound, and what the transform
  models exactly (the Gaussian residual of a field) is integrated in closed form.
- Otherwise, for vector states, over the z-scored state with the model's full bound.

Each draw's density is the model's importance-weighted bound with `INNER_K` samples: the
exponential of that (not of the ELBO with its analytic KL) is an unbiased estimate of the
density, which the outer average needs.
"""

from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import torch

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.marginal import MarginalError, ModelCoordinates, marginal_energy
from ebm_vae.energy.methods.common import (
    MapRequest,
    learned_map_metadata,
    support_map,
    vae_grid_stats,
)

log = logging.getLogger(__name__)

INNER_K = 2
SAMPLE_CHUNK = 1024  # model samples drawn per call (a field sample is a whole physical state)

DEFINITION = (
    "F(a) = -log p(a) in nats, p the VAE's marginal density of the map axes in their physical "
    "units: the model's density of the full state with every direction off the axes integrated "
    "out (the quantity a histogram of the axes counts). Integrated by importance sampling with a "
    "proposal fitted to the model's own samples, k draws per grid point each weighted by the "
    "model's importance-weighted bound (so E is above the model's true F in expectation, "
    "tightening as k grows); directions the model treats exactly are integrated in closed form; "
    "energy_std = sqrt(spread^2 + stderr^2): the ensemble members' spread of F and the Monte Carlo "
    "standard error of the integral"
)


def marginal_map(request: MapRequest) -> EnergyMap:
    ex, vae = request.export, request.vae
    if ex.reference:
        log.warning("export.reference %s is ignored: a marginal map integrates every component off its "
                    "axes (export.quantity=slice holds them)", dict(ex.reference))
    grid = request.grid(vae.state_info, vae_grid_stats(vae, request.index_stats),
                        bounds=vae.hparams.capsule.get("bounds") or {})
    rows, origin = axis_rows(grid)
    coords = vae_coordinates(vae, rows, origin, seed=int(ex.seed))
    estimate, info = marginal_energy(coords, grid.points(0, grid.n_points), k=int(ex.k), seed=int(ex.seed),
                                     progress=ex.progress, description=f"marginal {request.capsule.name}")
    metadata = learned_map_metadata(request, vae, grid, method="vae-iwae", quantity="marginal",
                                    definition=DEFINITION, estimate=estimate,
                                    extra={"marginal": {**info, "inner_k": INNER_K}})
    metadata["reference_state"] = {}  # nothing is held: every off-axis direction is integrated
    pcs = {"pc_vectors": rows, "pc_origin": origin} if grid.on_pcs else {}
    return EnergyMap(estimate.energy.reshape(grid.shape), [a.values for a in grid.axes], metadata,
                     energy_std=estimate.std.reshape(grid.shape), support=support_map(vae, grid), **pcs)


def axis_rows(grid) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, D), origin (D,)) with map coordinates a = rows @ (x - origin), float64."""
    cols = [a.index for a in grid.axes]
    if grid.on_pcs:
        return np.asarray(grid.stats.pca_components[cols], dtype=np.float64), np.asarray(grid.stats.mean, np.float64)
    rows = np.zeros((len(cols), grid.state.dim))
    rows[np.arange(len(cols)), cols] = 1.0
    return rows, np.zeros(grid.state.dim)


def vae_coordinates(vae, rows: np.ndarray, origin: np.ndarray, seed: int = 0) -> ModelCoordinates:
    """The model's density in the coordinates the marginal integrates over (module docstring)."""
    device = vae.norm_mean.device
    on_device = torch.Generator(device=device).manual_seed(seed) if device.type != "cpu" else None
    transform = vae.transform
    structure = transform.affine_axes(torch.as_tensor(rows, dtype=torch.float64, device=device),
                                      torch.as_tensor(origin, dtype=torch.float64, device=device))

    def generator(g: torch.Generator) -> torch.Generator:
        return g if on_device is None else on_device

    def draw(n: int, g: torch.Generator) -> torch.Tensor:
        return torch.cat([vae.sample(min(SAMPLE_CHUNK, n - i), generator(g)).reshape(min(SAMPLE_CHUNK, n - i), -1)
                          for i in range(0, n, SAMPLE_CHUNK)])

    if structure is not None:
        shape = tuple(transform.out_shape)

        def log_density(y, g):
            u = y.to(device, torch.float32).reshape(len(y), *shape)
            return vae.member_bounds(u, k=INNER_K, generator=generator(g))[0].double().cpu()

        def sample(n, g):
            if "physical" in inspect.signature(vae.sample).parameters:  # the core's own draws of u
                return vae.sample(n, generator(g), physical=False).reshape(n, -1).double().cpu()
            return torch.cat([transform(x)[0].reshape(len(x), -1).double().cpu() for x in draw(n, g).split(SAMPLE_CHUNK)])

        return ModelCoordinates(math.prod(shape), log_density, sample, *(t.cpu() for t in structure),
                                description=f"model coordinates of {type(transform).__name__} ({math.prod(shape)})")
    if vae.state_info.kind == "field":
        raise MarginalError(f"the {type(transform).__name__} transform of this field model does not say how the "
                            f"map axes depend on its coordinates; use export.quantity=slice or method=histogram")
    mean, std = vae.norm_mean.double(), vae.norm_std.double()
    log_std = float(torch.log(std).sum())

    def log_density_x(y, g):
        x = (mean + y.to(device) * std).float()
        return vae.member_log_prob(x, k=INNER_K, generator=generator(g))[0].double().cpu() + log_std

    def sample_x(n, g):
        return ((draw(n, g).double() - mean) / std).cpu()

    rows_t = torch.as_tensor(rows, dtype=torch.float64)
    return ModelCoordinates(len(mean), log_density_x, sample_x, rows_t @ (mean.cpu() - torch.as_tensor(origin)),
                            rows_t * std.cpu(), torch.zeros(len(rows), len(rows), dtype=torch.float64),
                            description=f"z-scored state ({len(mean)})")
