"""Ways of making an energy map, one module each; `make_map` picks one from `export.method`.

- `marginal`: the checkpoint's marginal of the map axes, every other direction integrated out.
- `slice`: the checkpoint's joint energy of the full state on a slice through a reference state
  (for a state with no more components than map axes: the density itself, its own marginal).
- `histogram`: the exact marginal of the map axes, counted over the index.
- `auto`: the histogram where counting resolves the map, the checkpoint elsewhere.
"""

from __future__ import annotations

import logging

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.methods.common import MapRequest, map_axes, vae_grid_stats, wants_slice
from ebm_vae.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("vae", "histogram", "auto")


def make_map(request: MapRequest) -> EnergyMap:
    """The map `request.export.method` asks for."""
    from ebm_vae.energy.methods.auto import auto_map
    from ebm_vae.energy.methods.histogram import histogram_map

    method = request.export.method
    if method == "vae":
        return vae_map(request)
    if method == "histogram":
        return histogram_map(request)
    if method == "auto":
        return auto_map(request)
    raise ConfigError(f"export.method must be one of {', '.join(METHODS)}, got '{method}'")


def vae_map(request: MapRequest) -> EnergyMap:
    """The checkpoint's map of `export.quantity`: the marginal where the state has components
    off the map axes to integrate, else the density on the grid itself."""
    from ebm_vae.energy.marginal import MarginalError
    from ebm_vae.energy.methods.marginal import marginal_map
    from ebm_vae.energy.methods.slice import slice_map

    vae = request.vae
    state = vae.state_info
    n_axes = len(map_axes(request.export, state, vae_grid_stats(vae, request.index_stats)))
    if wants_slice(request.export, state, n_axes) or state.dim <= n_axes:
        return slice_map(request)
    try:
        return marginal_map(request)
    except MarginalError as exc:
        if request.export.quantity is not None:
            raise
        log.warning("%s: no marginal map from this checkpoint (%s); writing the slice through the mean "
                    "instead (metadata quantity=slice)", request.capsule.name, exc)
        return slice_map(request)
