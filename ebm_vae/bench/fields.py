"""Field states of known density, the linear baselines, and `python scripts/bench.py fields`.

The density: a Gaussian mixture on a low-dimensional subspace of smooth field modes plus
small isotropic noise, x = mu + B a + n with B (D x r) orthonormal, a ~ sum_k w_k N(m_k, S_k)
and n ~ N(0, s^2 I). Since B is orthonormal, n splits into B^T n ~ N(0, s^2 I_r) and a
residual e in the complement, so log p(x) is exact in closed form:

    log p(x) = log sum_k w_k N(B^T c; m_k, S_k + s^2 I) - (D - r)/2 log(2 pi s^2) - |e|^2 / (2 s^2),

with c = x - mu and e = c - B B^T c (`SubspaceMixtureField`). The mixture is scaled so that
its negentropy (its KL divergence from the Gaussian of the same moments) is `negentropy`
nats: that is the floor of probabilistic PCA at the subspace's rank, and a full-covariance
Gaussian adds its own estimation error of ~D^2 / (4 N) nats on top.

Two cases write it in the layouts the extractors read (`CASES`): "fusion" (the Well's HDF5,
B on the plane z = 0 of a 3-D volume of 3 planes, 3 x 16 x 16) and "wafer" (NetCDF, layer 0
of a 2-layer temperature stack, 1 x 24 x 32). The other planes and layers hold fields of
another density, so reading the wrong one is detectable. `run_case` goes through the real
crawl -> train -> `EnergyModel` path and scores the checkpoint against the truth, beside
PPCA and one Gaussian fitted to the same samples.

    python scripts/bench.py fields [--json] [--quick] [--workdir DIR] [--before CHECKOUT]

`--before CHECKOUT` also trains and scores an earlier checkout of the project (its own CLI and
presets, the same files and steps), e.g. a worktree of commit f7f88ac (the conv VAE on z-scored
maps) outside the repository: the table's "before" column.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebm_vae import demo
from ebm_vae.bench.densities import Density, GaussianMixture, random_rotation

LOG_2PI = float(np.log(2.0 * np.pi))


def smooth_modes(shape: tuple[int, ...], rank: int, rng: np.random.Generator,
                 max_wavenumber: int = 3) -> np.ndarray:
    """(D, rank) orthonormal columns: random sums of low Fourier modes on the (H, W) grid per channel.

    Amplitudes fall off as 1 / (1 + |k|^2), so the modes are smooth fields like the large
    scales of a turbulent B field or of a heated wafer.
    """
    channels, height, width = shape
    yy, xx = np.meshgrid(np.arange(height) / height, np.arange(width) / width, indexing="ij")
    ks = [(ky, kx) for ky in range(max_wavenumber + 1) for kx in range(-max_wavenumber, max_wavenumber + 1)
          if (ky, kx) != (0, 0) and (ky > 0 or kx > 0)]
    fields = np.zeros((rank, channels, height, width))
    for i in range(rank):
        for c in range(channels):
            for ky, kx in ks:
                weight = rng.normal() / (1.0 + ky * ky + kx * kx)
                fields[i, c] += weight * np.cos(2 * np.pi * (ky * yy + kx * xx) + rng.uniform(0, 2 * np.pi))
    q, r = np.linalg.qr(fields.reshape(rank, -1).T)
    return q * np.sign(np.diag(r))


def mixture_with_negentropy(rank: int, n_components: int, negentropy: float, rng: np.random.Generator,
                            samples: int = 50_000) -> GaussianMixture:
    """A mixture in `rank` dimensions whose means are spread (by bisection) until its negentropy,
    estimated on `samples` draws, is `negentropy` nats. Widths 0.3 to 1, weights 0.5 to 1.5."""
    directions = rng.normal(size=(n_components, rank))
    rotations = np.stack([random_rotation(rank, rng) for _ in range(n_components)])
    scales = rng.uniform(0.3, 1.0, size=(n_components, rank))
    weights = rng.uniform(0.5, 1.5, size=n_components)
    draw_seed = int(rng.integers(2**32))  # the same draws at every spread: a smooth bisection

    def mixture(spread: float) -> GaussianMixture:
        return GaussianMixture(weights, spread * directions, rotations, scales)

    def measured(spread: float) -> float:
        m = mixture(spread)
        x = m.sample(samples, np.random.default_rng(draw_seed))
        return gaussian_entropy(np.cov(x.T, bias=True)) + float(np.mean(m.log_prob(x)))

    low, high = 0.0, 1.0
    while measured(high) < negentropy:
        low, high = high, 2 * high
    for _ in range(20):  # the spread to 1e-6 of its bracket
        middle = 0.5 * (low + high)
        low, high = (middle, high) if measured(middle) < negentropy else (low, middle)
    return mixture(0.5 * (low + high))


def gaussian_entropy(cov: np.ndarray) -> float:
    return 0.5 * (len(cov) * (LOG_2PI + 1.0) + float(np.linalg.slogdet(cov)[1]))


class SubspaceMixtureField(Density):
    """x = mean + basis a + n: a mixture on the span of `basis` (D x r), isotropic noise `noise`.

    `coefficients` is the mixture of a (physical units) without the noise.
    """

    name = "subspace_mixture"

    def __init__(self, mean: np.ndarray, basis: np.ndarray, coefficients: GaussianMixture, noise: float):
        self.mean, self.basis, self.noise = np.asarray(mean, np.float64), np.asarray(basis, np.float64), noise
        self.dim, self.rank = self.basis.shape
        self.coefficients = coefficients
        # the coefficients of x: the mixture convolved with the noise's share, N(0, s^2 I_r)
        self.observed = GaussianMixture(coefficients.weights, coefficients.means, coefficients.rotations,
                                        np.sqrt(coefficients.scales**2 + noise**2))

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coefficients (n, r), squared residual norm (n,)) of states x (n, D)."""
        centred = np.asarray(x, dtype=np.float64) - self.mean
        a = centred @ self.basis
        return a, np.sum(np.square(centred - a @ self.basis.T), axis=1)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        a, residual = self.split(x)
        residual_dims = self.dim - self.rank
        return (self.observed.log_prob(a) - 0.5 * residual_dims * (LOG_2PI + 2 * np.log(self.noise))
                - 0.5 * residual / self.noise**2)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        a = self.coefficients.sample(n, rng)
        return self.mean + a @ self.basis.T + self.noise * rng.standard_normal((n, self.dim))

    @property
    def mode(self) -> np.ndarray:
        return self.mean + self.observed.mode @ self.basis.T


