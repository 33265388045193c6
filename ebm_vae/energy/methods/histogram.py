"""The exact marginal of the map axes, counted over every usable file of the capsule in the index.

No checkpoint is needed; see `ebm_vae.energy.histogram` for the counting and the density's
definition (count / (N_total * bin volume) in the bin centred on each grid point).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ebm_vae.energy.grid import GridStats
from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.methods.common import (
    MapRequest,
    map_axes,
    map_metadata,
    normalization,
    pc_arrays,
    wants_slice,
)
from ebm_vae.errors import ConfigError

log = logging.getLogger(__name__)

DEFINITION = (
    "E(x) = -log p(x) in nats, p the marginal density of the map axes in their physical units: "
    "count / (N_total * bin volume) in the bin centred on each grid point (edges halfway "
    "between grid points); empty bins are +inf; support is the count of each bin"
)


def histogram_map(request: MapRequest) -> EnergyMap:
    from ebm_vae.crawl.manifest import read_manifest
    from ebm_vae.energy.histogram import histogram_energy

    cfg, ex, capsule = request.cfg, request.export, request.capsule
    manifest = read_manifest(cfg.paths.index)
    if cfg.data.root:
        manifest.root = Path(cfg.data.root)
    stats = request.require_index_stats(manifest.root)
    grid_stats = GridStats.from_stats(stats)
    if wants_slice(ex, stats.state_info, len(map_axes(ex, stats.state_info, grid_stats))):
        raise ConfigError(f"export.quantity=slice: a histogram counts the marginal of its axes; a slice through "
                         f"the {stats.state_info.dim}-component state of '{capsule.name}' needs export.method=vae")
    grid = request.grid(stats.state_info, grid_stats, counted=True)
    result = histogram_energy(grid, capsule, manifest, cfg.data.chunk_bytes, progress=ex.progress)
    if not result.files:
        why = (f"{len(result.skipped)} skipped, reasons above" if result.skipped else
               "the index lists none: check the capsule's match rules, or re-run ebm-vae-crawl")
        raise ConfigError(f"capsule '{capsule.name}': no usable file in the index of "
                          f"data.root={manifest.root} could be counted ({why})")
    report = result.counts.report()
    log.info("histogram %s: %d states, %d outside the grid, %d of %d bins empty", capsule.name,
             report["n_total"], report["n_outside_grid"], report["empty_bins"], report["bins"])
    metadata = map_metadata(
        capsule, grid, method="histogram", k=None, quantity="marginal", definition=DEFINITION,
        source_files=result.files, checkpoint=None,
        normalization=normalization(stats.state_info, grid.stats, stats.log_jacobian),
        extra={"histogram": report, "skipped_files": result.skipped},
    )
    counts = result.counts.counts.reshape(grid.shape).astype(np.float32)
    return EnergyMap(result.counts.energy(), [a.values for a in grid.axes], metadata, support=counts,
                     **pc_arrays(grid))
