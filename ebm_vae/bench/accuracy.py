"""Map accuracy on densities known in closed form, through the whole pipeline a user runs:
`python scripts/bench.py accuracy [--json] [--quick] [--workdir DIR]`.

Each case writes N exact samples as a data tree (the built-in `grid` capsule's CSV layout for
the grid-like density, a user capsule's CSV otherwise), then runs `ebm-vae-crawl` ->
`ebm-vae-train trainer.max_steps=STEPS` -> `ebm-vae-export export.k=256
export.resolution=128` (the joint energy on the default slice through the mean for D > 2),
and scores the map against the true E(x) = -log p(x) in absolute nats (no shift), over the
map's states within `REGION_NATS` of the density's true minimum (the project's convention, as
in the study; a slice through the mean can pass several nats above the mode, and states
further out are ones no method sees data near). `*_slice_region_*` figures take the region
from the slice's own minimum instead, for comparison.

Beside it, on the same N samples and the same map states:

- `flow`: the reference the issue names, a plain neural spline flow (`zuko.flows.NSF`: 4
  transforms, 12 bins, two hidden layers of 128; AdamW with a cosine schedule; 3,000 steps
  at batch 1,024) on the z-scored samples: an exact likelihood, no bound;
- `histogram`: the exact D-dimensional count (Scott's rule, as in the study; empty bins have
  no finite energy and are left out of its MAE, their fraction reported);
- `gaussian`: one full-covariance Gaussian (the linear baseline).

The pipeline runs as subprocesses of the console scripts. `run_cases(..., code=DIR)` puts
another checkout's code first on their path, so one harness gives a before/after table:

    python -c "from ebm_vae.bench.accuracy import run_cases; \
               run_cases('/tmp/before', steps=10000, flow_steps=0, code='/tmp/checkout')"

A killed run resumes: training continues from its last checkpoint, and a case whose pipeline
finished in the work directory is scored again rather than rebuilt. Wall times depend on the
machine's load; errors in nats do not.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ebm_vae.bench.densities import Density, GridLike, TripleWell, make_density

REGION_NATS = 6.0
N_SAMPLES = 200_000
STEPS = 3000  # the VAE's optimiser steps (ebm-vae-train trainer.max_steps)
EXPORT = ("export.k=256", "export.resolution=128")


@dataclass(frozen=True)
class Case:
    name: str
    density: Density
    capsule: str  # "grid" (built in) or a user capsule written beside the data


def cases() -> dict[str, Case]:
    return {
        "grid_like": Case("grid_like", GridLike(), "grid"),
        "triple_well": Case("triple_well", TripleWell(), "triple_well"),
        "double_well_2d": Case("double_well_2d", make_density("boltzmann", 2), "double_well_2d"),
        "double_well_3d": Case("double_well_3d", make_density("boltzmann", 3), "double_well_3d"),
        "mixture_6d": Case("mixture_6d", make_density("mixture", 6), "mixture_6d"),
    }


def variables(case: Case) -> list[str]:
    return ["frequency", "phase_angle"] if case.capsule == "grid" else [f"x{i}" for i in range(case.density.dim)]


def write_case(case: Case, samples: np.ndarray, root: Path, conf: Path) -> None:
    """CSV files of the samples (8 files, so the validation split draws from several), and
    for user capsules the capsule YAML in `conf/capsule/`."""
    names = variables(case)
    data = root / case.name
    data.mkdir(parents=True, exist_ok=True)
    stem = "grid_frequency" if case.capsule == "grid" else case.name
    start = np.datetime64("2024-01-01T00:00:00")
    for i, part in enumerate(np.array_split(samples, 8)):
        with open(data / f"{stem}_{i}.csv", "w") as fh:
            fh.write(",".join(["timestamp", *names]) + "\n")
            stamps = start + np.arange(len(part)) * np.timedelta64(1, "s") + i * np.timedelta64(10**6, "s")
            for stamp, row in zip(stamps, part, strict=True):
                fh.write(f"{stamp}," + ",".join(f"{v:.9g}" for v in row) + "\n")
    if case.capsule != "grid":
        (conf / "capsule").mkdir(parents=True, exist_ok=True)
        (conf / "capsule" / f"{case.capsule}.yaml").write_text(
            f"name: {case.capsule}\nmatch: {{name: ['{case.name}_*']}}\nextractor: table\n"
            f"variables: [{', '.join(names)}]\nunits: [{', '.join(['m'] * len(names))}]\n"
            f"formats: [csv]\n")


def _run(command: list[str], env: dict[str, str], log: Path) -> float:
    """Run one console script; its output goes to `log`; the wall seconds it took."""
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(command) + "\n")
        fh.flush()
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_pipeline(case: Case, work: Path, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """crawl -> train -> export of one case; the map's path and the stage times."""
    root, out, conf, log = work / "data", work / "out", work / "conf", work / f"{case.name}.log"
    common = [f"data.root={root / case.name}", f"paths.root={out / case.name}"]
    config_dir = ["--config-dir", str(conf)] if case.capsule != "grid" else []
    times = {"crawl_s": _run([_script("ebm-vae-crawl"), *config_dir, *common], env, log)}
    times["train_s"] = _run([_script("ebm-vae-train"), *config_dir, f"capsule={case.capsule}", *common,
                             f"trainer.max_steps={steps}", "data.unit_samples=8192", "ckpt_path=last",
                             "trainer.enable_progress_bar=false"], env, log)
    npz = out / case.name / "map.npz"
    extra = [f"export.out={npz}", "export.progress=false"]
    if case.density.dim > 2 and _export_has("quantity", env):
        extra.append("export.quantity=slice")
    times["export_s"] = _run([_script("ebm-vae-export"), *config_dir, f"capsule={case.capsule}", *common,
                              *EXPORT, *extra], env, log)
    return {"map": npz, **times}


