"""What the ways of making a map share: the request, the index and checkpoint they read, the
grid's statistics and the metadata every `.npz` carries."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ebm_vae import __version__
from ebm_vae.config import CapsuleConfig, to_container
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.grid import GridStats, StateGrid, default_axes
from ebm_vae.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class MapRequest:
    """One export: the composed `export` config and the capsule it maps.

    The index statistics and the checkpoint are read on first use and kept, so a method that
    delegates to another (auto) does not read them twice.
    """

    cfg: DictConfig
    capsule: CapsuleConfig

    @property
    def export(self) -> DictConfig:
        return self.cfg.export

    @property
    def checkpoint_path(self) -> Path:
        if self.cfg.ckpt:
            return Path(self.cfg.ckpt)
        return Path(self.cfg.paths.checkpoints) / self.capsule.name / "last.ckpt"

    @functools.cached_property
    def index_stats(self):
        """The crawl's statistics of the capsule (`ebm_vae.data.stats.Stats`), or None."""
        from ebm_vae.data.stats import Stats

        path = Path(self.cfg.paths.index) / self.capsule.name / "stats.json"
        return Stats.load(path) if path.is_file() else None

    def require_index_stats(self, root: Path):
        """The statistics, or a one-line error naming the index and the data root it describes."""
        if self.index_stats is None:
            raise FileNotFoundError(
                f"{Path(self.cfg.paths.index) / self.capsule.name / 'stats.json'}: no statistics for capsule "
                f"'{self.capsule.name}' in the index of data.root={root}; run `ebm-vae-crawl data.root=DIR` first")
        return self.index_stats

    @functools.cached_property
    def vae(self):
        """The checkpoint's model on `export.device`, checked to be of this capsule."""
        from ebm_vae.energy.model import CheckpointError, load_vae

        ckpt = self.checkpoint_path
        vae = load_vae(ckpt, self.export.device)
        trained_on = vae.hparams.capsule.get("name")
        if trained_on != self.capsule.name:
            raise CheckpointError(f"{ckpt}: a checkpoint of capsule '{trained_on}', not of capsule="
                             f"'{self.capsule.name}'; pass capsule={trained_on} or the ckpt=PATH of a "
                             f"{self.capsule.name} run")
        return vae

    def checkpoint_metadata(self) -> dict[str, Any]:
        stat = self.checkpoint_path.stat()
        return {"path": str(self.checkpoint_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def grid(self, state: StateInfo, stats: GridStats, counted: bool = False,
             bounds: dict[str, list] | None = None) -> StateGrid:
        """The map's grid; `bounds` default to the capsule's (a checkpoint passes its own)."""
        ex = self.export
        bounds = to_container(self.capsule.bounds) if bounds is None else bounds
        return StateGrid.build(state, stats, ex.axes, ex.limits, ex.resolution, to_container(ex.reference),
                               counted=counted, bounds=bounds)


QUANTITIES = ("marginal", "slice")


def wants_slice(export: DictConfig, state: StateInfo, n_axes: int) -> bool:
    """Whether the map is a slice through a state with more components than map axes (a
    quantity no histogram can count); otherwise it is the marginal of its axes (which for a
    state with no more components than axes is the density itself)."""
    if export.quantity not in (None, *QUANTITIES):
        raise ConfigError(f"export.quantity must be one of {', '.join(QUANTITIES)} (or null), got '{export.quantity}'")
    return export.quantity == "slice" and state.dim > n_axes


def map_axes(export: DictConfig, state: StateInfo, stats: GridStats) -> list[str]:
    """The map's axis names: `export.axes`, or the default ones."""
    return list(export.axes) if export.axes else default_axes(state, stats)


def vae_grid_stats(vae, index_stats) -> GridStats:
    """The checkpoint's normalisation (what the model was trained with) and principal basis;
    the observed range, for default limits and checks, from the index when it describes the
    same state."""
    def array(t):
        return t.detach().double().cpu().numpy()

    has_pca = vae.pca_components.shape[0] > 0
    same_state = index_stats is not None and index_stats.state == vae.hparams.state
    components = array(vae.pca_components) if has_pca else None
    # quantiles of principal coefficients hold for the basis they were taken in
    same_basis = same_state and (not has_pca or (index_stats.pca is not None and np.allclose(
        np.asarray(index_stats.pca["components"]), components, atol=1e-5)))
    return GridStats(mean=array(vae.norm_mean), std=array(vae.norm_std),
                     lo=index_stats.min if same_state else None, hi=index_stats.max if same_state else None,
                     pca_components=components, pca_std=array(vae.pca_std) if has_pca else None,
                     quantiles=index_stats.quantiles if same_basis else None)


def map_metadata(capsule: CapsuleConfig, grid: StateGrid, *, method: str, k: int | None, quantity: str,
                 definition: str, source_files: list, checkpoint: dict | None,
                 normalization: dict, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "capsule": capsule.name,
        "quantity": quantity,
        "axes": [{"name": a.name, "unit": a.unit, "limits": [a.values[0], a.values[-1]],
                  "points": len(a.values), ("pc" if grid.on_pcs else "component"): a.index}
                 for a in grid.axes],
        "method": method,
        "k": k,
        "reference_state": grid.reference_metadata(),
        "state": {"kind": grid.state.kind, "shape": list(grid.state.shape),
                  "channels": list(grid.state.channel_names) or list(grid.state.names),
                  "units": list(grid.state.channel_units) or list(grid.state.units)},
        "source_files": source_files,
        # rows or log lines of those files that did not parse (counted per file by the statistics pass)
        "skipped_rows": int(sum(f.get("skipped_rows") or 0 for f in source_files if isinstance(f, dict))),
        "checkpoint": checkpoint,
        "normalization": normalization,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "energy_definition": definition,
        "energy_unit": "nats",
        "ebm_vae_version": __version__,
        **extra,
    }


def learned_map_metadata(request: MapRequest, vae, grid: StateGrid, *, method: str, quantity: str,
                         definition: str, estimate, extra: dict[str, Any]) -> dict[str, Any]:
    """`map_metadata` of a map made from a checkpoint: what it was trained on (the split's train
    and validation samples and files, so that a file seen only in validation is visible in the
    map too), the transform (field rank, bounds, excluded point masses), the uncertainty and
    the support, beside the method's own `extra`."""
    ex, meta = request.cfg.export, vae.hparams.stats_meta
    split = meta.get("split") or {}
    return map_metadata(
        request.capsule, grid, method=method, k=int(ex.k), quantity=quantity, definition=definition,
        source_files=meta.get("files", []), checkpoint=request.checkpoint_metadata(),
        normalization=normalization(vae.state_info, grid.stats, float(vae.log_jacobian)),
        extra={"seed": int(ex.seed),
               "training_samples": split.get("train_samples", meta.get("count")),
               "validation_samples": split.get("val_samples"),
               "split": {k: split[k] for k in ("val_fraction", "train_files", "val_files", "only_val", "exact",
                                               "files") if k in split},
               "transform": vae.transform.describe(), "statistics_created": meta.get("created"),
               "uncertainty": estimate.summary(), **support_metadata(vae, grid), **extra},
    )


def pc_arrays(grid: StateGrid) -> dict[str, np.ndarray]:
    """`pc_vectors` and `pc_origin` for a map on pc axes (keywords of `EnergyMap`), else none."""
    frame = grid.pc_frame()
    return {} if frame is None else {"pc_vectors": frame[0], "pc_origin": frame[1]}


def normalization(state: StateInfo, stats: GridStats, log_jacobian: float) -> dict[str, Any]:
    """Per-component mean/std for vector states; for field states a per-channel summary
    (thousands of pixels would dwarf the map) and the principal stds."""
    out: dict[str, Any] = {"log_jacobian": log_jacobian}
    if state.kind != "field":
        out["mean"] = dict(zip(state.names, stats.mean.tolist(), strict=True))
        out["std"] = dict(zip(state.names, stats.std.tolist(), strict=True))
        return out
    per_channel = (np.asarray(stats.mean).reshape(state.shape[0], -1),
                   np.asarray(stats.std).reshape(state.shape[0], -1))
    out["channels"] = {name: {"mean_of_mean": float(m.mean()), "mean_of_std": float(s.mean()),
                              "min_std": float(s.min()), "max_std": float(s.max())}
                       for name, m, s in zip(state.channel_names, *per_channel, strict=True)}
    if stats.pca_std is not None:
        out["pca_std"] = np.asarray(stats.pca_std).tolist()
    return out


def support_window(grid: StateGrid) -> int:
    """Half-width, in bins, of the window a learned map's support is averaged over (~1/32 of the axis)."""
    return max(1, round(min(grid.shape) / 32))


def support_map(vae, grid: StateGrid) -> np.ndarray | None:
    """Training states per bin around each grid point, from the checkpoint's `support_states`
    reservoir (a uniform sample of the training states, in the state or its principal
    coefficients): the reservoir's states in the bins of a window of (2w + 1)^n bins around the
    point, scaled by the training samples each stands for, per bin. 0 means no training state
    anywhere in the window: the energy there is an extrapolation of the model. None when the
    checkpoint has no reservoir, or keeps coefficients and the axes are pixels."""
    states = getattr(vae, "support_states", None)
    if states is None or len(states) == 0:
        return None
    states = states.detach().double().cpu().numpy()
    cols = [a.index for a in grid.axes]
    if states.shape[1] == grid.state.dim:  # flat physical states
        if grid.on_pcs:
            coords = (states - grid.stats.mean) @ np.asarray(grid.stats.pca_components)[cols].T
        else:
            coords = states[:, cols]
    elif grid.on_pcs:  # principal coefficients (x - mean) @ pca_components.T
        coords = states[:, cols]
    else:
        return None
    counts = np.zeros(grid.shape)
    index, inside = [], np.ones(len(coords), dtype=bool)
    for d, axis in enumerate(grid.axes):
        step = axis.values[1] - axis.values[0]
        i = np.floor((coords[:, d] - axis.values[0]) / step + 0.5).astype(np.int64)
        inside &= (i >= 0) & (i < len(axis.values))
        index.append(i)
    np.add.at(counts, tuple(i[inside] for i in index), 1.0)
    width = support_window(grid)
    in_window = _box_sum(counts, width) / _box_sum(np.ones(grid.shape), width)
    return (in_window * float(vae.support_samples) / len(states)).astype(np.float32)


def support_metadata(vae, grid: StateGrid) -> dict[str, Any]:
    """The `support` entry of a learned map's metadata (empty without a reservoir)."""
    states = getattr(vae, "support_states", None)
    if states is None or len(states) == 0:
        return {}
    width = 2 * support_window(grid) + 1
    return {"support": {
        "source": "the checkpoint's support_states reservoir", "reservoir_states": len(states),
        "training_samples": int(vae.support_samples), "window_bins": [width] * len(grid.axes),
        "definition": "training states per bin, averaged over the window of bins around each grid point; "
                      "0 = no training state in the window: the energy there is an extrapolation"}}


def _box_sum(values: np.ndarray, width: int) -> np.ndarray:
    """The sum of `values` over the window of +/- `width` bins along every axis (zero outside)."""
    for axis in range(values.ndim):
        padded = np.pad(values, [(width + 1, width) if a == axis else (0, 0) for a in range(values.ndim)])
        cumulative = np.cumsum(padded, axis=axis)
        n = values.shape[axis]
        values = np.take(cumulative, range(2 * width + 1, 2 * width + 1 + n), axis=axis) - \
            np.take(cumulative, range(0, n), axis=axis)
    return values
