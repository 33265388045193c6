"""Export throughput: `python scripts/bench.py export [--json] [--quick] [--gpu]`.

Grid points per second of the energy evaluation (`evaluate_energy`: grid states, z-scoring,
the bound, chunked as an export chunks them) for k = 1 (negative ELBO) and k = 64 (IWAE),
beside a plain forward pass (encoder, then decoder at the posterior mean) of the same
network over the same grid points, at the batch size the energy's decoder calls run at, in
the same run, and their ratio.
Cases: `grid` (2-D vector state, the default MLP) and `fusion` (3 x 64 x 64 field; 3 x 16 x
16 with --quick) as training now builds it: the principal-coefficient field density with an
MLP core over `FIELD_RANK` coefficients. The k = 1 ratio shows the cost of the ELBO over a
forward pass (one latent draw, the Gaussian log densities); at k = 64 the decoder runs 64
times per point, so the ratio is expected near 1/64 or above.

Marginal maps (`fusion_marginal_r<rank>_cpu`): the seconds of a 32 x 32 marginal map
(16 x 16 with --quick) at k = 64 of the fusion model with a core of 16 and of 48 principal
coefficients, beside the slice map of the same grid and k (`evaluate_energy`), their ratio,
and `seconds_128x128_estimate` (the cost is per point: x 16). A 128 x 128 map itself takes
tens of minutes on one CPU thread, too long for a benchmark section. The models are
untrained: the marginal's adaptive draws depend on the weights, and an untrained core (its
encoder far from its posterior) draws more than a trained one, so these are upper figures.

CPU figures are single-threaded, best of `REPEATS` run in turns, per CPU-second (the
machine may be shared) with wall-clock beside. With --gpu (and a CUDA device): the same
per-point figures on the GPU and the time of a whole 1024 x 1024 map of the grid capsule
with k = 64, beside a forward pass over the same million points.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.evaluate import chunk_points_for, evaluate_energy
from ebm_vae.energy.grid import GridStats, StateGrid
from ebm_vae.energy.marginal import marginal_energy
from ebm_vae.energy.methods.marginal import axis_rows, vae_coordinates
from ebm_vae.model.vae import VAE

REPEATS = 3
KS = (1, 64)
FIELD_RANK = 16  # principal coefficients of the fusion model's learned core
MARGINAL_RANKS = (16, 48)


def _case(name: str, quick: bool) -> tuple[StateInfo, dict[str, Any]]:
    if name == "grid":
        return StateInfo(kind="vector", shape=(2,), names=("frequency", "phase_angle"),
                         units=("Hz", "rad")), {}
    side = 16 if quick else 64
    return StateInfo.field(["Bx", "By", "Bz"], ["T"] * 3, (side, side)), {"stats_meta": {"field_rank": FIELD_RANK}}


def _model(state: StateInfo, kwargs: dict[str, Any], device: torch.device,
           resolution: int = 1024) -> tuple[VAE, StateGrid]:
    """An untrained VAE (speed does not depend on the weights) and its default export grid."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    stats = GridStats(mean=rng.normal(size=state.dim), std=rng.uniform(0.5, 2.0, state.dim))
    pca = None
    if state.kind == "field":
        n = MARGINAL_RANKS[-1] + 8
        basis, _ = np.linalg.qr(rng.standard_normal((state.dim, n)))
        eigenvalues = np.linspace(3.0, 0.5, n) ** 2
        stats = GridStats(stats.mean, stats.std, pca_components=basis.T, pca_std=np.sqrt(eigenvalues))
        pca = {"components": basis.T, "std": np.sqrt(eigenvalues), "eigenvalues": eigenvalues,
               "total_variance": float(eigenvalues.sum() + 0.01 * (state.dim - n)), "noise_floor": 1e-9}
    vae = VAE(state.to_dict(), capsule={"name": "bench"}, **kwargs)
    vae.set_normalization(SimpleNamespace(mean=stats.mean, std=stats.std, raw_std=stats.std, pca=pca))  # Stats-like
    return vae.to(device).eval(), StateGrid.build(state, stats, resolution=resolution)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _energy(vae: VAE, grid: StateGrid, n_points: int, k: int, chunk: int, device: torch.device) -> None:
    evaluate_energy(vae, grid.states, n_points, k=k, seed=0, device=device, chunk_points=chunk,
                    progress=False)


@torch.inference_mode()
def _forward(vae: VAE, grid: StateGrid, n_points: int, chunk: int, device: torch.device) -> None:
    """The baseline: the same grid states and z-scoring, encoder then decoder at the mean."""
    for start in range(0, n_points, chunk):
        x = torch.as_tensor(grid.states(start, min(n_points, start + chunk)), dtype=torch.float32,
                            device=device)
        vae.decode(vae.encode(vae.transformed(x)[0])[0])


def _decoder_batch(vae: VAE, grid: StateGrid, n_points: int, k: int, chunk: int, device: torch.device) -> int:
    """The largest batch the decoder sees while the energy is evaluated (the VAE splits its
    input to bound memory), found by a hook during a warm-up run."""
    seen = [0]
    hook = vae.decoder.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[0]))
    try:
        _energy(vae, grid, n_points, k, chunk, device)
    finally:
        hook.remove()
    return max(seen)


