"""Chunked evaluation of a model's energy E(x) = -log p(x) over physical states, with how sure it is.

`estimate_energy` returns an `EnergyEstimate`: per state the energy, its uncertainty and
where it comes from. `evaluate_energy` is the same with plain arrays (energies, or energies and
their uncertainty).

- **The energy** is minus the bound of the model's density in the physical units of x, the
  transform's Jacobian included (`VAE.log_prob`: the ELBO for k = 1, the importance-weighted
  bound for k > 1; for an ensemble, the bound of the members' mixture), so energies of runs
  with different statistics (or a histogram) share one absolute scale.
- **Adaptive k**: an importance-weighted estimate is only as good as its weights. Where the
  standard error of a state's estimate (delta method on its k weights) exceeds
  `target_stderr` nats, the state is evaluated again with 4 k samples, and so on up to
  `max_k`. Tail states, where the encoder's q misses the posterior, get the samples they need;
  `k` records per state what it got, `stderr` the error of the final estimate (nan for the
  ELBO, k = 1, which has no weights and is never refined).
- **The uncertainty** `std` = sqrt(spread^2 + stderr^2): `spread` is the members' epistemic
  spread (the standard deviation of the members' energies, less their own Monte Carlo
  variance; 0 for a single model), `stderr` the Monte Carlo error of the ensemble's estimate.

Chunks are sized to the device's memory: the activations of one state's bound (k draws)
are measured once (forward hooks on a one-state pass), and a chunk takes what fits in half
the free GPU memory (`torch.cuda.mem_get_info`) or in a fixed CPU budget. Chunk sizes are
powers of two and the noise comes from one `torch.Generator` seeded with `seed`, so a run is
reproducible for a given seed, device and chunk size; free GPU memory can change the chunk
size between runs, so `export.chunk_points` pins it where bitwise reproducibility matters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ebm_vae.model.elbo import mixture_bound

log = logging.getLogger(__name__)

CPU_BUDGET_BYTES = 512 * 2**20  # per chunk, for activations on the CPU
GPU_FREE_FRACTION = 0.5  # of the free GPU memory, per chunk
MAX_CHUNK_POINTS = 2**16
TARGET_STDERR = 0.1  # nats: states whose estimate is less sure than this get more samples
MAX_K = 4096  # importance samples per member, at most, after adaptive refinement
K_GROWTH = 4  # each refinement multiplies k by this


@dataclass
class EnergyEstimate:
    """Energies of n states and how sure each is; every array has shape (n,).

    energy: float64 nats, -log p(x) estimated from above (see the module docstring).
    std: float64 nats, the uncertainty of each energy: sqrt(spread^2 + stderr^2).
    stderr: float64 nats, the Monte Carlo standard error of the final estimate (nan at k = 1).
    spread: float64 nats, the ensemble members' epistemic spread (0 for one member).
    k: int64, importance samples per member behind each energy (>= the requested k).
    """

    energy: np.ndarray
    std: np.ndarray
    stderr: np.ndarray
    spread: np.ndarray
    k: np.ndarray
    requested_k: int
    max_k: int
    target_stderr: float

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready account for map metadata: how many states needed more samples,
        and what uncertainty remains."""
        finite = np.isfinite(self.stderr)
        above = finite & (self.stderr > self.target_stderr)
        return {
            "k": self.requested_k, "max_k": self.max_k, "target_stderr_nats": self.target_stderr,
            "k_raised_fraction": float(np.mean(self.k > self.requested_k)) if len(self.k) else 0.0,
            "k_max_used": int(self.k.max()) if len(self.k) else self.requested_k,
            "stderr_above_target_fraction": float(np.mean(above)) if len(self.k) else 0.0,
            "stderr_max_nats": float(np.max(self.stderr[finite])) if finite.any() else None,
            "spread_median_nats": float(np.median(self.spread)) if len(self.spread) else None,
            "std_median_nats": float(np.median(self.std)) if len(self.std) else None,
        }


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"cpu", "cuda" (an error without one), or None/"auto": the GPU when there is one."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested, but torch sees no CUDA device")
    return device


