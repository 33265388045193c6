"""`ebm-vae-export capsule=NAME`: an energy map `.npz` (+ PNG) from a checkpoint or a histogram.

`export(cfg) -> Path` does the work; `main` is the Hydra wrapper. Two methods:

- `vae` (default): the checkpoint's VAE evaluated over the state grid. `export.k=1` gives the
  negative ELBO ("vae-elbo"); `export.k>1` the negative importance-weighted bound
  ("vae-iwae"). The default k = 64: the bound's gap to -log p(x) shrinks roughly like 1/k,
  and on the closed-form test densities (tests/test_accuracy.py) k = 64 removes most of the
  ELBO's excess energy for ~64x its cost, which is still seconds for a 128 x 128 map.
- `histogram`: the exact marginal density of the map axes, counted over every usable file
  of the capsule in the index (no checkpoint needed); for small domains and for checks.

Either way E = -log p(x) in nats for the density in physical units, so maps of different
runs and methods share one absolute scale.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ebm_vae import __version__
from ebm_vae.capsules import parse_capsule
from ebm_vae.cli import App
from ebm_vae.config import CapsuleConfig, to_container
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.grid import GridStats, StateGrid
from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.plot import plot_map
from ebm_vae.errors import ConfigError

log = logging.getLogger(__name__)

VAE_DEFINITION = (
    "E(x) = -log p(x) in nats, p the VAE's density of the full state in its physical units "
    "(z-score Jacobian sum(log std) included), estimated by the negative ELBO (k = 1) or the "
    "negative importance-weighted bound with k samples (above the true E, tightening as k grows); "
    "components off the map axes are held at reference_state (the joint energy on that slice; "
    "on pc axes the state is mean + sum_i c_i * pc_i)"
)
HISTOGRAM_DEFINITION = (
    "E(x) = -log p(x) in nats, p the marginal density of the map axes in their physical units: "
    "count / (N_total * bin volume) in the bin centred on each grid point (edges halfway "
    "between grid points); empty bins are +inf"
)


def export(cfg: DictConfig) -> Path:
    """Write the energy map of `cfg.capsule` (and its PNG); return the `.npz` path."""
    capsule = parse_capsule(cfg.capsule, source="capsule")
    ex = cfg.export
    out = map_path(cfg)
    if ex.method == "vae":
        energy_map = _vae_map(cfg, capsule)
    elif ex.method == "histogram":
        energy_map = _histogram_map(cfg, capsule)
    else:
        raise ConfigError(f"export.method must be 'vae' or 'histogram', got '{ex.method}'")
    energy_map.save(out)
    log.info("wrote %s", out)
    if ex.plot:
        log.info("wrote %s", plot_map(energy_map, out.with_suffix(".png")))
    return out


def _index_stats(cfg: DictConfig, capsule: str):
    """The crawl's statistics of `capsule`, or None when the index has none."""
    from ebm_vae.data.stats import Stats

    path = Path(cfg.paths.index) / capsule / "stats.json"
    return Stats.load(path) if path.is_file() else None