def _export_has(key: str, env: dict[str, str]) -> bool:
    """Whether the code under test knows `export.<key>` (older checkouts do not)."""
    probe = ("from ebm_vae.config import compose; import sys; "
             f"sys.exit(0 if '{key}' in compose('export', []).export else 1)")
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


def map_states(npz: Path, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(map energies (n,), full physical states (n, D)) of the map's grid points."""
    with np.load(npz, allow_pickle=False) as data:
        energy = data["energy_map"].astype(np.float64).ravel()
        axes = [data["axis_0"], data["axis_1"]]
        metadata = json.loads(str(data["metadata"]))
    names = variables(case)
    reference = metadata.get("reference_state") or {}
    a, b = np.meshgrid(*axes, indexing="ij")
    states = np.tile([float(reference.get(n, 0.0)) for n in names], (a.size, 1))
    states[:, names.index(metadata["axes"][0]["name"])] = a.ravel()
    states[:, names.index(metadata["axes"][1]["name"])] = b.ravel()
    return energy, states


def fit_reference_flow(samples: np.ndarray, steps: int = 3000, batch: int = 1024, seed: int = 0):
    """The issue's reference: zuko NSF (4 transforms, 12 bins, 2 x 128), AdamW + cosine, on
    z-scored samples; returns energy(states) in physical units and the CPU seconds it took."""
    import torch
    import zuko

    torch.manual_seed(seed)
    mean, std = samples.mean(axis=0), samples.std(axis=0)
    x = torch.as_tensor((samples - mean) / std, dtype=torch.float32)
    flow = zuko.flows.NSF(samples.shape[1], transforms=4, bins=12, hidden_features=(128, 128))
    optimizer = torch.optim.AdamW(flow.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.process_time()
    for _ in range(steps):
        loss = -flow().log_prob(x[torch.randint(len(x), (batch,), generator=generator)]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    cpu_s = time.process_time() - start
    log_jacobian = float(np.sum(np.log(std)))

    def energy(states: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u = torch.as_tensor((states - mean) / std, dtype=torch.float32)
            return np.concatenate([-flow().log_prob(c).double().numpy() for c in u.split(8192)]) + log_jacobian

    return energy, cpu_s


def gaussian_energy(samples: np.ndarray, states: np.ndarray) -> np.ndarray:
    """-log N(x; mean, cov) of one Gaussian fitted to the samples (the linear baseline)."""
    mean, cov = samples.mean(axis=0), np.cov(samples, rowvar=False)
    white = np.linalg.solve(np.linalg.cholesky(cov), (states - mean).T)
    _, log_det = np.linalg.slogdet(cov)
    return 0.5 * (np.sum(white**2, axis=0) + log_det + samples.shape[1] * math.log(2 * math.pi))


def mae(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean |E - E_true| over the states with a finite estimate, fraction without one)."""
    finite = np.isfinite(estimate)
    value = float(np.mean(np.abs(estimate[finite] - truth[finite]))) if finite.any() else math.nan
    return value, float(1.0 - finite.mean())


def score_case(case: Case, samples: np.ndarray, npz: Path, flow_steps: int) -> dict[str, Any]:
    """The map's errors, and those of the baselines on the same states (`flow_steps` 0: no flow)."""
    from ebm_vae.bench.study import SparseHistogram

    energy, states = map_states(npz, case)
    truth = case.density.energy(states)
    finite = np.isfinite(truth)
    slice_region = finite & (truth <= truth[finite].min() + REGION_NATS)
    region = finite & (truth <= case.density.min_energy + REGION_NATS)
    hist = SparseHistogram.fit(samples, "scott")
    out = {"states_scored": int(region.sum()), "map_mae_nats": mae(energy[region], truth[region])[0],
           "map_bias_nats": float(np.mean(energy[region] - truth[region])),
           "gaussian_mae_nats": mae(gaussian_energy(samples, states[region]), truth[region])[0],
           "slice_region_states": int(slice_region.sum()),
           "map_mae_slice_region_nats": mae(energy[slice_region], truth[slice_region])[0]}
    out["hist_mae_nats"], out["hist_empty_fraction"] = mae(hist.energy(states[region]), truth[region])
    if flow_steps > 0:
        flow_energy, out["flow_train_cpu_s"] = fit_reference_flow(samples, steps=flow_steps)
        flow_map = flow_energy(states)
        out["flow_mae_nats"] = mae(flow_map[region], truth[region])[0]
        out["flow_mae_slice_region_nats"] = mae(flow_map[slice_region], truth[slice_region])[0]
        out["ratio"] = out["map_mae_nats"] / out["flow_mae_nats"]  # the map's error in units of the flow's
    return out


def measure(case: Case, work: Path, steps: int, n_samples: int, flow_steps: int, code: str | None = None,
            seed: int = 0) -> dict[str, Any]:
    samples = case.density.sample(n_samples, np.random.default_rng([seed, case.density.dim]))
    done = work / "pipeline.json"  # a finished pipeline in the work directory is scored again, not rebuilt
    if done.is_file():
        result = json.loads(done.read_text())
    else:
        write_case(case, samples, work / "data", work / "conf")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if code:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [code, env.get("PYTHONPATH")]))
        result = run_pipeline(case, work, steps, env)
        result["map"] = str(result["map"])
        done.write_text(json.dumps(result))
    scores = score_case(case, samples, Path(result.pop("map")), flow_steps)
    return {"case": case.name, "dim": case.density.dim, "n_samples": n_samples, "train_steps": steps,
            **scores, **result, "code": code or "this checkout", "baseline": "zuko NSF reference flow"}


def run_cases(workdir: str | Path, names: list[str] | None = None, steps: int = STEPS,
              n_samples: int = N_SAMPLES, flow_steps: int = 3000, code: str | None = None) -> dict[str, dict[str, Any]]:
    """Every case (or `names`) under `workdir`; prints a line per case, returns the entries."""
    import torch

    torch.set_num_threads(1)
    chosen = cases()
    results = {}
    for name in names or list(chosen):
        results[name] = entry = measure(chosen[name], Path(workdir) / name, steps, n_samples, flow_steps, code)
        flow = f"{entry['flow_mae_nats']:.3f}" if "flow_mae_nats" in entry else "-"
        print(f"accuracy {name}: map {entry['map_mae_nats']:.3f} nats, flow {flow}, "
              f"histogram {entry['hist_mae_nats']:.3f}, gaussian {entry['gaussian_mae_nats']:.3f} "
              f"(train {entry['train_s']:.0f} s wall)", file=sys.stderr, flush=True)
    return results


def run(args: Any) -> dict[str, dict[str, Any]]:
    """`scripts/bench.py accuracy`: every case (two small ones with --quick)."""
    quick = {"names": ["double_well_2d", "mixture_6d"], "n_samples": 20_000, "steps": 300, "flow_steps": 300}
    with contextlib.ExitStack() as stack:
        work = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        return run_cases(work, **(quick if args.quick else {}))
