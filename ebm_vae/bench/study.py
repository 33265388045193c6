"""Where counting breaks: exact histograms against the VAE on densities known in closed form.

`python scripts/bench.py study [--json] [--quick] [--workdir DIR]`

For each density family (`ebm_vae.bench.densities`), dimension D and sample count N, both
methods see the same N exact samples and are scored against the true energy
E(x) = -log p(x), in absolute nats, over the states within `REGION_NATS` of the lowest
energy (the well-sampled region; far tails are unknowable to either method):

- at held-out samples of the same density (fresh states, as a new measurement would be);
- on a 2-D slice through the mode along the first two state axes (a map as exported).

The histogram is the exact count on a regular D-dimensional grid, bins per axis by Scott's
normal-reference rule for D-dimensional histograms, h = 3.49 sigma N^(-1/(D+2)) (the rule that
minimises the asymptotic integrated squared error of a D-dimensional histogram, so the
strongest regular grid for its N), with E = -log(count / (N * bin volume)); an empty bin has
no finite energy, and MAE is taken over the states that have one, the empty fraction beside
it. The per-axis Freedman-Diaconis rule (h = 2 IQR N^(-1/3), what 1-D habit gives) is also
counted, to show the other way a grid fails: fine bins, mostly empty, huge. Counts are kept
sparse (np.unique on flat bin indices); the dense grid's memory, bins^D x 8 bytes, is
reported, not allocated.

The VAE is the project's own `VAE` class with its default settings (an ensemble with flow
priors whose width follows N and D), trained by a Lightning `Trainer` on in-memory batches
of the samples for the same fixed number of steps in every case (the budget does not grow
with N or D), then evaluated with the export's `evaluate_energy` (IWAE bound, k = 64, adaptive
where unsure) in physical units. Its IWAE energy is, in expectation, an upper bound on the
true energy, so its error includes the bound's gap (`vae_bias_nats` is the mean signed error).

Output: the cases as JSON (keyed `<density>_D<D>_N<N>`, plus `summary` with the crossover
dimension and the histogram-to-VAE error ratio at D = 6 and 8), a markdown table printed and
written to `study.md`, and the plot `study.png`, both under `--workdir` (default `docs/`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch

from ebm_vae.bench.densities import DENSITIES, Density, make_density
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.evaluate import evaluate_energy
from ebm_vae.io import atomic_path, atomic_write_text
from ebm_vae.model.vae import VAE

REGION_NATS = 6.0  # states scored: E_true <= E_min + REGION_NATS
MAX_BINS_PER_AXIS = 256
FLAT_INDEX_BITS = 62  # flat bin indices are int64: bins^D stays below 2^62


@dataclass(frozen=True)
class StudyPlan:
    """The cases and the fixed budgets of one study run.

    The VAE is the project's default model (`conf/model/auto.yaml`: its width follows N and D,
    its learning rate warms up and decays over `steps`); `model` overrides its arguments.
    """

    densities: tuple[str, ...] = ("boltzmann", "mixture")
    dims: tuple[int, ...] = (2, 3, 4, 6, 8)
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    steps: int = 2000  # VAE optimiser steps, the same in every case
    batch_size: int = 512
    model: tuple[tuple[str, Any], ...] = ()  # VAE constructor overrides, e.g. (("members", 1),)
    k: int = 64  # importance samples of the evaluated bound
    n_eval: int = 4000  # held-out samples drawn; those inside the region are scored
    slice_resolution: int = 48
    seed: int = 0


QUICK_PLAN = StudyPlan(dims=(2, 6), sizes=(100_000,))


# -- the exact histogram --------------------------------------------------------------------

def scott_bin_width(x: np.ndarray) -> np.ndarray:
    """Scott's D-dimensional normal-reference rule: h_i = 3.49 sigma_i N^(-1/(D+2))."""
    n, dim = x.shape
    return 3.49 * x.std(axis=0) * n ** (-1.0 / (dim + 2))