@dataclass(frozen=True)
class FieldCase:
    """A synthetic field capsule: its density's design and how its files are laid out."""

    capsule: str  # fusion | wafer: the built-in capsule that reads the files
    shape: tuple[int, int, int]  # (C, H, W) of the state
    rank: int  # of the subspace
    n_components: int  # of the mixture
    amplitude: float  # physical units per unit of the mixture's coefficients
    noise: float  # isotropic noise std, physical units
    negentropy: float  # of the mixture, nats: PPCA's floor
    n_snapshots: int = 30_000
    n_files: int = 4
    steps: int = 5000  # training steps (a fixed number, not a time: figures must not depend on load)
    seed: int = 0


CASES = {
    "fusion": FieldCase("fusion", (3, 16, 16), rank=6, n_components=4, amplitude=0.1, noise=2e-3,
                        negentropy=0.7),
    "wafer": FieldCase("wafer", (1, 24, 32), rank=6, n_components=4, amplitude=5.0, noise=0.05,
                       negentropy=0.7, seed=1),
}


def mean_field(case: FieldCase, rng: np.random.Generator, other: bool = False) -> np.ndarray:
    """The mean state: a guide field Bz ~ 2 T with a weak pattern, or a ~350 K wafer with a warm
    centre; `other` gives the mean of the other planes / layers (a weaker guide field, a
    hotter layer below the surface)."""
    channels, height, width = case.shape
    pattern = smooth_modes(case.shape, 1, rng)[:, 0].reshape(case.shape)
    pattern *= np.sqrt(pattern.size)  # unit rms
    if case.capsule == "fusion":
        mean = 0.02 * pattern
        mean[2] += 1.8 if other else 2.0
        return mean.reshape(-1)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    centre = 20.0 * np.exp(-(yy**2 + xx**2))
    return ((380.0 if other else 350.0) + centre + 2.0 * pattern).reshape(-1)