def _compare(vae, grid, n_points, k, device, repeats=REPEATS) -> dict[str, Any]:
    """Best points/s of energy and forward pass, run in turns, the forward pass at the batch
    the energy's decoder calls get (k rows per point for k > 1)."""
    chunk = min(n_points, chunk_points_for(vae, k, device))
    batch = _decoder_batch(vae, grid, min(n_points, chunk), k, chunk, device)  # also the warm-up
    _forward(vae, grid, min(n_points, batch), batch, device)
    best = {"energy": [math.inf, math.inf], "forward": [math.inf, math.inf]}
    for _ in range(repeats):
        for key, fn in (("energy", lambda: _energy(vae, grid, n_points, k, chunk, device)),
                        ("forward", lambda: _forward(vae, grid, n_points, batch, device))):
            wall, cpu = _timed(fn, device)
            best[key] = [min(best[key][0], wall), min(best[key][1], cpu)]
    clock = 1 if device.type == "cpu" else 0  # CPU-seconds on a (shared) CPU, wall on a GPU
    energy, forward = n_points / best["energy"][clock], n_points / best["forward"][clock]
    return {"energy_points_per_s": energy, "forward_points_per_s": forward, "ratio": energy / forward,
            "energy_wall_points_per_s": n_points / best["energy"][0],
            "forward_wall_points_per_s": n_points / best["forward"][0],
            "k": k, "chunk_points": chunk, "forward_batch": batch, "points": n_points, "device": str(device),
            "clock": "cpu" if clock else "wall"}


# Points per timing (a few seconds of work): (case, k, device type, quick) -> points.
POINTS = {
    ("grid", 1, "cpu"): (2**14, 2**12), ("grid", 64, "cpu"): (2**12, 2**10),
    ("fusion", 1, "cpu"): (1024, 512), ("fusion", 64, "cpu"): (64, 32),
    ("grid", 1, "cuda"): (2**18, 2**18), ("grid", 64, "cuda"): (2**16, 2**16),
    ("fusion", 1, "cuda"): (2**14, 2**14), ("fusion", 64, "cuda"): (2**10, 2**10),
}


def _cases(device: torch.device, quick: bool, **extra: Any) -> dict[str, dict[str, Any]]:
    """k = 1 and k = 64 energies beside the forward pass, for the grid and fusion models."""
    results = {}
    for name in ("grid", "fusion"):
        state, kwargs = _case(name, quick)
        vae, grid = _model(state, kwargs, device)
        for k in KS:
            points = POINTS[name, k, device.type][quick]
            results[f"{name}_k{k}_{'gpu' if device.type == 'cuda' else 'cpu'}"] = {
                **_compare(vae, grid, points, k, device), **extra}
    return results


def _marginal_case(state: StateInfo, rank: int, resolution: int, k: int) -> dict[str, Any]:
    """Seconds of a marginal map of the fusion model beside the slice map of the same grid and k."""
    cpu = torch.device("cpu")
    vae, grid = _model(state, {"stats_meta": {"field_rank": rank}}, cpu, resolution)
    rows, origin = axis_rows(grid)
    points = grid.points(0, grid.n_points)
    marginal_wall, marginal_cpu = _timed(
        lambda: marginal_energy(vae_coordinates(vae, rows, origin), points, k=k, seed=0), cpu)
    slice_wall, slice_cpu = _timed(lambda: _energy(vae, grid, grid.n_points, k, 4096, cpu), cpu)
    return {"marginal_seconds": marginal_wall, "marginal_cpu_seconds": marginal_cpu,
            "slice_seconds": slice_wall, "slice_cpu_seconds": slice_cpu, "ratio": marginal_cpu / slice_cpu,
            "marginal_points_per_cpu_s": grid.n_points / marginal_cpu,
            "seconds_128x128_estimate": marginal_wall * 128**2 / grid.n_points,
            "resolution": resolution, "k": k, "rank": rank, "threads": 1}


def _marginal_cases(quick: bool) -> dict[str, dict[str, Any]]:
    state, _ = _case("fusion", quick)
    return {f"fusion_marginal_r{rank}_cpu": _marginal_case(state, rank, 16 if quick else 32, 64)
            for rank in MARGINAL_RANKS}


def run(args: Any) -> dict[str, dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = _cases(torch.device("cpu"), args.quick, threads=1)
        results.update(_marginal_cases(args.quick))
    finally:
        torch.set_num_threads(threads)

    if args.gpu and torch.cuda.is_available():
        cuda = torch.device("cuda")
        gpu_name = torch.cuda.get_device_name(cuda)
        results.update(_cases(cuda, args.quick, gpu=gpu_name))
        vae, grid = _model(*_case("grid", False), cuda)
        chunk = chunk_points_for(vae, 64, cuda)
        batch = _decoder_batch(vae, grid, chunk, 64, chunk, cuda)
        wall, _ = _timed(lambda: _energy(vae, grid, grid.n_points, 64, chunk, cuda), cuda)
        forward, _ = _timed(lambda: _forward(vae, grid, grid.n_points, batch, cuda), cuda)
        results["grid_1024x1024_k64_gpu"] = {
            "seconds": wall, "forward_seconds": forward, "ratio": wall / forward,
            "points": grid.n_points, "chunk_points": chunk, "forward_batch": batch, "gpu": gpu_name}
    if not args.json:
        for key, entry in results.items():
            if "marginal_seconds" in entry:
                figure = (f"{entry['resolution']}^2 marginal map {entry['marginal_seconds']:.1f} s "
                          f"({entry['marginal_cpu_seconds']:.1f} CPU-s; slice {entry['slice_cpu_seconds']:.1f} CPU-s)")
            elif "seconds" in entry:
                figure = f"{entry['seconds']:.2f} s"
            else:
                figure = (f"{entry['energy_points_per_s']:,.0f} points/s "
                          f"(forward {entry['forward_points_per_s']:,.0f})")
            print(f"export {key}: {figure}, ratio {entry['ratio']:.4f}")
    return results
