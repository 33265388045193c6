"""`ebm-vae-export capsule=NAME`: an energy map `.npz` (+ PNG) from a checkpoint or a histogram.

`export(cfg) -> Path` does the work; `main` is the Hydra wrapper. The ways of making a map
live in `ebm_vae.energy.methods` (one module each); this module only dispatches, writes the
files and says what it replaced. Every map is E = -log p in nats for the density in physical
units, so maps of different runs and methods share one absolute scale.

`export.k` (default 64) is the number of importance samples per grid point: k = 1 gives the
negative ELBO, k > 1 the negative importance-weighted bound, whose gap to -log p shrinks
roughly like 1/k; on the closed-form test densities (tests/test_accuracy.py) k = 64 removes
most of the ELBO's excess energy for ~64x its cost, which is still seconds for a 128 x 128 map.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from ebm_vae.capsules import hydra_search_path, parse_capsule
from ebm_vae.config import config_dir
from ebm_vae.energy.mapfile import EnergyMap, EnergyMapError
from ebm_vae.energy.methods import make_map
from ebm_vae.energy.methods.common import MapRequest
from ebm_vae.energy.plot import plot_map

log = logging.getLogger(__name__)


def export(cfg: DictConfig, energy_map: EnergyMap | None = None) -> Path:
    """Write the energy map of `cfg.capsule` (and its PNG); return the `.npz` path.

    `energy_map`: a map made already, to write as this export would (`ebm-vae-build` counts
    the histogram while choosing the method, and does not count it twice).
    """
    capsule = parse_capsule(cfg.capsule, source="capsule")
    ex = cfg.export
    out = Path(ex.out) if ex.out else Path(cfg.paths.energy_maps) / f"{capsule.name}.npz"
    if energy_map is None:
        energy_map = make_map(MapRequest(cfg, capsule))
    _say_if_replacing(out)
    energy_map.save(out)
    log.info("wrote %s", out)
    if ex.plot:
        log.info("wrote %s", plot_map(energy_map, out.with_suffix(".png"), span=ex.plot_span))
    return out


def _say_if_replacing(out: Path) -> None:
    """A map already at `out` is replaced: say which one, so that a demo map is not lost unseen."""
    if not out.exists():
        return
    try:
        old = EnergyMap.load(out).metadata
        what = f"{old.get('method', '?')} map of '{old.get('capsule', '?')}' created {old.get('created', '?')}"
    except EnergyMapError:
        what = "a file that is not a readable energy map"
    log.warning("replacing %s (%s) and its PNG; pass export.out=PATH to keep it", out, what)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):  # --config-dir DIR brings DIR/capsule/*.yaml, as for the crawl
        cfg.capsule_search_path = list(dict.fromkeys([*cfg.capsule_search_path, *hydra_search_path()]))
    print(export(cfg))


if __name__ == "__main__":
    main()
