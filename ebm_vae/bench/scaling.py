"""How one streaming epoch grows with the data: `python scripts/bench.py scaling [--json] [--quick]`.

For the grid capsule (Parquet) and the fusion capsule (plain-layout HDF5, 3 x 32 x 32 field
states), trees of 1x, 3x and 10x the files (and so the bytes) are crawled (index + statistics
pass), then training epochs of the capsule's real `CapsuleDataModule` loader (read, extract,
z-score, shuffle buffer, whole batches; `data.num_workers=0`, so one worker) run in a fresh
subprocess, which reports its own peak RSS: `VmHWM` of /proc/self/status, the high-water mark
of its own address space. (Not `getrusage(...).ru_maxrss`: Linux carries the high-water mark of
the address space replaced by exec into it, so a child started from a large parent reports at
least the parent's size.) The subprocess runs `EPOCHS` epochs, each with
its own shuffle, and reports the median epoch time and the peak over all of them (memory that
grew per epoch would show). Each entry sits beside the 1x run as the baseline, with ratios:
streaming memory is flat when `peak_rss_ratio` stays near 1 while `samples_ratio` reaches 10,
and time is linear when `seconds_per_sample_ratio` stays near 1.

The memory a stream holds is bounded by its shuffle buffer (`data.shuffle_buffer` states, at
most `data.shuffle_buffer_bytes`) and one read chunk, never by the data: the 1x trees are sized
so the buffer is already full at 1x (for fusion's 12 KB states the byte cap is lowered to
`FUSION_BUFFER_BYTES` to make that so at a few minutes' size). Files of one tree are `VARIANTS`
distinct demo files copied under distinct names (copies, not hard links: the crawl rightly
indexes a hard-linked file once), which keeps generation to seconds; every file is crawled and
streamed as its own. A tree is deleted once measured (the 10x ones are 2 GB).

Seconds are wall-clock; `cpu_seconds` (the subprocess's CPU time) is the figure to read when
other processes share the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebm_vae import demo
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data.datamodule import datamodule_from_config

SCALES = (1, 3, 10)
STATS_SCALE = 3  # the tree the statistics pass's speed-up is measured on
EPOCHS = 3
VARIANTS = 4  # distinct files written per capsule; the rest of a tree repeats them
FUSION_BUFFER_BYTES = 4 * 2**20


@dataclass(frozen=True)
class TreeSpec:
    """The files of one capsule's 1x tree: `files_1x` files written by `write(path, seed)`."""

    capsule: str
    name: str  # file name pattern with one {} for the index; matches the capsule's rules
    files_1x: int
    write: Callable[[Path, int], Path]
    overrides: tuple[str, ...] = ()


def tree_specs(quick: bool) -> list[TreeSpec]:
    """1x: 8 files of 25 MB per capsule (2 files of 2.5 to 6 MB with --quick)."""
    files, rows, snapshots = (2, 100_000, 256) if quick else (8, 1_000_000, 1024)
    return [
        TreeSpec("grid", "grid_frequency_{:04d}.parquet", files,
                 lambda path, seed: demo.write_grid_parquet(path, n_rows=rows, seed=seed)),
        TreeSpec("fusion", "MHD_32_run{:04d}.h5", files,
                 lambda path, seed: demo.write_fusion_plain(path, n_time=snapshots, n=32, nz=2,
                                                            seed=seed),
                 (f"data.shuffle_buffer_bytes={FUSION_BUFFER_BYTES}",)),
    ]


def write_variants(spec: TreeSpec, work: Path) -> list[Path]:
    sources = work / f"{spec.capsule}_variants"
    return [spec.write(sources / spec.name.format(i), i) for i in range(VARIANTS)]