def _vae_map(cfg: DictConfig, capsule: CapsuleConfig) -> EnergyMap:
    from ebm_vae.energy.evaluate import evaluate_energy
    from ebm_vae.energy.model import CheckpointError, load_vae

    ex = cfg.export
    ckpt = Path(cfg.ckpt) if cfg.ckpt else Path(cfg.paths.checkpoints) / capsule.name / "last.ckpt"
    vae = load_vae(ckpt, ex.device)
    trained_on = vae.hparams.capsule.get("name")
    if trained_on != capsule.name:
        raise CheckpointError(f"{ckpt}: a checkpoint of capsule '{trained_on}', not of capsule="
                         f"'{capsule.name}'; pass capsule={trained_on} or the ckpt=PATH of a {capsule.name} run")
    state = vae.state_info
    grid = StateGrid.build(state, _vae_grid_stats(vae, _index_stats(cfg, capsule.name)), ex.axes,
                           ex.limits, ex.resolution, to_container(ex.reference))
    energy = evaluate_energy(vae, grid.states, grid.n_points, k=ex.k, seed=ex.seed, device=ex.device,
                             chunk_points=ex.chunk_points, progress=ex.progress,
                             description=f"export {capsule.name}")
    stat = ckpt.stat()
    meta = vae.hparams.stats_meta
    metadata = _metadata(
        capsule, grid, method="vae-elbo" if ex.k == 1 else "vae-iwae", k=int(ex.k),
        definition=VAE_DEFINITION, source_files=meta.get("files", []),
        checkpoint={"path": str(ckpt.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        normalization=_normalization(state, grid.stats, float(vae.log_jacobian)),
        extra={"seed": int(ex.seed), "statistics_created": meta.get("created"),
               "training_samples": meta.get("split", {}).get("train_samples", meta.get("count"))},
    )
    return EnergyMap(energy.reshape(grid.shape), [a.values for a in grid.axes], metadata)


def _vae_grid_stats(vae, index_stats) -> GridStats:
    """The checkpoint's normalisation (what the model was trained with) and principal basis;
    the observed range, for default limits and checks, from the index when it describes the
    same state."""
    def array(t):
        return t.detach().double().cpu().numpy()

    has_pca = vae.pca_components.shape[0] > 0
    same_state = index_stats is not None and index_stats.state == vae.hparams.state
    return GridStats(mean=array(vae.norm_mean), std=array(vae.norm_std),
                     lo=index_stats.min if same_state else None, hi=index_stats.max if same_state else None,
                     pca_components=array(vae.pca_components) if has_pca else None,
                     pca_std=array(vae.pca_std) if has_pca else None)


def _histogram_map(cfg: DictConfig, capsule: CapsuleConfig) -> EnergyMap:
    from ebm_vae.crawl.manifest import read_manifest
    from ebm_vae.energy.histogram import histogram_energy

    ex = cfg.export
    manifest = read_manifest(cfg.paths.index)
    if cfg.data.root:
        manifest.root = Path(cfg.data.root)
    stats = _index_stats(cfg, capsule.name)
    if stats is None:
        raise FileNotFoundError(f"{Path(cfg.paths.index) / capsule.name / 'stats.json'}: no statistics "
                                f"for capsule '{capsule.name}' in the index of data.root={manifest.root}; "
                                "run `ebm-vae-crawl data.root=DIR` first")
    grid = StateGrid.build(stats.state_info, GridStats.from_stats(stats), ex.axes, ex.limits,
                           ex.resolution, to_container(ex.reference))
    result = histogram_energy(grid, capsule, manifest, cfg.data.chunk_bytes, progress=ex.progress)
    if not result.files:
        why = (f"{len(result.skipped)} skipped, reasons above" if result.skipped else
               "the index lists none: check the capsule's match rules, or re-run ebm-vae-crawl")
        raise ConfigError(f"capsule '{capsule.name}': no usable file in the index of "
                          f"data.root={manifest.root} could be counted ({why})")
    report = result.counts.report()
    log.info("histogram %s: %d states, %d outside the grid, %d of %d bins empty", capsule.name,
             report["n_total"], report["n_outside_grid"], report["empty_bins"], report["bins"])
    metadata = _metadata(
        capsule, grid, method="histogram", k=None, definition=HISTOGRAM_DEFINITION,
        source_files=result.files, checkpoint=None,
        normalization=_normalization(stats.state_info, grid.stats, stats.log_jacobian),
        extra={"histogram": report, "skipped_files": result.skipped},
    )
    return EnergyMap(result.counts.energy(), [a.values for a in grid.axes], metadata)


def _metadata(capsule: CapsuleConfig, grid: StateGrid, *, method: str, k: int | None,
              definition: str, source_files: list, checkpoint: dict | None,
              normalization: dict, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "capsule": capsule.name,
        "axes": [{"name": a.name, "unit": a.unit, "limits": [a.values[0], a.values[-1]],
                  "points": len(a.values)} for a in grid.axes],
        "method": method,
        "k": k,
        "reference_state": grid.reference_metadata(),
        "state": {"kind": grid.state.kind, "shape": list(grid.state.shape),
                  "channels": list(grid.state.channel_names) or list(grid.state.names),
                  "units": list(grid.state.channel_units) or list(grid.state.units)},
        "source_files": source_files,
        "checkpoint": checkpoint,
        "normalization": normalization,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "energy_definition": definition,
        "energy_unit": "nats",
        "ebm_vae_version": __version__,
        **extra,
    }


def _normalization(state: StateInfo, stats: GridStats, log_jacobian: float) -> dict[str, Any]:
    """Per-component mean/std for vector states; for field states a per-channel summary
    (thousands of pixels would dwarf the map) and the principal stds."""
    out: dict[str, Any] = {"log_jacobian": log_jacobian}
    if state.kind != "field":
        out["mean"] = dict(zip(state.names, stats.mean.tolist(), strict=True))
        out["std"] = dict(zip(state.names, stats.std.tolist(), strict=True))
        return out
    per_channel = np.asarray(stats.mean).reshape(state.shape[0], -1), np.asarray(stats.std).reshape(state.shape[0], -1)
    out["channels"] = {name: {"mean_of_mean": float(m.mean()), "mean_of_std": float(s.mean()),
                              "min_std": float(s.min()), "max_std": float(s.max())}
                       for name, m, s in zip(state.channel_names, *per_channel, strict=True)}
    if stats.pca_std is not None:
        out["pca_std"] = np.asarray(stats.pca_std).tolist()
    return out


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
    summary="the energy map E(x) = -log p(x) (nats) of one capsule from its checkpoint or a "
            "histogram; writes energy_maps/<capsule>.npz and .png under paths.root",
    usage=("capsule=NAME [ckpt=PATH] [export.k=K] [export.resolution=R] [KEY=VALUE ...]",
           "capsule=NAME export.method=histogram             # exact counts, no checkpoint"),
    choices=("capsule", "preset"),
    overrides=(
        ("ckpt=PATH", "the checkpoint (default: checkpoints/<capsule>/last.ckpt)"),
        ("export.method=vae|histogram", "the VAE's bound (default), or the histogram of the index"),
        ("export.k=K", "importance samples: 1 = negative ELBO, more = a tighter bound (default 64)"),
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