def freedman_diaconis_bin_width(x: np.ndarray) -> np.ndarray:
    """The 1-D Freedman-Diaconis rule applied per axis: h_i = 2 IQR_i N^(-1/3)."""
    q75, q25 = np.percentile(x, [75, 25], axis=0)
    return 2.0 * (q75 - q25) * len(x) ** (-1.0 / 3.0)


BIN_RULES = {"scott": scott_bin_width, "fd": freedman_diaconis_bin_width}


@dataclass
class SparseHistogram:
    """Counts on a regular D-dimensional grid over the samples' bounding box, non-empty bins only."""

    lower: np.ndarray  # (D,) lower edge of the grid
    upper: np.ndarray  # (D,) upper edge (inclusive: it belongs to the last bin)
    bins: np.ndarray  # (D,) bins per axis
    keys: np.ndarray  # sorted flat indices of the non-empty bins
    counts: np.ndarray  # their counts
    n_samples: int
    capped: bool = False  # the rule asked for more bins than the cap on some axis

    @classmethod
    def fit(cls, x: np.ndarray, rule: str = "scott") -> SparseHistogram:
        """Bins per axis by `rule` (see BIN_RULES), at most MAX_BINS_PER_AXIS and 2^62 in all."""
        dim = x.shape[1]
        lower, upper = x.min(axis=0), x.max(axis=0)
        cap = min(MAX_BINS_PER_AXIS, int(2 ** (FLAT_INDEX_BITS / dim)))
        wanted = np.ceil((upper - lower) / BIN_RULES[rule](x))
        bins = np.clip(wanted, 1, cap).astype(np.int64)
        hist = cls(lower, upper, bins, np.zeros(0, np.int64), np.zeros(0, np.int64), len(x),
                   capped=bool(np.any(wanted > cap)))
        keys, _ = hist.flat_index(x)
        hist.keys, hist.counts = np.unique(keys, return_counts=True)
        return hist

    @property
    def width(self) -> np.ndarray:
        return np.maximum(self.upper - self.lower, np.finfo(np.float64).tiny) / self.bins

    def flat_index(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat bin index, whether the state lies on the grid) per state."""
        inside = np.all((x >= self.lower) & (x <= self.upper), axis=1)
        index = np.clip(np.floor((x - self.lower) / self.width).astype(np.int64), 0, self.bins - 1)
        return np.ravel_multi_index(index.T, self.bins), inside

    def count(self, x: np.ndarray) -> np.ndarray:
        keys, inside = self.flat_index(x)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(inside & (self.keys[pos] == keys), self.counts[pos], 0)

    @property
    def bin_volume(self) -> float:
        return float(np.prod(self.width))

    def energy(self, x: np.ndarray) -> np.ndarray:
        """E = -log(count / (N * bin volume)) in nats; +inf in empty bins and outside the grid."""
        with np.errstate(divide="ignore"):
            return -np.log(self.count(x) / (self.n_samples * self.bin_volume))

    @property
    def dense_bytes(self) -> int:
        """Memory of the dense int64 count grid: prod(bins) x 8 (exact, however large)."""
        return math.prod(int(b) for b in self.bins) * 8

    @property
    def sparse_bytes(self) -> int:
        return int(self.keys.nbytes + self.counts.nbytes)


# -- the VAE --------------------------------------------------------------------------------

class RandomBatches(torch.utils.data.IterableDataset):
    """`steps` batches drawn with replacement from an in-memory tensor (whole batches, no collate)."""

    def __init__(self, states: torch.Tensor, batch_size: int, steps: int, seed: int):
        self.states, self.batch_size, self.steps, self.seed = states, batch_size, steps, seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            yield self.states[torch.randint(len(self.states), (self.batch_size,), generator=generator)]


def train_vae(x: np.ndarray, plan: StudyPlan, seed: int, name: str = "study") -> VAE:
    """The project's VAE, trained by a Lightning Trainer on the states (it z-scores them), fixed steps."""
    dim = x.shape[1]
    state = StateInfo(kind="vector", shape=(dim,), names=tuple(f"x{i}" for i in range(dim)),
                      units=("1",) * dim)
    L.seed_everything(seed, workers=False, verbose=False)
    vae = VAE(state=state.to_dict(), capsule={"name": name}, stats_meta={"count": len(x)}, seed=seed,
              **dict(plan.model))
    vae.set_normalization(SimpleNamespace(mean=x.mean(axis=0), std=x.std(axis=0)))
    states = torch.as_tensor(x, dtype=torch.float32)
    batches = torch.utils.data.DataLoader(RandomBatches(states, plan.batch_size, plan.steps, seed),
                                          batch_size=None)
    with quiet_lightning():
        trainer = L.Trainer(max_steps=plan.steps, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(vae, batches)
    return vae.eval()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with `n` intra-op threads: the study's small MLP batches gain little from a second
    thread on this 2-core machine and lose several-fold when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_lightning():
    """Thirty in-memory fits would print thirty banners; keep Lightning's warnings and errors only.

    Dropped: the expected "no validation loader" (the study scores the model itself) and a
    deprecation raised inside Lightning's own batch handling, once per fit.
    """
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            yield
    finally:
        logger.setLevel(level)


# -- one case -------------------------------------------------------------------------------

def slice_states(density: Density, x: np.ndarray, resolution: int) -> np.ndarray:
    """A resolution^2 grid over the first two axes (mean +/- 4 std of the data), the rest at the mode."""
    mean, std = x[:, :2].mean(axis=0), x[:, :2].std(axis=0)
    ticks = [np.linspace(m - 4 * s, m + 4 * s, resolution) for m, s in zip(mean, std, strict=True)]
    a, b = np.meshgrid(*ticks, indexing="ij")
    states = np.repeat(density.mode[None], a.size, axis=0)
    states[:, 0], states[:, 1] = a.ravel(), b.ravel()
    return states


def within_region(density: Density, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The states within REGION_NATS of the lowest energy, and their true energies."""
    energy = density.energy(states)
    keep = energy <= density.min_energy + REGION_NATS
    return states[keep], energy[keep]


def score(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean |E_est - E_true| over the states with a finite estimate, fraction without one)."""
    if len(estimate) == 0:
        return math.nan, math.nan
    finite = np.isfinite(estimate)
    mae = float(np.mean(np.abs(estimate[finite] - truth[finite]))) if finite.any() else math.nan
    return mae, float(1.0 - finite.mean())


def run_case(density: Density, n_samples: int, plan: StudyPlan) -> dict[str, Any]:
    """Both methods on one (density, D, N); every figure of the study's table for it."""
    dim = density.dim
    rng = np.random.default_rng([plan.seed, dim, n_samples, list(DENSITIES).index(density.name)])
    x = density.sample(n_samples, rng)
    held, held_true = within_region(density, density.sample(plan.n_eval, rng))
    plane, plane_true = within_region(density, slice_states(density, x, plan.slice_resolution))

    start = time.perf_counter()
    hist = SparseHistogram.fit(x, "scott")
    hist_fit_s = time.perf_counter() - start
    start = time.perf_counter()
    hist_held, hist_plane = hist.energy(held), hist.energy(plane)
    hist_eval_s = time.perf_counter() - start
    fine = SparseHistogram.fit(x, "fd")

    start = time.perf_counter()
    vae = train_vae(x, plan, seed=plan.seed, name=f"study-{density.name}-D{dim}")
    vae_train_s = time.perf_counter() - start
    points = np.concatenate([held, plane])
    start = time.perf_counter()
    vae_energy = evaluate_energy(vae, lambda a, b: points[a:b], len(points), k=plan.k,
                                 seed=plan.seed, device="cpu", progress=False)
    vae_eval_s = time.perf_counter() - start
    vae_held, vae_plane = vae_energy[: len(held)], vae_energy[len(held):]

    hist_mae, hist_empty = score(hist_held, held_true)
    hist_slice_mae, hist_slice_empty = score(hist_plane, plane_true)
    fine_mae, fine_empty = score(fine.energy(held), held_true)
    vae_mae, _ = score(vae_held, held_true)
    vae_slice_mae, _ = score(vae_plane, plane_true)
    n_params = sum(p.numel() for p in vae.members.parameters())
    return {
        "density": density.name, "dim": dim, "n_samples": n_samples,
        "eval_states": len(held), "slice_states": len(plane), "true_min_energy": density.min_energy,
        "vae_mae_nats": vae_mae, "vae_bias_nats": float(np.mean(vae_held - held_true)),
        "vae_slice_mae_nats": vae_slice_mae,
        "vae_params": n_params, "vae_memory_bytes": 4 * n_params, "vae_train_steps": plan.steps,
        "vae_train_s": vae_train_s, "vae_eval_s": vae_eval_s, "vae_k": plan.k,
        "hist_mae_nats": hist_mae, "hist_empty_fraction": hist_empty,
        "hist_slice_mae_nats": hist_slice_mae, "hist_slice_empty_fraction": hist_slice_empty,
        "hist_rule": "scott", "hist_bins": hist.bins.tolist(),
        "hist_memory_bytes": hist.dense_bytes, "hist_sparse_bytes": hist.sparse_bytes,
        "hist_nonempty_bins": len(hist.keys), "hist_fit_s": hist_fit_s, "hist_eval_s": hist_eval_s,
        "hist_fd_bins": fine.bins.tolist(), "hist_fd_capped": fine.capped,
        "hist_fd_memory_bytes": fine.dense_bytes,  # at the capped bins when capped: a lower bound
        "hist_fd_mae_nats": fine_mae, "hist_fd_empty_fraction": fine_empty,
        "baseline": "histogram (Scott rule)",
        "ratio": hist_mae / vae_mae,  # > 1: the VAE's energies are closer to the truth
    }


# -- the whole study ------------------------------------------------------------------------

def case_key(density: str, dim: int, n_samples: int) -> str:
    return f"{density}_D{dim}_N{n_samples}"


def run_study(plan: StudyPlan, progress: bool = True) -> dict[str, dict[str, Any]]:
    cases = {}
    for name in plan.densities:
        for dim in plan.dims:
            density = make_density(name, dim, seed=plan.seed)
            for n_samples in plan.sizes:
                start = time.perf_counter()
                case = run_case(density, n_samples, plan)
                cases[case_key(name, dim, n_samples)] = case
                if progress:
                    print(f"study {case_key(name, dim, n_samples)}: VAE {case['vae_mae_nats']:.3f} nats, "
                          f"histogram {case['hist_mae_nats']:.3f} nats "
                          f"({100 * case['hist_empty_fraction']:.1f}% empty), "
                          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return cases


def summarize(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per density and N: the crossover (smallest D from which the VAE is closer at every larger
    D of the study) and the histogram-to-VAE error ratio at each D of 6 and above."""
    summary: dict[str, Any] = {}
    for case in cases.values():
        entry = summary.setdefault(case["density"], {}).setdefault(f"N{case['n_samples']}", {"by_dim": {}})
        entry["by_dim"][case["dim"]] = case["ratio"]
    for per_n in summary.values():
        for entry in per_n.values():
            dims = sorted(entry.pop("by_dim").items())
            winning = [d for i, (d, _) in enumerate(dims) if all(r > 1 for _, r in dims[i:])]
            entry["crossover_dim"] = winning[0] if winning else None
            entry.update({f"ratio_D{d}": r for d, r in dims if d >= 6})
    return summary


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1024 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def nats(value: float, digits: int = 2) -> str:
    """A MAE for the table; n/a where no state had a finite estimate."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(cases: dict[str, dict[str, Any]]) -> str:
    header = ("| density | D | N | VAE MAE (nats) | histogram MAE (nats) | empty bins | hist / VAE "
              "| slice MAE VAE / hist | hist bins/axis | hist grid memory | FD grid: MAE, empty, memory "
              "| VAE params | VAE train s | VAE eval s | hist s |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in cases.values():
        bins = c["hist_bins"]
        bins_text = str(bins[0]) if len(set(bins)) == 1 else f"{min(bins)}-{max(bins)}"
        rows.append(
            f"| {c['density']} | {c['dim']} | {c['n_samples']:,} | {nats(c['vae_mae_nats'])} "
            f"| {nats(c['hist_mae_nats'])} | {100 * c['hist_empty_fraction']:.1f}% | {nats(c['ratio'])} "
            f"| {nats(c['vae_slice_mae_nats'])} / {nats(c['hist_slice_mae_nats'])} | {bins_text} "
            f"| {human_bytes(c['hist_memory_bytes'])} "
            f"| {nats(c['hist_fd_mae_nats'], 1)}, {100 * c['hist_fd_empty_fraction']:.0f}%, "
            f"{'>= ' if c['hist_fd_capped'] else ''}{human_bytes(c['hist_fd_memory_bytes'])} "
            f"| {c['vae_params']:,} | {c['vae_train_s']:.1f} | {c['vae_eval_s']:.1f} "
            f"| {c['hist_fit_s'] + c['hist_eval_s']:.2f} |")
    return "\n".join(rows)


def plot(cases: dict[str, dict[str, Any]], path: Path) -> Path:
    """One row per density: MAE vs D (both methods, one colour per N), empty fraction, memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = sorted({c["density"] for c in cases.values()})
    sizes = sorted({c["n_samples"] for c in cases.values()})
    colours = dict(zip(sizes, plt.get_cmap("viridis")(np.linspace(0.0, 0.8, len(sizes))), strict=True))
    fig, axes = plt.subplots(len(densities), 3, figsize=(15, 4.2 * len(densities)), squeeze=False)
    for row, name in zip(axes, densities, strict=True):
        for n in sizes:
            series = sorted((c for c in cases.values() if c["density"] == name and c["n_samples"] == n),
                            key=lambda c: c["dim"])
            dims = [c["dim"] for c in series]
            style = {"color": colours[n], "marker": "o"}
            row[0].plot(dims, [c["vae_mae_nats"] for c in series], "-", label=f"VAE, N={n:.0e}", **style)
            row[0].plot(dims, [c["hist_mae_nats"] for c in series], "--", label=f"histogram, N={n:.0e}", **style)
            row[1].plot(dims, [100 * c["hist_empty_fraction"] for c in series], "--", label=f"N={n:.0e}", **style)
            row[2].semilogy(dims, [c["hist_memory_bytes"] for c in series], "--",
                            label=f"histogram (Scott), N={n:.0e}", **style)
            row[2].semilogy(dims, [c["hist_fd_memory_bytes"] for c in series], ":",
                            label=f"histogram (FD), N={n:.0e}", **style)
        vae_bytes = sorted({(c["dim"], c["vae_memory_bytes"]) for c in cases.values() if c["density"] == name})
        row[2].semilogy(*zip(*vae_bytes, strict=True), "k-", marker="s", label="VAE parameters")
        row[0].set(title=f"{name}: |E - E_true| within {REGION_NATS:g} nats of the minimum",
                   xlabel="dimension D", ylabel="mean absolute error (nats)")
        row[1].set(title=f"{name}: held-out states in empty bins", xlabel="dimension D",
                   ylabel="% of states without a finite energy")
        row[2].set(title=f"{name}: memory", xlabel="dimension D", ylabel="bytes (histogram: dense count grid)")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Exact histogram (dashed) vs VAE IWAE bound (solid): energy error against the truth")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run(args) -> dict[str, Any]:
    """`scripts/bench.py study`: every case, the summary, a markdown table and the PNG."""
    plan = QUICK_PLAN if args.quick else StudyPlan()
    out_dir = Path(args.workdir) if args.workdir else Path("docs")
    with torch_threads(1):
        cases = run_study(plan)
    table = markdown_table(cases)
    png = plot(cases, out_dir / "study.png")
    atomic_write_text(out_dir / "study.md", table + "\n")
    print(table, file=sys.stderr if args.json else sys.stdout)
    return {**cases, "summary": summarize(cases), "plan": asdict(plan), "plot": str(png)}