def write_tree(spec: TreeSpec, variants: list[Path], root: Path, scale: int) -> Path:
    """`scale` x `files_1x` files under `root`, copies of the variants in turn."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(scale * spec.files_1x):
        shutil.copyfile(variants[i % len(variants)], root / spec.name.format(i))
    return root


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file())


def train_overrides(capsule: str, root: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    return [f"capsule={capsule}", f"data.root={root}", f"paths.root={out}", "crawl.progress=false",
            "data.num_workers=0", *extra]


def crawl_tree(overrides: list[str]) -> float:
    """Index and statistics pass of one tree; returns its wall seconds."""
    cfg = compose("train", overrides)
    start = time.perf_counter()
    with contextlib.redirect_stdout(None):
        crawl(cfg)
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident set size since exec, MiB (`VmHWM`, reported in kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status: the scaling bench needs Linux")


def one_epoch(overrides: list[str]) -> dict[str, Any]:
    """`EPOCHS` training epochs of the capsule's data module in this process (the subprocess side)."""
    logging.getLogger("ebm_vae").setLevel(logging.WARNING)
    data = datamodule_from_config(compose("train", overrides))
    loader = data.train_dataloader()
    rss_before = peak_rss_mb()
    walls, cpus, samples = [], [], 0
    for epoch in range(EPOCHS):
        loader.dataset.set_epoch(epoch)
        wall, cpu = time.perf_counter(), time.process_time()
        samples = sum(len(batch) for batch in loader)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"samples": samples, "seconds": statistics.median(walls),
            "cpu_seconds": statistics.median(cpus), "epochs": EPOCHS,
            "peak_rss_mb": peak_rss_mb(), "rss_before_epochs_mb": rss_before,
            "state_dim": data.state.dim, "batch_size": loader.dataset.batch_size}


