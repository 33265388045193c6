"""A PNG of an energy map: what a user looks at first.

Energies are shown relative to the map's minimum in units of kT (E is in nats, so 1 nat =
1 kT) and clipped at `CLIP_KT`: beyond that the states are rare whatever the exact value.
When most of the map lies above that (high-dimensional states, where leaving the data's
neighbourhood costs thousands of nats, or a briefly trained model) the clip widens to the
map's median, rounded up, so the picture still shows its shape; the colour bar says which.
Bins that are +inf (never seen) are drawn grey. 2-D maps are a heat map with six contour
levels; 1-D maps a line; 3-D maps the minimum projection onto each pair of axes (the lowest
energy along the third axis). Local minima are marked, the global one with a star.
Matplotlib's object API with the Agg canvas is used, so no global backend is switched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.io import atomic_path

CLIP_KT = 12.0
MAX_MARKED_MINIMA = 6


def plot_map(energy_map: EnergyMap, path: str | Path) -> Path:
    """Draw `energy_map` into the PNG `path` (written atomically)."""
    values = energy_map.energy_map.astype(np.float64)
    finite = np.isfinite(values)
    e_min = float(values[finite].min()) if finite.any() else 0.0
    clip = _clip(values[finite] - e_min)
    relative = np.ma.masked_invalid(np.minimum(values - e_min, clip))
    bar_label = "E - E_min [kT]" + ("" if clip == CLIP_KT else f", clipped at {clip:g}")
    labels = [f"{n} [{u}]" if u else n for n, u in zip(energy_map.axis_names, energy_map.axis_units, strict=True)]
    meta = energy_map.metadata
    title = f"{meta.get('capsule', '')}: {meta.get('method', '')}"
    if meta.get("method", "").startswith("vae"):
        title += f", k={meta.get('k')}"
    title += f"  (E_min = {e_min:.2f} nats)"

    if energy_map.ndim == 1:
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        ax.plot(energy_map.axes[0], relative, color="tab:blue")
        ax.set_xlabel(labels[0])
        ax.set_ylabel(bar_label)
        ax.set_ylim(-0.025 * clip, 1.025 * clip)
        for i, m in enumerate(_marked_minima(energy_map, e_min, clip)):
            ax.plot(m.point[0], m.energy - e_min, "k*" if i == 0 else "kx", markersize=10 if i == 0 else 7)
    elif energy_map.ndim == 2:
        fig = Figure(figsize=(6.4, 5.2))
        ax = fig.add_subplot()
        mesh = _heat_map(ax, energy_map.axes[0], energy_map.axes[1], relative, clip, labels[0], labels[1])
        for i, m in enumerate(_marked_minima(energy_map, e_min, clip)):
            ax.plot(m.point[0], m.point[1], "w*" if i == 0 else "wx", markersize=12 if i == 0 else 8,
                    markeredgecolor="k")
        fig.colorbar(mesh, ax=ax, label=bar_label)
    else:
        fig = Figure(figsize=(15, 4.6))
        pairs = [(0, 1, 2), (0, 2, 1), (1, 2, 0)]  # (x axis, y axis, axis minimised over)
        minima = _marked_minima(energy_map, e_min, clip)
        for n, (a, b, hidden) in enumerate(pairs):
            ax = fig.add_subplot(1, 3, n + 1)
            projected = np.ma.masked_invalid(np.minimum(np.min(values, axis=hidden) - e_min, clip))
            mesh = _heat_map(ax, energy_map.axes[a], energy_map.axes[b], projected, clip, labels[a], labels[b])
            ax.set_title(f"min over {energy_map.axis_names[hidden]}", fontsize=9)
            for i, m in enumerate(minima):
                ax.plot(m.point[a], m.point[b], "w*" if i == 0 else "wx", markeredgecolor="k")
        fig.colorbar(mesh, ax=fig.axes, label=bar_label)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def _clip(relative: np.ndarray) -> float:
    """`CLIP_KT`, or the median of the map rounded up to 1, 2 or 5 x 10^n when that is higher."""
    median = float(np.median(relative)) if relative.size else 0.0
    if median <= CLIP_KT:
        return CLIP_KT
    scale = 10.0 ** np.floor(np.log10(median))
    return float(next(m * scale for m in (1, 2, 5, 10) if m * scale >= median))


def _heat_map(ax, x, y, relative, clip, xlabel, ylabel):
    """Heat map of `relative` (ij indexing: first index along x) with contours at clip/6 steps."""
    ax.set_facecolor("0.8")  # masked (+inf) bins show the background
    mesh = ax.pcolormesh(x, y, relative.T, shading="nearest", cmap="viridis", vmin=0.0, vmax=clip)
    if np.ma.count(relative) > 3 and np.ptp(relative.compressed()) > 0:
        ax.contour(x, y, relative.T, levels=np.linspace(0.0, clip, 7)[1:-1], colors="white",
                   linewidths=0.5, alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return mesh


def _marked_minima(energy_map: EnergyMap, e_min: float, clip: float):
    """The deepest local minima below the clip, over a window of ~1/16 of the grid (ignores noise)."""
    radius = max(1, min(energy_map.energy_map.shape) // 16)
    minima = [m for m in energy_map.minima(radius=radius) if m.energy - e_min < clip]
    return minima[:MAX_MARKED_MINIMA]
