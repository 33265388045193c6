"""TensorBoard figures that tell at a glance whether a run converged.

At every validation: the energy on a slice through the mean (the same plane the export draws
by default: the first two components of a vector state, pc1 and pc2 of a field), with labelled
axes in physical units, a colour bar in nats and a second panel with the uncertainty of each
energy; for field states, a few validation states beside their reconstructions. A converged run
shows a stable landscape whose uncertainty is small where the data are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SLICE_LIMIT = 4.0  # the slice spans mean +/- 4 std along each axis
SLICE_SPAN_NATS = 12.0  # colour range above the slice's lowest energy


def slice_plane(vae) -> tuple[torch.Tensor, list[str]] | None:
    """Two directions (2, D) in physical units spanning the logged slice, one std each, and
    their axis labels; None for one-component states."""
    info = vae.state_info
    if vae.pca_components.shape[0] >= 2:
        unit = info.channel_units[0] if info.channel_units else ""
        labels = [f"pc{i + 1} coefficient ({unit})" if unit else f"pc{i + 1} coefficient" for i in range(2)]
        return vae.pca_std[:2, None] * vae.pca_components[:2], labels
    if info.dim < 2:
        return None
    labels = [f"{name} ({unit})" if unit else name for name, unit in zip(info.names[:2], info.units[:2], strict=True)]
    return torch.eye(2, info.dim, device=vae.norm_std.device) * vae.norm_std, labels


@torch.no_grad()
def energy_slice_figure(vae):
    """A matplotlib figure: E (nats) and its uncertainty on the slice, or None."""
    from ebm_vae.energy.evaluate import estimate_energy

    found = slice_plane(vae)
    if found is None:
        return None
    plane, labels = found
    field = vae.state_info.kind == "field"
    resolution = 32 if field else 64
    ticks = torch.linspace(-SLICE_LIMIT, SLICE_LIMIT, resolution, device=plane.device)
    a, b = torch.meshgrid(ticks, ticks, indexing="ij")
    points = vae.norm_mean + a.reshape(-1, 1) * plane[0] + b.reshape(-1, 1) * plane[1]
    points = points.cpu().numpy()
    # k = 8 smooths the cheap vector slices; a field slice decodes 1024 full maps per draw
    estimate = estimate_energy(vae, lambda start, stop: points[start:stop], len(points), k=1 if field else 8,
                               device=vae.norm_mean.device, progress=False, max_k=None)
    scale = plane.norm(dim=1).cpu().numpy()
    extent = [t * s for s in scale for t in (-SLICE_LIMIT, SLICE_LIMIT)]
    if not field:
        centre = vae.norm_mean[:2].cpu().numpy()
        extent = [extent[0] + centre[0], extent[1] + centre[0], extent[2] + centre[1], extent[3] + centre[1]]
    return _two_panels(estimate.energy.reshape(resolution, resolution),
                       estimate.std.reshape(resolution, resolution), extent, labels,
                       f"step {vae.global_step}: energy on the slice through the mean")


def _two_panels(energy: np.ndarray, std: np.ndarray, extent: list[float], labels: list[str], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    finite = np.isfinite(energy)
    low = float(energy[finite].min()) if finite.any() else 0.0
    shown = np.where(finite, energy, np.nan).T  # rows: second axis
    image = left.imshow(shown, origin="lower", extent=extent, aspect="auto", cmap="viridis",
                        vmin=low, vmax=low + SLICE_SPAN_NATS)
    fig.colorbar(image, ax=left, label="E = -log p (nats)")
    left.set_title(f"energy (min {low:.2f} nats)", fontsize=9)
    spread = right.imshow(std.T, origin="lower", extent=extent, aspect="auto", cmap="magma",
                          vmin=0.0, vmax=max(float(np.nanquantile(std, 0.95)), 1e-3))
    fig.colorbar(spread, ax=right, label="uncertainty of E (nats)")
    right.set_title(f"uncertainty (median {float(np.nanmedian(std)):.3f} nats)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
    fig.suptitle(title, fontsize=10)
    return fig


@torch.no_grad()
def reconstruction_image(vae, x_phys: torch.Tensor) -> np.ndarray:
    """(1, H', W') grey image: each row a validation field's channels, then their reconstruction
    through the first evaluated member's mean (z-scored, -3..3 to black..white)."""
    u, _ = vae.transformed(x_phys)
    recon_u, _ = vae.decode(vae.encode(u)[0])  # every member; the first one is shown
    recon = vae.transform.inverse(recon_u[0], draw=False)  # the coefficients alone, no residual draw
    shape = (len(x_phys), *vae.state_info.shape)

    def z(x):
        return ((x.reshape(len(x), -1) - vae.norm_mean) / vae.norm_std).reshape(shape)

    rows = [torch.cat([*xi, *ri], dim=-1) for xi, ri in zip(z(x_phys.float()), z(recon), strict=True)]
    return ((torch.cat(rows, dim=-2) + 3.0) / 6.0).clamp(0, 1).unsqueeze(0).cpu().numpy()


def log_figures(vae, logger: Any) -> None:
    """The energy-slice figure (and reconstructions of field states) to a TensorBoard logger."""
    writer = getattr(logger, "experiment", None)
    if not hasattr(writer, "add_figure"):
        return
    figure = energy_slice_figure(vae)
    if figure is not None:
        writer.add_figure("val/energy_slice", figure, vae.global_step, close=True)
    examples = vae.val_examples
    if vae.state_info.kind == "field" and examples is not None:
        writer.add_image("val/reconstructions", reconstruction_image(vae, examples), vae.global_step,
                         dataformats="CHW")
