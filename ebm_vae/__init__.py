"""ebm-vae: energy maps E(x) = -log p(x) of physics states, learned by a VAE from large data trees."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import ebm_vae` stays cheap for workers and the crawler (no torch import).
    if name == "EnergyMap":
        from ebm_vae.energy.mapfile import EnergyMap

        return EnergyMap
    if name == "EnergyModel":
        from ebm_vae.energy.model import EnergyModel

        return EnergyModel
    if name == "EnergyLandscape":
        from ebm_vae.energy.landscape import EnergyLandscape

        return EnergyLandscape
    raise AttributeError(name)


__all__ = ["EnergyLandscape", "EnergyMap", "EnergyModel", "__version__"]
