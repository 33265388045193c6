"""Chunked evaluation of a VAE's energy E(x) = -log p(x) over physical states.

`vae.log_prob` is the bound (ELBO for k = 1, importance-weighted bound for k > 1) of the
density in the physical units of x, the transform's Jacobian included, so energies of runs
with different statistics (or a histogram) share one absolute scale.

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

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger(__name__)

CPU_BUDGET_BYTES = 512 * 2**20  # per chunk, for activations on the CPU
GPU_FREE_FRACTION = 0.5  # of the free GPU memory, per chunk
MAX_CHUNK_POINTS = 2**16


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


def evaluate_energy(vae, states: Callable[[int, int], np.ndarray], n_points: int, k: int = 64,
                    seed: int = 0, device: str | torch.device | None = None,
                    chunk_points: int | None = None, progress: bool = True,
                    description: str = "energy",
                    return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """E (n_points,) float64 nats of the physical states `states(start, stop)` -> (n, D).

    `vae` is an `ebm_vae.model.vae.VAE`; it is moved to `device` and put in eval mode.
    `return_std`: also the uncertainty of each energy in nats (n_points,) float64.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (1 = negative ELBO), got {k}")
    device = resolve_device(device)
    vae = vae.to(device).eval()
    chunk = int(chunk_points or chunk_points_for(vae, k, device))
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    energy = np.empty(n_points, dtype=np.float64)
    energy_std = np.empty(n_points, dtype=np.float64) if return_std else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar, torch.inference_mode():
        task = bar.add_task(f"{description} (k={k}, {chunk} points/chunk, {device.type})", total=n_points)
        start = 0
        while start < n_points:
            stop = min(n_points, start + chunk)
            x = torch.as_tensor(states(start, stop), dtype=torch.float32)
            try:
                log_p = vae.log_prob(x, k=k, generator=generator, return_stderr=return_std)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk //= 2
                torch.cuda.empty_cache()
                log.warning("out of device memory; retrying with %d points per chunk", chunk)
                continue
            if return_std:
                log_p, stderr = log_p
                energy_std[start:stop] = stderr.cpu().numpy()
            energy[start:stop] = -log_p.cpu().numpy()
            bar.advance(task, stop - start)
            start = stop
    return (energy, energy_std) if return_std else energy