def epoch_in_subprocess(overrides: list[str]) -> dict[str, Any]:
    """`one_epoch` in a fresh interpreter, so its peak RSS is the epoch's alone."""
    command = [sys.executable, "-m", "ebm_vae.bench.scaling", "--epoch", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"epoch subprocess failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(spec: TreeSpec, work: Path, scales: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    variants = write_variants(spec, work)
    entries, passes = {}, {}
    for scale in scales:
        root = write_tree(spec, variants, work / f"{spec.capsule}_{scale}x", scale)
        overrides = train_overrides(spec.capsule, root, work / f"{spec.capsule}_{scale}x_out",
                                    spec.overrides)
        crawl_s = crawl_tree(overrides)
        epoch = epoch_in_subprocess(overrides)
        files, size = sum(1 for p in root.iterdir() if p.is_file()), tree_bytes(root)
        if scale == STATS_SCALE:
            passes[f"{spec.capsule}_stats_pass"] = stats_speedup(spec, overrides, files, size)
        shutil.rmtree(root)
        entry = {"scale": scale, "files": files, "bytes": size, **epoch,
                 "samples_per_s": epoch["samples"] / epoch["seconds"],
                 "cpu_samples_per_s": epoch["samples"] / epoch["cpu_seconds"],
                 "crawl_s": crawl_s, "overrides": list(spec.overrides)}
        entries[f"{spec.capsule}_{scale}x"] = entry
        print(f"scaling {spec.capsule} {scale}x: {files} files, {entry['bytes'] / 1e6:.0f} MB, "
              f"{epoch['samples']} samples in {epoch['seconds']:.1f} s "
              f"({epoch['cpu_seconds']:.1f} CPU s), peak RSS {epoch['peak_rss_mb']:.0f} MiB",
              file=sys.stderr, flush=True)
    add_ratios(entries, f"{spec.capsule}_{scales[0]}x")
    return {**entries, **passes}


def stats_speedup(spec: TreeSpec, overrides: list[str], files: int, size: int) -> dict[str, Any]:
    """Wall seconds of the statistics pass over one tree in 1 and 2 worker processes (best of
    `EPOCHS`, in turns; the state cache off), the speed-up, and what Amdahl's law gives for 16
    processes with the serial share those two imply (merging in the parent, start-up)."""
    from ebm_vae.capsules import visible_capsules
    from ebm_vae.crawl.manifest import read_manifest
    from ebm_vae.data.stats import run_stats_pass

    best = {}
    for _ in range(EPOCHS):
        for workers in (1, 2):
            cfg = compose("train", [*overrides, f"crawl.stats_workers={workers}", "data.cache=off"])
            manifest = read_manifest(cfg.paths.index)
            start = time.perf_counter()
            run_stats_pass(manifest, visible_capsules()[spec.capsule], cfg.paths.index, cfg, cache=None)
            best[workers] = min(best.get(workers, math.inf), time.perf_counter() - start)
    speedup = best[1] / best[2]
    parallel = min(1.0, max(0.0, 2.0 * (1.0 - 1.0 / speedup)))  # Amdahl: S(2) = 1 / (1 - p + p / 2)
    entry = {"files": files, "bytes": size, "seconds_1_process": best[1], "seconds_2_processes": best[2],
             "speedup_2": speedup, "parallel_share": parallel,
             "expected_speedup_16": 1.0 / (1.0 - parallel + parallel / 16), "ratio": speedup,
             "mb_per_s_1_process": size / best[1] / 1e6, "cpus": os.cpu_count(),
             "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"statistics pass {spec.capsule}: {best[1]:.1f} s in 1 process, {best[2]:.1f} s in 2: x{speedup:.2f} "
          f"(x{entry['expected_speedup_16']:.1f} expected at 16)", file=sys.stderr, flush=True)
    return entry


def add_ratios(entries: dict[str, dict[str, Any]], baseline_key: str) -> None:
    """Each entry's figures over the baseline's (the smallest tree), in place."""
    base = entries[baseline_key]
    for entry in entries.values():
        entry["baseline"] = baseline_key
        entry["files_ratio"] = entry["files"] / base["files"]
        entry["bytes_ratio"] = entry["bytes"] / base["bytes"]
        entry["samples_ratio"] = entry["samples"] / base["samples"]
        entry["seconds_ratio"] = entry["seconds"] / base["seconds"]
        entry["cpu_seconds_ratio"] = entry["cpu_seconds"] / base["cpu_seconds"]
        entry["seconds_per_sample_ratio"] = entry["seconds_ratio"] / entry["samples_ratio"]
        entry["cpu_seconds_per_sample_ratio"] = entry["cpu_seconds_ratio"] / entry["samples_ratio"]
        entry["peak_rss_ratio"] = entry["peak_rss_mb"] / base["peak_rss_mb"]
        entry["ratio"] = entry["peak_rss_ratio"]  # the figure the bench is about: flat memory


def markdown_table(entries: dict[str, dict[str, Any]]) -> str:
    rows = ["| tree | files | MB | samples | seconds (CPU s) | samples/s | peak RSS MiB "
            "| samples x | time/sample x | CPU time/sample x | peak RSS x |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in entries.items():
        if "samples" not in e:  # a statistics pass's speed-up (printed as it is measured)
            continue
        rows.append(f"| {key} | {e['files']} | {e['bytes'] / 1e6:.0f} | {e['samples']:,} "
                    f"| {e['seconds']:.1f} ({e['cpu_seconds']:.1f}) | {e['samples_per_s']:,.0f} "
                    f"| {e['peak_rss_mb']:.0f} | {e['samples_ratio']:.1f} "
                    f"| {e['seconds_per_sample_ratio']:.2f} | {e['cpu_seconds_per_sample_ratio']:.2f} "
                    f"| {e['peak_rss_ratio']:.3f} |")
    return "\n".join(rows)


def run(args: Any) -> dict[str, dict[str, Any]]:
    logging.getLogger("ebm_vae").setLevel(logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        work = (Path(args.workdir) / "scaling" if args.workdir
                else Path(stack.enter_context(tempfile.TemporaryDirectory())))
        for spec in tree_specs(args.quick):
            results.update(measure(spec, work, SCALES))
    print(markdown_table(results), file=sys.stderr if args.json else sys.stdout)
    return results


def main(argv: list[str] | None = None) -> int:
    """The subprocess side: `python -m ebm_vae.bench.scaling --epoch OVERRIDE...` prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epoch", action="store_true", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    print(json.dumps(one_epoch(args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
