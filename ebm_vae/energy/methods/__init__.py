"""Ways of making an energy map, one module each; `make_map` picks one from `export.method`.

- `slice`: the checkpoint's joint energy of the full state on a slice through a reference state.
- `histogram`: the exact marginal of the map axes, counted over the index.
- `auto`: the histogram where counting resolves the map, the checkpoint elsewhere.
"""

from __future__ import annotations

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.methods.common import MapRequest

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
    raise ValueError(f"export.method must be one of {', '.join(METHODS)}, got '{method}'")


def vae_map(request: MapRequest) -> EnergyMap:
    """The checkpoint's map."""
    from ebm_vae.energy.methods.slice import slice_map

    return slice_map(request)
