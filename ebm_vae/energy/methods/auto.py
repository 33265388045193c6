"""`export.method=auto`: the exact histogram where counting resolves the map, the model elsewhere.

The rule comes from the study (`scripts/bench.py study`, docs/study.md), which scores both
methods against closed-form densities. A histogram counts in as many dimensions as it has
axes: a marginal map (or a map of a state with no more components than axes) counts in
d = n_axes dimensions, whatever the state's size; a slice through a larger state cannot be
counted at all. In d = 2 the study's histogram beats the VAE from N = 1e5 on (0.08-0.17 nats
against 0.16-0.41) and where its bins hold a few dozen samples; it loses wherever its bins run
empty or thin (d >= 4, or small N). The map's own bins decide, after one counting pass:

- the *region* is the map's bins within `REGION_NATS` of the lowest energy, and the empty
  bins enclosed by them (both neighbours along some axis in the region): holes inside the
  landscape, not the empty space beyond a sharp edge of the data;
- the histogram is kept when at most `MAX_EMPTY_FRACTION` of the region's bins are empty
  (a hole is +inf inside the landscape) and the median count of the region's bins is at
  least `MIN_MEDIAN_COUNT` (the Poisson error of a bin's energy, ~1/sqrt(count), is then at
  most 0.2 nats: the VAE's error at d = 2 in the study);
- otherwise, and without counting when N is too small to fill even a small region
  (N < MIN_MEDIAN_COUNT x MIN_REGION_FRACTION x bins), the model.

`choose_method` is what `ebm-vae-build` asks before deciding whether to train; the map's
metadata records the `method` and the `method_reason` with the figures behind it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from ebm_vae.config import CapsuleConfig
from ebm_vae.energy.grid import GridStats
from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.energy.methods.common import MapRequest, map_axes, wants_slice

log = logging.getLogger(__name__)

REGION_NATS = 6.0
MAX_EMPTY_FRACTION = 0.02
MIN_MEDIAN_COUNT = 25
MIN_REGION_FRACTION = 0.02  # the smallest share of the map's bins a landscape's region is assumed to cover


@dataclass
class Choice:
    """What `auto` chose and why; `histogram` is the counted map when it was counted."""

    method: str  # "histogram" or "vae"
    reason: str
    histogram: EnergyMap | None = None


def choose_method(cfg: DictConfig, capsule: CapsuleConfig) -> Choice:
    """The method `export.method=auto` takes for `capsule` with the export settings of `cfg`
    (counts the index once when the histogram is a candidate)."""
    return choose(MapRequest(cfg, capsule))


def choose(request: MapRequest) -> Choice:
    from ebm_vae.energy.methods.histogram import histogram_map

    stats = request.index_stats
    if stats is None:
        return Choice("vae", "no index statistics to count a histogram from")
    state = stats.state_info
    axes = map_axes(request.export, state, GridStats.from_stats(stats))
    if wants_slice(request.export, state, len(axes)):
        return Choice("vae", f"a slice through a {state.dim}-component state cannot be counted")
    bins = request.export.resolution ** len(axes)
    smallest = MIN_MEDIAN_COUNT * MIN_REGION_FRACTION * bins
    if stats.count < smallest:
        return Choice("vae", f"{stats.count:,} states cannot resolve a {_shape(request, axes)} histogram "
                             f"(at least {smallest:,.0f} needed to fill {MIN_MEDIAN_COUNT} per bin over "
                             f"{MIN_REGION_FRACTION:.0%} of its bins)")
    counted = histogram_map(request)
    empty, median, region = resolution(counted.support)
    figures = (f"{counted.metadata['histogram']['n_total']:,} states counted in {len(axes)}-D: "
               f"{empty:.1%} of the {region:,} bins within {REGION_NATS:g} nats of the minimum are "
               f"empty, their median count is {median:g}")
    if empty <= MAX_EMPTY_FRACTION and median >= MIN_MEDIAN_COUNT:
        return Choice("histogram", f"counting resolves the map ({figures}; needs <= {MAX_EMPTY_FRACTION:.0%} "
                                   f"empty and >= {MIN_MEDIAN_COUNT})", counted)
    return Choice("vae", f"counting does not resolve the map ({figures}; the histogram needs <= "
                         f"{MAX_EMPTY_FRACTION:.0%} empty and >= {MIN_MEDIAN_COUNT})")


def resolution(counts: np.ndarray) -> tuple[float, float, int]:
    """(empty fraction, median count, number of bins) of the region of a count grid (see the
    module docstring)."""
    counts = np.asarray(counts, dtype=np.float64)
    populated = (counts > 0) & (counts >= counts.max() * np.exp(-REGION_NATS))
    holes = np.zeros_like(populated)
    for axis in range(counts.ndim):
        padded = np.pad(populated, [(1, 1) if a == axis else (0, 0) for a in range(counts.ndim)])
        n = counts.shape[axis]
        holes |= np.take(padded, range(0, n), axis=axis) & np.take(padded, range(2, n + 2), axis=axis)
    region = populated | (holes & (counts == 0))
    inside = counts[region]
    return float(np.mean(inside == 0)), float(np.median(inside)), int(region.sum())


def auto_map(request: MapRequest) -> EnergyMap:
    from ebm_vae.energy.methods import vae_map

    choice = choose(request)
    log.info("export.method=auto for %s: %s, because %s", request.capsule.name, choice.method, choice.reason)
    if choice.method == "vae" and not request.checkpoint_path.is_file():
        raise FileNotFoundError(f"export.method=auto chose the model for capsule '{request.capsule.name}' "
                                f"({choice.reason}), but there is no checkpoint at {request.checkpoint_path}: "
                                f"train one with `ebm-vae-train capsule={request.capsule.name}` or pass ckpt=PATH")
    energy_map = choice.histogram if choice.method == "histogram" else vae_map(request)
    energy_map.metadata["method_reason"] = choice.reason
    return energy_map


def _shape(request: MapRequest, axes: list[str]) -> str:
    return " x ".join([str(request.export.resolution)] * len(axes))
