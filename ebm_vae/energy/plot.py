"""A PNG of an energy map: what a user looks at first.

Energies are drawn relative to the map's minimum, in nats, from 0 to `span` (default 12): the
same colour scale for every map of a capsule, so a learned map and the histogram of the same
data read side by side. Energies above the span are clipped (the colour bar's arrow).
A slice through a state with more components than map axes can lie thousands of nats above
its minimum almost everywhere; only there does the span widen to the map's median, rounded
up, and the colour bar says so. +inf is never a colour: empty histogram bins (and states
outside a physical bound) are hatched, unlike clipped high energies. Local minima are marked
(a star for the global one, crosses for the others) with a legend.

Where the map has them, a second panel shows `energy_std` (the uncertainty of E, nats), and
low `support` (fewer than `MIN_SUPPORT` training states per bin around a grid point) is
outlined and hatched on a learned map: there the energy is an extrapolation of the model.

2-D maps are a heat map with contours; 1-D maps a line (with a +/- std band); 3-D maps the
minimum projection onto each pair of axes. Matplotlib's object API with the Agg canvas is
used, so no global backend is switched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.io import atomic_path

SPAN_NATS = 12.0
MAX_MARKED_MINIMA = 6
MIN_SUPPORT = 1.0  # training states per bin below which a learned energy is an extrapolation
HATCH = "////"


def plot_map(energy_map: EnergyMap, path: str | Path, span: float = SPAN_NATS) -> Path:
    """Draw `energy_map` into the PNG `path` (written atomically)."""
    values = energy_map.energy_map.astype(np.float64)
    finite = np.isfinite(values)
    e_min = float(values[finite].min()) if finite.any() else 0.0
    if energy_map.metadata.get("quantity") == "slice":
        span = _widened(values[finite] - e_min, span)
    bar_label = "E - E_min (nats)" + ("" if span == SPAN_NATS else f", up to {span:g}")
    labels = [axis_label(n, u) for n, u in zip(energy_map.axis_names, energy_map.axis_units, strict=True)]
    minima = _marked_minima(energy_map, e_min, span)
    std = energy_map.energy_std
    panels = 1 if std is None else 2

    if energy_map.ndim == 1:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
        _line(ax, energy_map, values - e_min, e_min, span, labels[0], bar_label, minima)
    elif energy_map.ndim == 2:
        fig = Figure(figsize=(6.4 * panels, 5.8), layout="constrained")
        ax = fig.add_subplot(1, panels, 1)
        mesh = _heat_map(ax, energy_map.axes[0], energy_map.axes[1], values - e_min, span, labels[0], labels[1])
        fig.colorbar(mesh, ax=ax, label=bar_label, extend="max")
        _overlays(ax, energy_map, energy_map.axes[0], energy_map.axes[1], values, energy_map.support, minima, (0, 1))
        if std is not None:
            _std_panel(fig, fig.add_subplot(1, 2, 2), energy_map.axes[0], energy_map.axes[1],
                       std.astype(np.float64), labels[0], labels[1])
    else:
        fig = Figure(figsize=(15, 5.2 * panels), layout="constrained")
        pairs = [(0, 1, 2), (0, 2, 1), (1, 2, 0)]  # (x axis, y axis, axis minimised over)
        energy_axes = []
        for n, (a, b, hidden) in enumerate(pairs):
            ax = fig.add_subplot(panels, 3, n + 1)
            energy_axes.append(ax)
            at_min = np.expand_dims(np.argmin(np.where(finite, values, np.inf), axis=hidden), hidden)
            projected = np.take_along_axis(values, at_min, hidden).squeeze(hidden)
            mesh = _heat_map(ax, energy_map.axes[a], energy_map.axes[b], projected - e_min, span, labels[a], labels[b])
            ax.set_title(f"min over {energy_map.axis_names[hidden]}", fontsize=9)
            support = None if energy_map.support is None else \
                np.take_along_axis(energy_map.support, at_min, hidden).squeeze(hidden)
            _overlays(ax, energy_map, energy_map.axes[a], energy_map.axes[b], projected, support, minima, (a, b))
            if std is not None:
                std_at_min = np.take_along_axis(std.astype(np.float64), at_min, hidden).squeeze(hidden)
                _std_panel(fig, fig.add_subplot(2, 3, n + 4), energy_map.axes[a], energy_map.axes[b],
                           std_at_min, labels[a], labels[b])
        fig.colorbar(mesh, ax=energy_axes, label=bar_label, extend="max")
    fig.suptitle(_title(energy_map, e_min), fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def axis_label(name: str, unit: str) -> str:
    """`name [unit]`, unless the name already carries its unit (`GHI (W/m^2)`)."""
    return f"{name} [{unit}]" if unit and unit not in name else name


def _title(energy_map: EnergyMap, e_min: float) -> str:
    meta = energy_map.metadata
    title = f"{meta.get('capsule', '')}: {meta.get('method', '')}"
    if meta.get("method", "").startswith("vae"):
        title += f", k={meta.get('k')}"
    if meta.get("quantity"):
        title += f", {meta['quantity']}"
    return title + f"  (E_min = {e_min:.2f} nats)"


def _widened(relative: np.ndarray, span: float) -> float:
    """`span`, or the median of the map rounded up to 1, 2 or 5 x 10^n when that is higher."""
    median = float(np.median(relative)) if relative.size else 0.0
    if median <= span:
        return span
    scale = 10.0 ** np.floor(np.log10(median))
    return float(next(m * scale for m in (1, 2, 5, 10) if m * scale >= median))


def _heat_map(ax, x, y, relative, span, xlabel, ylabel):
    """Heat map of `relative` (ij indexing: first index along x) clipped at `span`, with contours
    every span/6; +inf cells are left out and show the hatched background."""
    ax.set_facecolor("white")
    ax.patch.set_hatch(HATCH)
    ax.patch.set_edgecolor("0.6")
    shown = np.minimum(np.ma.masked_invalid(relative), span)
    mesh = ax.pcolormesh(x, y, shown.T, shading="nearest", cmap="viridis", vmin=0.0, vmax=span)
    if np.ma.count(shown) > 3 and np.ptp(shown.compressed()) > 0:
        ax.contour(x, y, shown.T, levels=np.linspace(0.0, span, 7)[1:-1], colors="white",
                   linewidths=0.5, alpha=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return mesh


def _overlays(ax, energy_map, x, y, values, support, minima, pair):
    """Low-support outline (learned maps), minima, and a legend naming what is drawn."""
    handles = []
    if np.isposinf(values).any():
        reason = "empty bin" if energy_map.is_histogram else "outside the model's support"
        handles.append(Patch(facecolor="white", edgecolor="0.6", hatch=HATCH, label=f"E = +inf ({reason})"))
    if support is not None and not energy_map.is_histogram:
        thin = np.where(np.asarray(support, dtype=np.float64) < MIN_SUPPORT, 1.0, 0.0)
        if 0 < thin.sum() < thin.size:
            ax.contour(x, y, thin.T, levels=[0.5], colors="red", linewidths=1.0, linestyles="--")
            ax.contourf(x, y, thin.T, levels=[0.5, 1.5], colors="none", hatches=[".."])
        if thin.any():
            handles.append(Patch(facecolor="none", edgecolor="red", linestyle="--", hatch="..",
                                 label=f"extrapolated (< {MIN_SUPPORT:g} training state per bin)"))
    for i, m in enumerate(minima):
        ax.plot(m.point[pair[0]], m.point[pair[1]], "w*" if i == 0 else "wx",
                markersize=12 if i == 0 else 8, markeredgecolor="k")
    handles += _minima_handles(minima, "w")
    if handles:  # below the axes: the landscape stays unobstructed
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=7,
                  frameon=False)


def _minima_handles(minima, colour):
    handles = []
    if minima:
        handles.append(Line2D([], [], color=colour, marker="*", markeredgecolor="k", markersize=10,
                              linestyle="none", label="global minimum"))
    if len(minima) > 1:
        handles.append(Line2D([], [], color=colour, marker="x", markeredgecolor="k", markersize=7,
                              linestyle="none", label="local minima"))
    return handles


def _std_panel(fig, ax, x, y, std, xlabel, ylabel):
    """The uncertainty of E (nats) on the same axes; colour scale from 0 to its 99th percentile."""
    finite = np.isfinite(std)
    top = float(np.quantile(std[finite], 0.99)) if finite.any() else 1.0
    mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(std).T, shading="nearest", cmap="magma",
                         vmin=0.0, vmax=max(top, 1e-3))
    ax.set_facecolor("0.85")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("uncertainty of E", fontsize=9)
    fig.colorbar(mesh, ax=ax, label="std of E (nats)", extend="max")


def _line(ax, energy_map, relative, e_min, span, xlabel, ylabel, minima):
    x = energy_map.axes[0]
    ax.plot(x, np.minimum(relative, span), color="tab:blue")
    if energy_map.energy_std is not None:
        std = energy_map.energy_std.astype(np.float64)
        ax.fill_between(x, np.minimum(relative - std, span), np.minimum(relative + std, span),
                        color="tab:blue", alpha=0.25, label="+/- std of E")
    handles = []
    infinite = np.isposinf(relative)
    if infinite.any():
        step = np.diff(x).min()
        for xi in x[infinite]:
            ax.axvspan(xi - step / 2, xi + step / 2, facecolor="white", edgecolor="0.6", hatch=HATCH, lw=0)
        reason = "empty bin" if energy_map.is_histogram else "outside the model's support"
        handles.append(Patch(facecolor="white", edgecolor="0.6", hatch=HATCH, label=f"E = +inf ({reason})"))
    for i, m in enumerate(minima):
        ax.plot(m.point[0], m.energy - e_min, "k*" if i == 0 else "kx", markersize=10 if i == 0 else 7)
    handles += _minima_handles(minima, "k")
    if handles:
        ax.legend(handles=handles, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.025 * span, 1.025 * span)


def _marked_minima(energy_map: EnergyMap, e_min: float, span: float):
    """The deepest local minima below the span, over a window of ~1/16 of the grid (ignores noise)."""
    radius = max(1, min(energy_map.energy_map.shape) // 16)
    minima = [m for m in energy_map.minima(radius=radius) if m.energy - e_min < span]
    return minima[:MAX_MARKED_MINIMA]