def case_density(case: FieldCase, other: bool = False) -> SubspaceMixtureField:
    """The density of the capsule's states; `other`: that of the planes / layers it must not read."""
    rng = np.random.default_rng([case.seed, int(other), 7])
    mixture = mixture_with_negentropy(case.rank, case.n_components, case.negentropy, rng)
    physical = GaussianMixture(mixture.weights, case.amplitude * mixture.means, mixture.rotations,
                               case.amplitude * mixture.scales)
    return SubspaceMixtureField(mean_field(case, rng, other), smooth_modes(case.shape, case.rank, rng),
                                physical, case.noise)


def write_case(case: FieldCase, root: Path, density: SubspaceMixtureField | None = None,
               other: SubspaceMixtureField | None = None) -> np.ndarray:
    """Write `case.n_snapshots` states of the case's density into `case.n_files` files under
    `root`; returns the states as the extractor reads them, (n, D) float32."""
    density = density or case_density(case)
    other = other or case_density(case, other=True)
    rng = np.random.default_rng([case.seed, 11])
    written = []
    for i, n in enumerate(demo._split(case.n_snapshots, -(-case.n_snapshots // case.n_files))):
        states = density.sample(n, rng).astype(np.float32)
        written.append(states)
        fields = states.reshape(n, *case.shape)
        if case.capsule == "fusion":  # (traj, time, x, y, z, 3), two trajectories a file
            below, above = (other.sample(n, rng).astype(np.float32).reshape(n, *case.shape) for _ in range(2))
            volume = np.stack([below, fields, above], axis=-1)  # (n, 3, x, y, z)
            trajectories = 2 if n % 2 == 0 else 1
            volume = np.moveaxis(volume, 1, -1).reshape(trajectories, n // trajectories, *case.shape[1:], 3, 3)
            demo.write_fusion_states(root / f"MHD_synthetic_{i:02d}.h5", volume, z=np.array([-0.5, 0.0, 0.5]))
        else:  # temperature (time, layer, y, x): layer 0 the surface
            layer1 = other.sample(n, rng).astype(np.float32).reshape(n, *case.shape[1:])
            demo.write_wafer_states(root / f"wafer_synthetic_{i:02d}.nc", np.stack([fields[:, 0], layer1], axis=1))
    return np.concatenate(written)


def wrong_plane_states(case: FieldCase, root: Path, n: int = 64) -> np.ndarray:
    """(n, D) states of the first file from the plane z = 0.5 (fusion) or layer 1 (wafer)."""
    if case.capsule == "fusion":
        import h5py

        with h5py.File(root / "MHD_synthetic_00.h5", "r") as f:
            block = f["t1_fields/magnetic_field"][0, :n, :, :, 2, :]  # (n, x, y, 3)
        return np.moveaxis(block, -1, 1).reshape(len(block), -1)
    import netCDF4

    with netCDF4.Dataset(root / "wafer_synthetic_00.nc") as ds:
        return np.asarray(ds["temperature"][:n, 1], dtype=np.float32).reshape(n, -1)


# --------------------------------------------------------------------------- linear baselines


def ppca_log_prob(train: np.ndarray, rank: int):
    """Probabilistic PCA of `rank` fitted by maximum likelihood (Tipping & Bishop) to `train`;
    returns x (n, D) -> log p (n,). Independent of the model's code (numpy, float64)."""
    x = np.asarray(train, dtype=np.float64)
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x.T, bias=True))
    values, vectors = values[::-1], vectors[:, ::-1]
    dim = len(mean)
    lam, basis = values[:rank], vectors[:, :rank]
    s2 = values[rank:].sum() / (dim - rank)

    def log_prob(points: np.ndarray) -> np.ndarray:
        centred = np.asarray(points, dtype=np.float64) - mean
        a = centred @ basis
        residual = np.sum(centred**2, axis=1) - np.sum(a**2, axis=1)
        return -0.5 * (dim * LOG_2PI + np.log(lam).sum() + (dim - rank) * np.log(s2)
                       + np.sum(a**2 / lam, axis=1) + residual / s2)

    return log_prob


def gaussian_log_prob(train: np.ndarray):
    """One full-covariance Gaussian fitted by maximum likelihood; x (n, D) -> log p (n,)."""
    x = np.asarray(train, dtype=np.float64)
    mean = x.mean(axis=0)
    chol = np.linalg.cholesky(np.cov(x.T, bias=True))
    log_det = 2.0 * np.log(np.diag(chol)).sum()

    def log_prob(points: np.ndarray) -> np.ndarray:
        white = np.linalg.solve(chol, (np.asarray(points, dtype=np.float64) - mean).T)
        return -0.5 * (len(mean) * LOG_2PI + log_det + np.sum(white**2, axis=0))

    return log_prob


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (no ties expected in continuous energies)."""
    ranks = [np.argsort(np.argsort(v)).astype(np.float64) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


# --------------------------------------------------------------------------- the pipeline


def train_overrides(case: FieldCase, root: Path, out: Path) -> list[str]:
    """The `ebm-vae-train` overrides of a case: its capsule's preset, `case.steps` steps and no
    time limit, outputs under `out`."""
    return [f"capsule={case.capsule}", f"data.root={root}", f"paths.root={out}",
            f"trainer.max_steps={case.steps}", "trainer.max_time=null",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "crawl.progress=false", "crawl.workers=1"]


# Train and score with another checkout of the project (its own CLI and presets), in a
# subprocess whose PYTHONPATH points at that checkout: the "before" column of the table.
BEFORE_SCRIPT = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from ebm_vae.config import compose
from ebm_vae.energy.model import EnergyModel
from ebm_vae.train import train
root, out, capsule, steps, held, result = sys.argv[1:7]
wall, cpu = time.perf_counter(), time.process_time()
metrics = train(compose("train", [f"capsule={capsule}", f"data.root={root}", f"paths.root={out}",
                                  f"trainer.max_steps={steps}", "trainer.max_time=null",
                                  "trainer.enable_progress_bar=false", "crawl.progress=false",
                                  "crawl.workers=1"]))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
model = EnergyModel.from_checkpoint(f"{out}/checkpoints/{capsule}/last.ckpt", device="cpu")
np.save(result + ".npy", model.energy(np.load(held), k=64))
with open(result, "w") as fh:
    json.dump({"train_s": wall, "train_cpu_s": cpu, **{k: float(v) for k, v in metrics.items()}}, fh)
"""


def run_before(case: FieldCase, checkout: Path, root: Path, workdir: Path, held: np.ndarray,
               true_held: np.ndarray) -> dict[str, Any]:
    """KL gap, rank correlation and training time of `checkout`'s model on the case's files."""
    import os
    import subprocess

    np.save(workdir / "held.npy", held)
    result = workdir / f"{case.capsule}_before.json"
    env = dict(os.environ, PYTHONPATH=str(Path(checkout).resolve()), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", BEFORE_SCRIPT, str(root), str(workdir / f"{case.capsule}_before"),
                    case.capsule, str(case.steps), str(workdir / "held.npy"), str(result)],
                   env=env, cwd=workdir, check=True, capture_output=True)
    energy = np.load(f"{result}.npy")
    figures = json.loads(result.read_text())
    return {"kl_gap_nats": float(np.mean(energy - true_held)), "spearman": spearman(energy, true_held),
            "train_s": figures["train_s"], "train_cpu_s": figures["train_cpu_s"],
            "val_iwae": figures.get("val/iwae"), "train_loss": figures.get("train/loss")}


def run_case(case: FieldCase, workdir: Path, n_eval: int = 5000, k: int = 64,
             extra_overrides: list[str] | None = None, before: Path | None = None) -> dict[str, Any]:
    """Write, crawl, train and score one case; every figure of the `fields` table for it.

    `before`: a checkout of an earlier version, scored the same way on the same files."""
    from ebm_vae.config import compose
    from ebm_vae.energy.model import EnergyModel
    from ebm_vae.train import train

    root, out = workdir / f"{case.capsule}_data", workdir / f"{case.capsule}_out"
    density = case_density(case)
    start = time.perf_counter()
    states = write_case(case, root, density)
    write_s = time.perf_counter() - start
    held = density.sample(n_eval, np.random.default_rng([case.seed, 13])).astype(np.float32)
    true_held = -density.log_prob(held)

    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = train(compose("train", train_overrides(case, root, out) + list(extra_overrides or [])))
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    model = EnergyModel.from_checkpoint(out / "checkpoints" / case.capsule / "last.ckpt", device="cpu")
    start = time.perf_counter()
    model_held = model.energy(held, k=k)
    energy_s = time.perf_counter() - start
    seen = states[np.random.default_rng(3).choice(len(states), n_eval, replace=False)]
    true_seen = -density.log_prob(seen)
    wrong = model.energy(wrong_plane_states(case, root), k=k)

    ppca, gauss = ppca_log_prob(states, case.rank), gaussian_log_prob(states)
    gap = float(np.mean(model_held - true_held))
    ppca_gap = float(np.mean(-ppca(held) - true_held))
    stats = json.loads((out / "index" / case.capsule / "stats.json").read_text())
    return {
        "state_shape": list(case.shape), "dim": int(np.prod(case.shape)), "subspace_rank": case.rank,
        "snapshots": case.n_snapshots, "held_out": n_eval, "k": k,
        "model_rank": int(stats["pca"]["rank"]),
        "kl_gap_nats": gap,
        "kl_gap_stderr_nats": float(np.std(model_held - true_held) / np.sqrt(n_eval)),
        "ppca_kl_gap_nats": ppca_gap,
        "gaussian_kl_gap_nats": float(np.mean(-gauss(held) - true_held)),
        "negentropy_nats": case.negentropy,
        "spearman": spearman(model_held, true_held),
        # memorisation: the same gaps on training states; a model fitted to them scores better
        # there by its estimation error (PPCA's difference is that of the shared basis alone)
        "train_kl_gap_nats": float(np.mean(model.energy(seen, k=k) - true_seen)),
        "ppca_train_kl_gap_nats": float(np.mean(-ppca(seen) - true_seen)),
        "val_iwae": metrics.get("val/iwae"), "val_elbo": metrics.get("val/elbo"),
        "train_loss": metrics.get("train/loss"),
        "wrong_plane_min_energy_above_max": float(wrong.min() - model_held.max()),
        "steps": int(torch.load(out / "checkpoints" / case.capsule / "last.ckpt",
                                weights_only=True)["global_step"]),
        "write_s": write_s, "train_s": train_s, "train_cpu_s": train_cpu_s,
        "energy_s_per_1000": 1000 * energy_s / n_eval,
        "ratio": ppca_gap / max(gap, 1e-9),  # PPCA's gap over ours: > 1 where we beat it
        **({"before": run_before(case, before, root, workdir, held, true_held)} if before else {}),
    }


def run(args: Any) -> dict[str, Any]:
    """The `fields` section: each case's KL gaps (ours, PPCA, one Gaussian), ranks, times."""
    logging.getLogger("lightning").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name, case in CASES.items():
            if args.quick:  # smoke run: small, fast, not the figures of record
                case = replace(case, n_snapshots=4000, steps=300)
            results[name] = run_case(case, Path(tmp), before=getattr(args, "before", None))
            print(f"fields {name}: KL gap {results[name]['kl_gap_nats']:.3f} nats (PPCA "
                  f"{results[name]['ppca_kl_gap_nats']:.3f}, Gaussian {results[name]['gaussian_kl_gap_nats']:.3f}), "
                  f"train {results[name]['train_s']:.0f} s", file=sys.stderr, flush=True)
    return results

