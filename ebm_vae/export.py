"""`ebm-vae-export capsule=NAME`: an energy map `.npz` (+ PNG) from a checkpoint or a histogram.

`export(cfg) -> Path` does the work; `main` is the console script (`ebm_vae.cli.App`). The
ways of making a map live in `ebm_vae.energy.methods` (one module each); this module only
dispatches, writes the files and says what it replaced. Every map is E = -log p in nats for
the density in physical units, so maps of different runs and methods share one absolute scale.

`export.k` (default 64) is the number of importance samples per grid point: k = 1 gives the
negative ELBO, k > 1 the negative importance-weighted bound, whose gap to -log p shrinks
roughly like 1/k; on the closed-form test densities (tests/test_accuracy.py) k = 64 removes
most of the ELBO's excess energy for ~64x its cost. A marginal map draws k off-axis states per
grid point, each weighted by the model's bound (docs/ARCHITECTURE.md, "Marginal maps").
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ebm_vae.capsules import parse_capsule
from ebm_vae.cli import App
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
    out = map_path(cfg)
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


def map_path(cfg: DictConfig) -> Path:
    """Where the map of `cfg.capsule` goes: export.out, else ${paths.energy_maps}/<capsule>.npz."""
    return Path(cfg.export.out) if cfg.export.out else Path(cfg.paths.energy_maps) / f"{cfg.capsule.name}.npz"


def export_locked(cfg: DictConfig) -> Path:
    """`export` holding the map's lock (two exports of one map wait for each other, so its .npz
    and .png come from one run) and a shared lock of the index (a crawl waits until it is read)."""
    from ebm_vae.locks import output_lock

    with output_lock(map_path(cfg), f"the export of capsule {cfg.capsule.name}"), \
            output_lock(cfg.paths.index, f"the export of capsule {cfg.capsule.name}", shared=True):
        return export(cfg)


def _print_export(cfg: DictConfig) -> None:
    print(export_locked(cfg))


main = App(
    name="ebm-vae-export", config_name="export", task=_print_export,
    summary="the energy map E = -log p (nats) of one capsule from its checkpoint or a histogram; "
            "writes energy_maps/<capsule>.npz and .png under paths.root",
    usage=("capsule=NAME [ckpt=PATH] [export.k=K] [export.resolution=R] [KEY=VALUE ...]",
           "capsule=NAME export.method=histogram             # exact counts, no checkpoint"),
    choices=("capsule", "preset"),
    overrides=(
        ("ckpt=PATH", "the checkpoint (default: checkpoints/<capsule>/last.ckpt)"),
        ("export.method=vae|histogram|auto", "the VAE (default), the histogram of the index, or "
                                             "the histogram where counting resolves the map"),
        ("export.quantity=marginal|slice", "F of the axes with the rest integrated out (default), "
                                           "or the joint energy through export.reference"),
        ("export.k=K", "importance samples per grid point: 1 = negative ELBO, more = a tighter bound (64)"),
        ("export.resolution=R", "grid points per axis"),
        ("export.axes=[a,b]", "the map's axes: state components, or pc1, pc2, ... for fields"),
        ("export.limits=[[lo,hi],[lo,hi]]", "axis limits in physical units (default: from the data)"),
        ("export.out=PATH", "the .npz to write (default: energy_maps/<capsule>.npz; replaced if there)"),
        ("export.device=auto|cpu|cuda", "where the VAE is evaluated"),
        ("paths.root=DIR", "where the index, checkpoints and maps are (default: the current folder)"),
    ),
).main


if __name__ == "__main__":
    main()