def activation_elements(vae, k: int = 1) -> int:
    """Elements of every module output in one bound evaluation of one state (a memory estimate)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in vae.modules() if not any(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        probe = vae.norm_mean[None].clone()
        with torch.inference_mode():
            vae.log_prob(probe, k=k, generator=None)
    finally:
        for hook in hooks:
            hook.remove()
    return max(total, vae.state_info.dim)


def chunk_points_for(vae, k: int, device: torch.device) -> int:
    """Grid points per chunk: a power of two whose activations (k samples each) fit the budget."""
    bytes_per_point = 4 * activation_elements(vae, k)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = GPU_FREE_FRACTION * free
    else:
        budget = CPU_BUDGET_BYTES
    fit = max(1, int(budget // bytes_per_point))
    return min(MAX_CHUNK_POINTS, 1 << (fit.bit_length() - 1))


def combine_members(bounds: torch.Tensor, stderr: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(energy, stderr, spread) of states from the members' bounds and standard errors (M, n).

    The spread is the members' standard deviation of -bound with their own Monte Carlo
    variance taken out (it would otherwise count twice), never below 0.
    """
    bound, error = mixture_bound(bounds, stderr)
    if bounds.shape[0] > 1:
        own = torch.nan_to_num(stderr, nan=0.0).square().mean(dim=0)
        spread = torch.sqrt((bounds.var(dim=0) - own).clamp(min=0.0))
    else:
        spread = torch.zeros_like(bound)
    return (-bound).cpu().numpy(), error.cpu().numpy(), spread.cpu().numpy()


def estimate_energy(vae, states: Callable[[int, int], np.ndarray], n_points: int, k: int = 64,
                    seed: int = 0, device: str | torch.device | None = None,
                    chunk_points: int | None = None, progress: bool = True,
                    description: str = "energy", max_k: int | None = MAX_K,
                    target_stderr: float = TARGET_STDERR) -> EnergyEstimate:
    """An `EnergyEstimate` of the physical states `states(start, stop)` -> (n, D), for n_points.

    `vae` is an `ebm_vae.model.vae.VAE` (anything with `member_log_prob`); it is moved to
    `device` and put in eval mode. `max_k` caps the adaptive refinement (None or <= k: off).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (1 = negative ELBO), got {k}")
    max_k = k if max_k is None or k == 1 else max(k, int(max_k))
    device = resolve_device(device)
    vae = vae.to(device).eval()
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    energy = np.empty(n_points, dtype=np.float64)
    stderr = np.empty(n_points, dtype=np.float64)
    spread = np.empty(n_points, dtype=np.float64)
    used = np.full(n_points, k, dtype=np.int64)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar, torch.inference_mode():
        todo = np.arange(n_points)
        k_now = k
        while len(todo):
            chunk = int(chunk_points or chunk_points_for(vae, k_now, device))
            label = description if k_now == k else f"{description}: {len(todo)} unsure states"
            task = bar.add_task(f"{label} (k={k_now}, {chunk} points/chunk, {device.type})", total=len(todo))
            contiguous = len(todo) == n_points
            start = 0
            while start < len(todo):
                stop = min(len(todo), start + chunk)
                rows = todo[start:stop]
                x = states(start, stop) if contiguous else _gather(states, rows)
                try:
                    bounds, errors = vae.member_log_prob(torch.as_tensor(x, dtype=torch.float32), k=k_now,
                                                         generator=generator)
                except torch.cuda.OutOfMemoryError:
                    if chunk == 1:
                        raise
                    chunk //= 2
                    torch.cuda.empty_cache()
                    log.warning("out of device memory; retrying with %d points per chunk", chunk)
                    continue
                energy[rows], stderr[rows], spread[rows] = combine_members(bounds, errors)
                used[rows] = k_now
                bar.advance(task, stop - start)
                start = stop
            if k_now >= max_k:
                break
            unsure = todo[stderr[todo] > target_stderr]  # nan (k = 1) compares False
            todo, k_now = unsure, min(max_k, k_now * K_GROWTH)
    std = np.sqrt(spread**2 + np.nan_to_num(stderr, nan=0.0) ** 2)
    return EnergyEstimate(energy, std, stderr, spread, used, requested_k=k, max_k=max_k,
                          target_stderr=target_stderr)


def _gather(states: Callable[[int, int], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The states at sorted indices `rows`, read as contiguous runs of `states(start, stop)`."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = np.split(rows, breaks)
    return np.concatenate([states(int(run[0]), int(run[-1]) + 1) for run in runs])


def evaluate_energy(vae, states: Callable[[int, int], np.ndarray], n_points: int, k: int = 64,
                    seed: int = 0, device: str | torch.device | None = None,
                    chunk_points: int | None = None, progress: bool = True,
                    description: str = "energy", return_std: bool = False,
                    max_k: int | None = MAX_K,
                    target_stderr: float = TARGET_STDERR) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """E (n_points,) float64 nats of the physical states `states(start, stop)` -> (n, D).

    `return_std`: also the uncertainty of each energy in nats (n_points,) float64. The full
    account (standard error, spread, k used per state) is `estimate_energy`'s.
    """
    estimate = estimate_energy(vae, states, n_points, k, seed, device, chunk_points, progress,
                               description, max_k, target_stderr)
    return (estimate.energy, estimate.std) if return_std else estimate.energy
