"""A small hand-made landscape for the query tests: no crawl, no training, a few seconds.

Three capsules, as `ebm-vae-build` would catalogue them:
- `toy`: a 2-D vector state (x [m], y [s]) with an (untrained) checkpoint and a map on x, y;
- `counts`: a 2-D vector state (a [K], b [Pa]) with a histogram map whose axes are (b, a), no checkpoint;
- `patch`: a 1 x 4 x 4 field with a checkpoint and a marginal map on pc1, pc2 (origin 300 K).
Map values are closed-form Gaussians, so interpolated energies can be checked exactly.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.landscape import LandscapeEntry, write_catalogue
from ebm_vae.energy.mapfile import EnergyMap
from ebm_vae.model.vae import VAE

TOY = StateInfo(kind="vector", shape=(2,), names=("x", "y"), units=("m", "s"))
COUNTS = StateInfo(kind="vector", shape=(2,), names=("a", "b"), units=("K", "Pa"))
PATCH = StateInfo.field(["T"], ["K"], (4, 4))


def gaussian_energy(points: np.ndarray) -> np.ndarray:
    """E = sum(p^2) / 2 + log(2 pi): the standard 2-D normal, in nats."""
    return 0.5 * np.sum(np.square(points), axis=-1) + np.log(2 * np.pi)


def _checkpoint(path: Path, name: str, state: StateInfo, pca: dict | None = None) -> Path:
    torch.manual_seed(0)
    vae = VAE(state.to_dict(), capsule={"name": name}, stats_meta={"count": 1, "files": []},
              hidden=8, n_layers=1, latent_dim=2, channels=4)
    rng = np.random.default_rng(1)
    vae.set_normalization(SimpleNamespace(mean=rng.normal(size=state.dim), std=np.ones(state.dim), pca=pca))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(vae.hparams), "state_dict": vae.state_dict(), "global_step": 0}, path)
    return path


def _map(path: Path, name: str, state: StateInfo, axes: list[tuple[str, str]], method: str,
         pcs: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    values = np.linspace(-3.0, 3.0, 13)
    grid = np.stack(np.meshgrid(values, values, indexing="ij"), axis=-1)
    meta = {"capsule": name, "method": method, "quantity": "marginal",
            "axes": [{"name": a, "unit": u, "limits": [-3.0, 3.0], "points": 13} for a, u in axes]}
    pc_vectors, pc_origin = pcs if pcs is not None else (None, None)
    return EnergyMap(gaussian_energy(grid), [values, values], meta, pc_vectors=pc_vectors,
                     pc_origin=pc_origin).save(path)


def _entry(name: str, state: StateInfo, axes, method: str, checkpoint: str | None) -> LandscapeEntry:
    return LandscapeEntry(
        capsule=name, method=method, quantity="marginal", map=f"energy_maps/{name}.npz",
        axes=[{"name": a, "unit": u, "limits": [-3.0, 3.0], "points": 13} for a, u in axes],
        state=state.to_dict(), data={"files": 1, "bytes": 10, "samples": 100}, created="2024-01-01T00:00:00+00:00",
        command=f"ebm-vae-export capsule={name}", checkpoint=checkpoint)


def make_landscape(root: Path) -> Path:
    """Write the landscape under `root` (its paths.root); returns root / "energy_maps"."""
    maps = root / "energy_maps"
    capsules = {
        "toy": (TOY, [("x", "m"), ("y", "s")], "vae-iwae", True),
        "counts": (COUNTS, [("b", "Pa"), ("a", "K")], "histogram", False),
        "patch": (PATCH, [("pc1", "K"), ("pc2", "K")], "vae-iwae", True),
    }
    entries = {}
    basis = np.linalg.qr(np.random.default_rng(2).normal(size=(PATCH.dim, 2)))[0].T
    for name, (state, axes, method, has_model) in capsules.items():
        pcs = (basis, np.full(PATCH.dim, 300.0)) if state.kind == "field" else None
        _map(maps / f"{name}.npz", name, state, axes, method, pcs)
        ckpt = None
        if has_model:
            pca = {"components": basis, "std": np.array([2.0, 1.0])} if state.kind == "field" else None
            ckpt = _checkpoint(root / "checkpoints" / name / "last.ckpt", name, state, pca).relative_to(root).as_posix()
        entries[name] = _entry(name, state, axes, method, ckpt)
    write_catalogue(maps, root, entries)
    return maps
