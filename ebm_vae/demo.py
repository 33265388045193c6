"""Demo data: small, schema-true physics files and a whole tree that looks like an external drive.

The writers produce the layouts the capsules read (the Well's MHD layout and a plain HDF5
layout for fusion, NetCDF temperature maps for wafer, CSV/Parquet frequency logs and PMU
event logs for grid, a plasma shot log for the `shots` user capsule that `write_shot_capsule`
defines)
from simple but physically sensible processes, so that tests, the README's demo run and the
benchmarks all exercise the same code paths as real data. Every file is deterministic for a
seed. Files are written in place rather than through `ebm_vae.io`: the tree is regenerated
whole, and one fsync per file would dominate the 10,000-small-file benchmark.

`make_demo_tree` also plants what a real drive holds besides data: unrelated files, a file
recognisable only by its metadata, empty/truncated/corrupt files, a hidden folder and a
symlink loop. Its summary lists, per file, the capsule a correct crawl assigns.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

GUIDE_FIELD_T = 2.0  # tokamak-like guide field B0 along z
AMBIENT_K = 300.0  # wafer chuck / ambient temperature
EPOCH = "2024-01-01T00:00:00"  # start of the demo time axes (grid timestamps, wafer time units)
PARQUET_ROW_GROUP = 25_000  # rows per row group: larger files get several


def _prepare(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _ou_paths(rng: np.random.Generator, n_steps: int, n_paths: int, tau: float,
              sigma: float) -> np.ndarray:
    """(n_steps, n_paths) stationary Ornstein-Uhlenbeck paths; tau in steps, sigma = stationary std.

    Iterates over time, so it suits short series (snapshots); `_ou_series` handles long ones.
    """
    rho = math.exp(-1.0 / tau)
    out = np.empty((n_steps, n_paths))
    out[0] = rng.normal(0.0, sigma, n_paths)
    kicks = rng.normal(0.0, sigma * math.sqrt(1.0 - rho * rho), (n_steps, n_paths))
    for t in range(1, n_steps):
        out[t] = rho * out[t - 1] + kicks[t]
    return out


def _ou_series(rng: np.random.Generator, n: int, tau: float, sigma: float) -> np.ndarray:
    """A long stationary OU series x[t] = rho x[t-1] + kick[t], vectorised by blocks.

    Within a block of length L, x[j] = rho^j (x0 + sum_{i<=j} rho^-i kick[i]); L is chosen so
    that rho^-L stays below ~e^15 (no loss of precision), leaving a Python loop over blocks only.
    """
    rho = math.exp(-1.0 / tau)
    block = int(min(n, max(1, 15 * tau)))
    n_blocks = -(-n // block)
    kicks = rng.normal(0.0, sigma * math.sqrt(1.0 - rho * rho), n_blocks * block)
    kicks = kicks.reshape(n_blocks, block)
    powers = rho ** np.arange(1, block + 1)  # rho^(j+1): the carry from the previous block
    local = powers / rho * np.cumsum(kicks / (powers / rho), axis=1)  # each block from x0 = 0
    out = np.empty_like(local)
    carry = rng.normal(0.0, sigma)
    for b in range(n_blocks):
        out[b] = local[b] + powers * carry
        carry = out[b, -1]
    return out.reshape(-1)[:n]


def wrap_phase(phase: np.ndarray) -> np.ndarray:
    """Wrap angles (rad) into (-pi, pi]."""
    return np.pi - np.mod(np.pi - phase, 2.0 * np.pi)


# --------------------------------------------------------------------------- fusion (HDF5)


class _SolenoidalModes:
    """A guide field B0 z-hat plus a few Fourier modes with OU amplitudes, divergence-free.

    Mode m is e1_m (a cos(k.r) ) + e2_m (b sin(k.r)) with e1, e2 perpendicular to k, so its
    divergence k.e vanishes analytically; a and b wander in time as OU processes around the
    mean amplitudes of the plasma's current regime (quiet, or the largest mode locked at
    either sign), which switches at random: the states' density has a basin per regime. The
    same construction without the guide field gives the velocity, and a scalar version the
    density. The modes are the device's (`rng` from `_device_rng`): the same in every file.
    """

    def __init__(self, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray,
                 n_modes: int = 6, amplitude: float = 0.1 * GUIDE_FIELD_T):
        span_xy = x[-1] - x[0] + (x[1] - x[0])  # periodic box in x, y
        span_z = (z[-1] - z[0]) or 1.0  # a single plane: any vertical scale will do
        ints = rng.integers(-3, 4, size=(n_modes, 3))
        ints[:, 2] = np.abs(ints[:, 2]) % 3
        ints[np.all(ints == 0, axis=1)] = (1, 0, 0)
        k = ints * np.array([2 * np.pi / span_xy, 2 * np.pi / span_xy, np.pi / span_z])
        k_hat = k / np.linalg.norm(k, axis=1, keepdims=True)
        trial = rng.normal(size=(n_modes, 3))
        e1 = trial - np.sum(trial * k_hat, axis=1, keepdims=True) * k_hat
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        e2 = np.cross(k_hat, e1)
        self.e1, self.e2 = e1, e2
        # Larger scales carry more energy: amplitude ~ 1/|integer wavevector|.
        self.sigma = amplitude / np.linalg.norm(ints, axis=1)
        # regimes x (cos, sin) x modes: mean amplitudes in units of sigma
        largest = np.argsort(-self.sigma, kind="stable")
        self.regimes = np.zeros((3, 2, n_modes))
        self.regimes[1:, 0, largest[0]] = (3.0, -3.0)
        self.regimes[1:, 1, largest[1]] = 2.0
        xx, yy, zz = np.meshgrid(x, y, z, indexing="ij")
        phase = np.einsum("mc,cxyz->mxyz", k, np.stack([xx, yy, zz]))
        self.cos, self.sin = np.cos(phase), np.sin(phase)

    def vector(self, a: np.ndarray, b: np.ndarray, mean: tuple[float, float, float]) -> np.ndarray:
        """The (x, y, z, 3) field for cos/sin amplitudes a, b (one per mode)."""
        field = np.einsum("mc,mxyz->xyzc", a[:, None] * self.e1, self.cos)
        field += np.einsum("mc,mxyz->xyzc", b[:, None] * self.e2, self.sin)
        field += np.asarray(mean)
        return field.astype(np.float32)

    def scalar(self, a: np.ndarray) -> np.ndarray:
        return np.einsum("m,mxyz->xyz", a, self.cos)

    def amplitudes(self, rng: np.random.Generator, n_time: int, tau: float = 2.0,
                   dwell: float = 25.0) -> tuple:
        """Per-snapshot cos and sin amplitudes, each (n_time, n_modes): OU paths (correlation
        time `tau` snapshots) around the current regime's means; the regime changes with
        probability 1 / `dwell` per snapshot."""
        switches = rng.random(n_time) < 1.0 / dwell
        steps = np.where(switches, rng.integers(1, len(self.regimes), n_time), 0)
        regime = (rng.integers(len(self.regimes)) + np.cumsum(steps)) % len(self.regimes)
        a = (_ou_paths(rng, n_time, len(self.sigma), tau, 1.0) + self.regimes[regime, 0]) * self.sigma
        b = (_ou_paths(rng, n_time, len(self.sigma), tau, 1.0) + self.regimes[regime, 1]) * self.sigma
        return a, b


def _device_rng(name: str) -> np.random.Generator:
    """The fixed geometry of the demo's devices (a tokamak's modes, a chuck's heaters): the same
    in every file, whatever the file's seed and resolution, so that files pool into one density."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def _fusion_coords(n: int, nz: int, n_time: int) -> dict[str, np.ndarray]:
    return {
        "x": (-1.0 + 2.0 * np.arange(n) / n),  # periodic in x and y
        "y": (-1.0 + 2.0 * np.arange(n) / n),
        "z": np.linspace(-1.0, 1.0, nz),  # symmetric: z = 0 between the two middle planes
        "time": 1e-3 * np.arange(n_time),
    }


def _well_file(path: Path, n_traj: int, coords: dict[str, np.ndarray], name: str) -> h5py.File:
    """An open HDF5 file with the Well's root attributes and `dimensions/` group (x, y, z, time)."""
    f = h5py.File(path, "w")
    f.attrs.update({
        "dataset_name": name, "grid_type": "cartesian", "n_spatial_dims": 3,
        "n_trajectories": n_traj, "simulation_parameters": ["B0", "Ms", "Ma"],
        "B0": GUIDE_FIELD_T, "Ms": 0.5, "Ma": 0.7,
    })
    dims = f.create_group("dimensions")
    dims.attrs["spatial_dims"] = ["x", "y", "z"]
    for axis, values in coords.items():
        d = dims.create_dataset(axis, data=values)
        d.attrs.update({"units": "s" if axis == "time" else "m",
                        "sample_varying": False, "time_varying": axis == "time"})
    return f


def _well_fields(f: h5py.File, fields: dict[str, tuple[tuple[int, ...], str]], shape: tuple[int, ...]) -> None:
    """Create the Well's t0/t1/t2 field groups: {"t1_fields/name": (component shape, units)},
    datasets (traj, time, x, y, z, *components) chunked one snapshot per chunk."""
    for name, (components, units) in fields.items():
        d = f.create_dataset(name, (*shape, *components), "f4", chunks=(1, 1, *shape[2:], *components))
        d.attrs.update({"units": units, "dim_varying": [True, True, True],
                        "sample_varying": True, "time_varying": True})
    for order in ("t0_fields", "t1_fields", "t2_fields"):
        group = f.require_group(order)
        group.attrs["field_names"] = [n.split("/")[1] for n in fields if n.startswith(order + "/")]


def write_fusion_well(path, n_traj: int = 1, n_time: int = 4, n: int = 16, nz: int = 8,
                      seed: int = 0) -> Path:
    """An MHD run in the Well's layout: t1_fields/magnetic_field (traj, time, x, y, z, 3) in T.

    Also t1_fields/velocity (m/s), t0_fields/density (m^-3), a dimensions/ group and the
    Well's root attributes. Datasets are chunked one snapshot per chunk.
    """
    path = _prepare(path)
    rng = np.random.default_rng(seed)
    coords = _fusion_coords(n, nz, n_time)
    b_modes = _SolenoidalModes(_device_rng("tokamak B"), coords["x"], coords["y"], coords["z"])
    v_modes = _SolenoidalModes(_device_rng("tokamak v"), coords["x"], coords["y"], coords["z"], amplitude=2e4)
    with _well_file(path, n_traj, coords, f"MHD_{n}") as f:
        _well_fields(f, {"t0_fields/density": ((), "m^-3"), "t1_fields/magnetic_field": ((3,), "T"),
                         "t1_fields/velocity": ((3,), "m/s")}, (n_traj, n_time, n, n, nz))
        for traj in range(n_traj):
            ab, bb = b_modes.amplitudes(rng, n_time)
            av, bv = v_modes.amplitudes(rng, n_time)
            for t in range(n_time):
                f["t1_fields/magnetic_field"][traj, t] = b_modes.vector(ab[t], bb[t], (0, 0, GUIDE_FIELD_T))
                f["t1_fields/velocity"][traj, t] = v_modes.vector(av[t], bv[t], (0, 0, 0))
                # Loosely pressure-balanced: the plasma is denser where the field is weaker.
                density = 1e19 * (1.0 - 0.5 * b_modes.scalar(ab[t]) / GUIDE_FIELD_T)
                f["t0_fields/density"][traj, t] = density.astype(np.float32)
    return path


def write_fusion_states(path, magnetic_field: np.ndarray, z: np.ndarray) -> Path:
    """Given B fields in the Well's layout: t1_fields/magnetic_field = `magnetic_field`
    (traj, time, x, y, z, 3) in T, z coordinates `z`; x, y span [-1, 1) periodically."""
    path = _prepare(path)
    n_traj, n_time, nx, ny, nz, _ = magnetic_field.shape
    if len(z) != nz:
        raise ValueError(f"{len(z)} z coordinates for {nz} planes")
    coords = {"x": -1.0 + 2.0 * np.arange(nx) / nx, "y": -1.0 + 2.0 * np.arange(ny) / ny,
              "z": np.asarray(z, dtype=np.float64), "time": 1e-3 * np.arange(n_time)}
    with _well_file(path, n_traj, coords, f"MHD_{nx}x{ny}") as f:
        _well_fields(f, {"t1_fields/magnetic_field": ((3,), "T")}, magnetic_field.shape[:5])
        f["t1_fields/magnetic_field"][...] = magnetic_field.astype(np.float32)
    return path


def write_fusion_plain(path, n_time: int = 4, n: int = 16, nz: int = 8, seed: int = 0,
                       attrs: dict | None = None) -> Path:
    """A plain MHD file: root dataset B (time, x, y, z, 3) in T, root coordinates x, y, z, time.

    `attrs` become root attributes (e.g. {"capsule": "fusion"} for a metadata-only file).
    """
    path = _prepare(path)
    rng = np.random.default_rng(seed)
    coords = _fusion_coords(n, nz, n_time)
    modes = _SolenoidalModes(_device_rng("tokamak B"), coords["x"], coords["y"], coords["z"])
    a, b = modes.amplitudes(rng, n_time)
    with h5py.File(path, "w") as f:
        f.attrs["description"] = "MHD simulation output: magnetic field B(x, y, z) per snapshot"
        f.attrs.update(attrs or {})
        for name, values in coords.items():
            f.create_dataset(name, data=values).attrs["units"] = "s" if name == "time" else "m"
        field = f.create_dataset("B", (n_time, n, n, nz, 3), "f4", chunks=(1, n, n, nz, 3))
        field.attrs["units"] = "T"
        for t in range(n_time):
            field[t] = modes.vector(a[t], b[t], (0, 0, GUIDE_FIELD_T))
    return path


# --------------------------------------------------------------------------- wafer (NetCDF)


def _heat_diffusion(rng: np.random.Generator, n_time: int, n: int, n_layers: int,
                    steps_per_snapshot: int = 20) -> np.ndarray:
    """(n_time, n_layers, n, n) temperature stacks in K from explicit heat diffusion.

    Heater spots sit in the deepest layer, where the chuck has them (`_device_rng`: the same
    in every file); each one's power is redrawn (often to zero) at random between snapshots
    (`rng`). Heat spreads in-plane and between neighbouring layers and leaves through the
    surface (layer 0) to the ambient; in-plane edges are insulated. The explicit (FTCS)
    coefficients sum below 1, which keeps the scheme stable.
    """
    r, vertical, cooling = 0.15, 0.15, 0.05
    chuck = _device_rng("wafer chuck")
    n_spots = int(chuck.integers(3, 7))
    centres = chuck.uniform(0.1 * n, 0.9 * n, (n_spots, 2))
    widths = chuck.uniform(0.03 * n, 0.08 * n, n_spots) + 1.0
    full_power = chuck.uniform(60.0, 100.0, n_spots)  # K above ambient, wide-spot steady state
    yy, xx = np.mgrid[0:n, 0:n]
    shapes = np.exp(-((yy[None] - centres[:, 0, None, None]) ** 2
                      + (xx[None] - centres[:, 1, None, None]) ** 2) / (2 * widths[:, None, None] ** 2))

    def draw_power(size: int) -> np.ndarray:
        return np.where(rng.random(size) < 0.6, rng.uniform(0.3, 1.0, size), 0.0)

    power = draw_power(n_spots)
    temp = np.full((n_layers, n, n), AMBIENT_K)
    flow = np.empty_like(temp)

    def step(source: np.ndarray) -> None:
        # in-plane Laplacian with insulated edges (a missing neighbour counts as the pixel itself)
        np.multiply(temp, -4.0, out=flow)
        flow[:, 1:] += temp[:, :-1]
        flow[:, :1] += temp[:, :1]
        flow[:, :-1] += temp[:, 1:]
        flow[:, -1:] += temp[:, -1:]
        flow[:, :, 1:] += temp[:, :, :-1]
        flow[:, :, :1] += temp[:, :, :1]
        flow[:, :, :-1] += temp[:, :, 1:]
        flow[:, :, -1:] += temp[:, :, -1:]
        flow[...] *= r
        flow[1:] += vertical * (temp[:-1] - temp[1:])
        flow[:-1] += vertical * (temp[1:] - temp[:-1])
        flow[0] -= cooling * (temp[0] - AMBIENT_K)
        flow[-1] += source
        temp[...] += flow

    def heating() -> np.ndarray:
        return cooling * np.einsum("s,syx->yx", full_power * power, shapes)

    source = heating()
    for _ in range(10 * steps_per_snapshot):  # spin-up from ambient
        step(source)
    out = np.empty((n_time, n_layers, n, n), dtype=np.float32)
    for t in range(n_time):
        redraw = rng.random(n_spots) < 0.3
        power[redraw] = draw_power(int(redraw.sum()))
        source = heating()
        for _ in range(steps_per_snapshot):
            step(source)
        out[t] = temp
    return out


def write_wafer_netcdf(path, n_time: int = 4, n: int = 16, layered: bool = False,
                       units: str = "K", seed: int = 0, n_layers: int = 3,
                       file_format: str = "NETCDF4", attrs: dict | None = None,
                       noise: float = 0.05) -> Path:
    """A wafer thermal map series: surface_temperature(time, y, x), or temperature(time, layer, y, x).

    Layer 0 is the surface, seen by a thermal camera with `noise` K of white noise per pixel.
    `units` is "K" or "degC" (the values follow: ~300-400 K).
    The time dimension is unlimited; NetCDF-4 files are chunked one snapshot per chunk.
    `file_format` is any netCDF4 format, e.g. "NETCDF3_CLASSIC" for an old instrument's files;
    `attrs` are extra global attributes (e.g. {"capsule": "wafer"}).
    """
    if units not in ("K", "degC"):
        raise ValueError(f"units must be 'K' or 'degC', not {units!r}")
    rng = np.random.default_rng(seed)
    stacks = _heat_diffusion(rng, n_time, n, n_layers if layered else 1)
    stacks[:, 0] += rng.normal(0.0, noise, stacks[:, 0].shape).astype(np.float32)
    if units == "degC":
        stacks -= np.float32(273.15)
    return write_wafer_states(path, stacks if layered else stacks[:, 0], units=units,
                              file_format=file_format, attrs=attrs)


def write_wafer_states(path, temperature: np.ndarray, units: str = "K", file_format: str = "NETCDF4",
                       attrs: dict | None = None) -> Path:
    """Given temperature maps as NetCDF: (time, y, x) -> surface_temperature(time, y, x);
    (time, layer, y, x) -> temperature(time, layer, y, x), layer 0 the surface.

    A 300 mm wafer: x, y in m at the pixel centres. The time dimension is unlimited; NetCDF-4
    files are chunked one snapshot per chunk.
    """
    path = _prepare(path)
    layered = temperature.ndim == 4
    n_time, *_, ny, nx = temperature.shape
    pitch = 0.3 / max(ny, nx)
    chunked = file_format.startswith("NETCDF4")
    with netCDF4.Dataset(path, "w", format=file_format) as ds:
        ds.setncatts({"title": "Wafer thermal map", "source": "2-D heat diffusion with heater spots",
                      "Conventions": "CF-1.8", **(attrs or {})})
        ds.createDimension("time", None)
        if layered:
            ds.createDimension("layer", temperature.shape[1])
        ds.createDimension("y", ny)
        ds.createDimension("x", nx)
        time = ds.createVariable("time", "f8", ("time",))
        time.units = f"seconds since {EPOCH}"
        for axis, size in (("y", ny), ("x", nx)):
            coord = ds.createVariable(axis, "f4", (axis,))
            coord.units = "m"
            coord[:] = (np.arange(size) + 0.5) * pitch
        if layered:
            layer = ds.createVariable("layer", "i4", ("layer",))
            layer.long_name = "layer index, 0 = surface"
            layer[:] = np.arange(temperature.shape[1])
            var = ds.createVariable("temperature", "f4", ("time", "layer", "y", "x"),
                                    chunksizes=(1, *temperature.shape[1:]) if chunked else None)
        else:
            var = ds.createVariable("surface_temperature", "f4", ("time", "y", "x"),
                                    chunksizes=(1, ny, nx) if chunked else None)
        var.units = units
        var.long_name = "temperature" if layered else "wafer surface temperature"
        time[:] = np.arange(n_time, dtype=np.float64)
        var[:] = temperature.astype(np.float32)
    return path


# --------------------------------------------------------------------------- grid (CSV, Parquet)


def _grid_columns(n_rows: int, buses: int, with_phase: bool, seed: int, dt: float,
                  nominal: float, start: str) -> dict[str, np.ndarray]:
    """Timestamps (datetime64[ms]) and per-bus frequency (Hz) / phase angle (rad) columns.

    The frequency deviation is a slow system-wide OU process plus a fast local one per bus;
    the phase is the integrated deviation, phase[i] = wrap(offset + 2 pi sum_{j<=i} (f[j] - nominal) dt).
    """
    rng = np.random.default_rng(seed)
    step = np.timedelta64(int(round(dt * 1000)), "ms")
    columns: dict[str, np.ndarray] = {
        "timestamp": np.datetime64(start, "ms") + np.arange(n_rows) * step}
    system = _ou_series(rng, n_rows, tau=60.0 / dt, sigma=0.02)
    for bus in range(1, buses + 1):
        frequency = nominal + system + _ou_series(rng, n_rows, tau=5.0 / dt, sigma=0.003)
        suffix = "" if buses == 1 else f"_{bus}"
        columns[f"frequency{suffix}"] = np.round(frequency, 6)
        if with_phase:
            offset = rng.uniform(-np.pi, np.pi)
            phase = wrap_phase(offset + 2.0 * np.pi * np.cumsum(frequency - nominal) * dt)
            columns[f"phase_angle{suffix}"] = np.round(phase, 6)
    return columns


def _write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    table = pa.table({name: pa.array(values) for name, values in columns.items()})
    options = pa_csv.WriteOptions(quoting_style="none", quoting_header="none")
    pa_csv.write_csv(table, path, write_options=options)


def _iso_strings(timestamps: np.ndarray) -> np.ndarray:
    whole_seconds = not np.any(timestamps.astype("int64") % 1000)
    return np.datetime_as_string(timestamps, unit="s" if whole_seconds else "ms")


def write_grid_csv(path, n_rows: int = 1000, buses: int = 1, with_phase: bool = True,
                   seed: int = 0, dt: float = 1.0, nominal: float = 50.0,
                   start: str = EPOCH) -> Path:
    """A grid frequency log as CSV: timestamp (ISO-8601), frequency[_b] (Hz), phase_angle[_b] (rad).

    Columns carry a `_b` suffix (b = 1..buses) only when there are several buses; `dt` is the
    sample spacing in seconds (ms resolution) and `start` the first timestamp.
    """
    path = _prepare(path)
    columns = _grid_columns(n_rows, buses, with_phase, seed, dt, nominal, start)
    columns["timestamp"] = _iso_strings(columns["timestamp"])
    _write_csv(path, columns)
    return path


def write_grid_parquet(path, n_rows: int = 1000, buses: int = 1, with_phase: bool = True,
                       seed: int = 0, dt: float = 1.0, nominal: float = 50.0,
                       start: str = EPOCH, metadata: dict[str, str] | None = None) -> Path:
    """The Parquet twin of `write_grid_csv`: timestamp[ms], row groups of 25,000 rows.

    `metadata` becomes the file's key-value metadata (e.g. {"capsule": "grid"}).
    """
    path = _prepare(path)
    columns = _grid_columns(n_rows, buses, with_phase, seed, dt, nominal, start)
    table = pa.table({name: pa.array(values) for name, values in columns.items()},
                     metadata=metadata)
    pq.write_table(table, path, row_group_size=PARQUET_ROW_GROUP)
    return path


# --------------------------------------------------------------------------- text logs (grid, shots)


def _bad_rows(rng: np.random.Generator, n_rows: int, bad_fraction: float) -> np.ndarray:
    """Exactly max(1, round(bad_fraction * n_rows)) distinct rows (0 when bad_fraction is 0)."""
    n_bad = 0 if bad_fraction <= 0 else min(n_rows, max(1, round(bad_fraction * n_rows)))
    return rng.choice(n_rows, n_bad, replace=False)


def _write_lines(path: Path, lines: list[str]) -> Path:
    """One line each; a name ending in `.gz` gets a gzip stream (rotated logs)."""
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_pmu_log(path, n_rows: int = 1000, seed: int = 0, dt: float = 0.1, nominal: float = 50.0,
                  start: str = EPOCH, device: str = "PMU-07", bad_fraction: float = 0.01) -> Path:
    """A PMU event log: per sample `<ISO time>Z <device> frequency=<Hz> phase_angle=<rad> status=OK`.

    Exactly `max(1, round(bad_fraction * n_rows))` of the n_rows lines are not samples: event
    lines (`EVENT resync after GPS loss`), a value that is not a number, a line cut short. A
    name ending in `.gz` writes a gzip stream (a rotated log).
    """
    path = _prepare(path)
    rng = np.random.default_rng(seed)
    columns = _grid_columns(n_rows, 1, True, seed, dt, nominal, start)
    stamps = np.datetime_as_string(columns["timestamp"], unit="ms")
    lines = [f"{t}Z {device} frequency={f:.6f} phase_angle={p:.6f} status=OK"
             for t, f, p in zip(stamps, columns["frequency"], columns["phase_angle"], strict=True)]
    for k, i in enumerate(_bad_rows(rng, n_rows, bad_fraction)):
        lines[i] = (f"{stamps[i]}Z {device} EVENT resync after GPS loss",
                    f"{stamps[i]}Z {device} frequency=ERR phase_angle=0.0 status=FAULT",
                    lines[i][: lines[i].index(" phase_angle=")])[k % 3]
    return _write_lines(path, lines)


SHOT_VARIABLES = ("ip", "ne", "te")  # plasma current (MA), line-averaged density (1e19 m^-3), Te (keV)
SHOT_CAPSULE = textwrap.dedent("""\
    # Plasma shot log (a text log, one line per shot): Ip, line-averaged density, core Te.
    name: shots
    match:
      name: ["*shotlog*"]
    extractor: table
    variables: [ip, ne, te]
    units: [MA, 1e19 m^-3, keV]
    log:
      pattern: '^(?P<timestamp>\\S+ \\S+) \\| shot \\d+ \\| Ip=(?P<ip>\\S+) MA \\| ne=(?P<ne>\\S+) 1e19/m3 \\| Te=(?P<te>\\S+) keV'
      timestamp_format: "%Y-%m-%d %H:%M:%S"
    """)


def write_shot_capsule(config_dir) -> Path:
    """The `shots` capsule as a user writes it: `<config_dir>/capsule/shots.yaml`."""
    path = _prepare(Path(config_dir) / "capsule" / "shots.yaml")
    path.write_text(SHOT_CAPSULE, encoding="utf-8")
    return path


def write_shot_log(path, n_shots: int = 500, seed: int = 0, start: str = "2024-03-04T08:00:00",
                   bad_fraction: float = 0.02) -> Path:
    """A tokamak shot log: `<date> <time> | shot N | Ip=.. MA | ne=.. 1e19/m3 | Te=.. keV | ok`.

    Ip ~ U(0.4, 1.6) MA; ne is a Greenwald fraction (Beta(4, 3) x 0.9) of n_G = Ip / (pi a^2),
    a = 0.5 m; Te ~ 2.5 keV (Ip / 1 MA)^0.6 (ne / 4e19)^-0.4 x log-normal(0.1): three correlated
    positive scalars. Exactly `max(1, round(bad_fraction * n_shots))` lines are not records:
    disruptions without profile data, operator notes, a value that is not a number.
    """
    path = _prepare(path)
    rng = np.random.default_rng(seed)
    ip = rng.uniform(0.4, 1.6, n_shots)
    ne = 0.9 * rng.beta(4.0, 3.0, n_shots) * ip / (np.pi * 0.5**2) * 10.0
    te = 2.5 * ip**0.6 * (ne / 4.0) ** -0.4 * rng.lognormal(0.0, 0.1, n_shots)
    times = np.datetime64(start, "s") + np.cumsum(rng.integers(600, 1800, n_shots)).astype("timedelta64[s]")
    stamps = [str(t).replace("T", " ") for t in times]
    lines = [f"{t} | shot {10000 + i} | Ip={a:.4f} MA | ne={b:.4f} 1e19/m3 | Te={c:.4f} keV | ok"
             for i, (t, a, b, c) in enumerate(zip(stamps, ip, ne, te, strict=True))]
    for k, i in enumerate(_bad_rows(rng, n_shots, bad_fraction)):
        lines[i] = (f"{stamps[i]} | shot {10000 + i} | DISRUPTION at t=0.8 s - no profile data",
                    f"### {stamps[i]} shift change, operator notes follow",
                    lines[i].replace(f"Te={te[i]:.4f}", "Te=n/a"))[k % 3]
    return _write_lines(path, lines)


# --------------------------------------------------------------------------- faults and decoys


def write_metadata_only_fusion(path, n_time: int = 4, n: int = 16, nz: int = 8, seed: int = 0) -> Path:
    """A plain-layout fusion file whose only clue is the root attribute capsule="fusion"."""
    return write_fusion_plain(path, n_time=n_time, n=n, nz=nz, seed=seed, attrs={"capsule": "fusion"})


def write_truncated_hdf5(path, seed: int = 0) -> Path:
    """A valid fusion HDF5 file cut to half its length (an interrupted copy)."""
    path = write_fusion_plain(path, seed=seed)
    os.truncate(path, path.stat().st_size // 2)
    return path


def write_corrupt_parquet(path, size: int = 4096, seed: int = 0) -> Path:
    """Parquet magic at both ends and a plausible footer length, garbage everywhere else."""
    path = _prepare(path)
    body = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(b"PAR1" + body + struct.pack("<I", size // 2) + b"PAR1")
    return path


def write_junk_csv(path, n_rows: int = 200, seed: int = 0, junk_fraction: float = 0.05) -> Path:
    """A grid CSV whose frequency column holds some non-numeric entries ("n/a", "ERR", "#VALUE!")."""
    path = _prepare(path)
    rng = np.random.default_rng(seed)
    columns = _grid_columns(n_rows, 1, True, seed, 1.0, 50.0, EPOCH)
    columns["timestamp"] = _iso_strings(columns["timestamp"])
    frequency = columns["frequency"].astype(str).astype(object)
    junk_rows = rng.choice(n_rows, max(1, int(junk_fraction * n_rows)), replace=False)
    frequency[junk_rows] = rng.choice(["n/a", "ERR", "#VALUE!"], len(junk_rows))
    columns["frequency"] = frequency.astype(str)
    _write_csv(path, columns)
    return path


def write_empty(path) -> Path:
    path = _prepare(path)
    path.write_bytes(b"")
    return path


def write_readme(path) -> Path:
    """An unrelated text file, as every drive has."""
    path = _prepare(path)
    path.write_text("Lab drive 3 - campaign data.\nDo not reorganise without asking.\n"
                    "Questions: data-team@example.org\n", encoding="utf-8")
    return path


def write_png(path, size: int = 16) -> Path:
    """A real (tiny, grey gradient) PNG image: a binary decoy that no reader should claim."""
    path = _prepare(path)
    rows = b"".join(b"\x00" + bytes((x * 255 // (size - 1)) for x in range(size)) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def write_sensor_log(path, n_rows: int = 200, seed: int = 0) -> Path:
    """An unrelated CSV (lab climate log): a timestamp column but none of the capsules' columns."""
    path = _prepare(path)
    rng = np.random.default_rng(seed)
    timestamps = np.datetime64(EPOCH, "s") + np.arange(n_rows) * np.timedelta64(60, "s")
    _write_csv(path, {
        "timestamp": np.datetime_as_string(timestamps, unit="s"),
        "temperature_c": np.round(21.0 + np.cumsum(rng.normal(0, 0.05, n_rows)), 3),
        "humidity_pct": np.round(45.0 + np.cumsum(rng.normal(0, 0.1, n_rows)), 2),
        "pressure_hpa": np.round(1013.0 + np.cumsum(rng.normal(0, 0.02, n_rows)), 2),
    })
    return path


# --------------------------------------------------------------------------- trees


def _file_seed(seed: int, relpath: str) -> int:
    """Independent, reproducible seed per file, so a file's content does not depend on the others."""
    return int(np.random.SeedSequence([seed, zlib.crc32(relpath.encode())]).generate_state(1)[0])


def _split(total: int, cap: int) -> list[int]:
    """Split `total` samples into near-equal files of at most `cap` samples."""
    n_files = max(1, -(-total // cap))
    return [total // n_files + (i < total % n_files) for i in range(n_files)]


class _Tree:
    """Writes files under a root and keeps the summary (per capsule and per file)."""

    def __init__(self, root: Path, seed: int):
        self.root, self.seed = root, seed
        self.files: dict[str, dict] = {}
        self.skipped: list[str] = []
        self.symlinks: dict[str, str] = {}

    def add(self, relpath: str, capsule: str | None, kind: str, write: Callable, *,
            seeded: bool = True, hidden: bool = False, **kwargs) -> None:
        """Write one file; `seeded` writers get a seed derived from the tree's seed and the path."""
        if seeded:
            kwargs["seed"] = _file_seed(self.seed, relpath)
        path = write(self.root / relpath, **kwargs)
        if hidden:
            self.skipped.append(relpath)
        else:
            self.files[relpath] = {"capsule": capsule, "kind": kind, "bytes": path.stat().st_size}

    def add_series(self, relpath: str, capsule: str, kind: str, write: Callable, samples_arg: str,
                   total: int, cap: int, **kwargs) -> None:
        """One file, or several (`name.ext`, `name_part2.ext`, ...) when `total` exceeds `cap` per file."""
        stem, dot, ext = relpath.rpartition(".")
        for i, count in enumerate(_split(total, cap)):
            name = relpath if i == 0 else f"{stem}_part{i + 1}{dot}{ext}"
            self.add(name, capsule, kind, write, **{samples_arg: count}, **kwargs)

    def symlink(self, relpath: str, target: str) -> None:
        link = self.root / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(link):
            link.unlink()
        try:
            os.symlink(target, link, target_is_directory=True)
        except (OSError, NotImplementedError):
            return  # e.g. Windows without the privilege: the tree is still valid without it
        self.symlinks[relpath] = target

    def summary(self) -> dict:
        capsules: dict[str, dict[str, int]] = {}
        for entry in self.files.values():
            slot = capsules.setdefault(entry["capsule"] or "none", {"files": 0, "bytes": 0})
            slot["files"] += 1
            slot["bytes"] += entry["bytes"]
        return {
            "root": str(self.root),
            "total_files": len(self.files),
            "total_bytes": sum(e["bytes"] for e in self.files.values()),
            "capsules": dict(sorted(capsules.items())),
            "files": self.files,
            "skipped": self.skipped,
            "symlinks": self.symlinks,
        }


FUSION_N, FUSION_NZ = 16, 4  # the demo's B field: 3 x 16 x 16 on the plane (D = 768)
WAFER_N = 32  # the demo's wafer maps: 32 x 32 (D = 1024)


def make_demo_tree(root, scale: float = 1.0, seed: int = 0, *, n: int | None = None,
                   config_dir: str | os.PathLike | None = None) -> dict:
    """Write the demo drive under `root` and return its summary.

    Summary keys: root, total_files, total_bytes, capsules {name or "none": {files, bytes}},
    files {relpath: {capsule (what a correct crawl assigns, even for faulty files), kind, bytes}},
    skipped (hidden files a crawl must not see), symlinks {relpath: target}, config_dir.
    `scale` multiplies sample counts (snapshots, rows); past the per-file caps it adds files.

    Field capsules get thousands of snapshots (~2,900 fusion, ~3,600 wafer at scale 1) at a
    resolution the demo's CPU training generalises from within its step budget: fusion planes
    3 x 16 x 16 (volumes of 4 z-planes, ~80 MB), wafer maps 32 x 32. The field density models
    their leading principal coefficients (12 for the fusion modes, ~10-20 for the wafer),
    whatever the resolution, but the data, the statistics pass (exact D x D covariance up to
    D = 2048) and each step's projection grow with it; native 64 x 64 maps (`n=64`) need ~10x
    the bytes per snapshot. `n` sets both resolutions (tests use tiny maps).
    With `config_dir`, the `shots` user capsule is written there (`capsule/shots.yaml`, pass
    the folder with `--config-dir`) and its plasma shot log into the tree; without, neither.
    """
    root = Path(root)
    tree = _Tree(root, seed)
    n_fusion, n_wafer = (FUSION_N, WAFER_N) if n is None else (n, n)

    def count(base: int, minimum: int) -> int:
        return max(minimum, round(base * scale))

    snaps, snap_cap = (lambda base: count(base, 2)), 1000
    rows, row_cap = (lambda base: count(base, 100)), 2_000_000
    maps, map_cap = (lambda base: count(base, 2)), 2000

    mhd = "campaigns/2024/mhd"
    tree.add_series(f"{mhd}/MHD_{n_fusion}_run01.h5", "fusion", "well", write_fusion_well, "n_time",
                    snaps(400), snap_cap, n_traj=2, n=n_fusion, nz=FUSION_NZ)
    tree.add_series(f"{mhd}/MHD_{n_fusion}_run02.h5", "fusion", "well", write_fusion_well, "n_time",
                    snaps(500), snap_cap, n=n_fusion, nz=FUSION_NZ)
    tree.add_series(f"{mhd}/plasma_shot_1042.h5", "fusion", "plain", write_fusion_plain, "n_time",
                    snaps(800), snap_cap, n=n_fusion, nz=FUSION_NZ)
    tree.add_series(f"{mhd}/plasma_shot_1043.h5", "fusion", "plain", write_fusion_plain, "n_time",
                    snaps(800), snap_cap, n=n_fusion, nz=FUSION_NZ)
    tree.add("campaigns/2024/photos/IMG_0001.png", None, "decoy", write_png, seeded=False)
    tree.add(f"{mhd}/MHD_empty.h5", "fusion", "empty", write_empty, seeded=False)

    for lot, units in (("lot_17", "K"), ("lot_18", "degC")):
        suffix = "" if units == "K" else "_degC"
        tree.add_series(f"fab/{lot}/wafer_{lot}_surface{suffix}.nc", "wafer", "surface",
                        write_wafer_netcdf, "n_time", maps(1000), map_cap, n=n_wafer, units=units)
        tree.add_series(f"fab/{lot}/thermal_stack_{lot}{suffix}.nc", "wafer", "layered",
                        write_wafer_netcdf, "n_time", maps(600), map_cap, n=n_wafer, layered=True,
                        units=units)

    tree.add_series("grid/2024/grid_frequency_2024_01.csv", "grid", "one_bus", write_grid_csv,
                    "n_rows", rows(100_000), row_cap, start="2024-01-01T00:00:00")
    tree.add_series("grid/2024/grid_frequency_2024_02.parquet", "grid", "one_bus",
                    write_grid_parquet, "n_rows", rows(100_000), row_cap, start="2024-02-01T00:00:00")
    tree.add_series("grid/2024/grid_frequency_2024_03.parquet", "grid", "three_buses",
                    write_grid_parquet, "n_rows", rows(100_000), row_cap, buses=3,
                    start="2024-03-01T00:00:00")
    tree.add_series("grid/2024/grid_frequency_2024_04.csv", "grid", "no_phase", write_grid_csv,
                    "n_rows", rows(50_000), row_cap, with_phase=False, start="2024-04-01T00:00:00")
    tree.add("grid/2024/grid_frequency_2024_05.csv", "grid", "junk", write_junk_csv)
    tree.add("grid/2024/grid_frequency_2024_06.parquet", "grid", "corrupt", write_corrupt_parquet)
    # PMU event logs: the current one, two rotated ones (the older compressed), and a station
    # whose file name says nothing (its key=value lines assign it to grid)
    for name, day in (("pmu_grid_07.log", 3), ("pmu_grid_07.log.1", 2), ("pmu_grid_07.log.2.gz", 1)):
        tree.add(f"grid/pmu/{name}", "grid", "event_log", write_pmu_log, n_rows=min(rows(20_000), row_cap),
                 start=f"2024-05-0{day}T00:00:00")
    tree.add("grid/pmu/station_12_events.log", "grid", "log_by_content", write_pmu_log,
             n_rows=min(rows(10_000), row_cap), device="PMU-12", start="2024-05-01T00:00:00")

    old = "archive/2023/q4"
    tree.add_series(f"{old}/MHD_32_legacy.h5", "fusion", "well", write_fusion_well, "n_time",
                    snaps(8), snap_cap, n=32, nz=4)
    tree.add_series(f"{old}/wafer_legacy.nc", "wafer", "surface_classic", write_wafer_netcdf,
                    "n_time", maps(400), map_cap, n=n_wafer, file_format="NETCDF3_CLASSIC")
    tree.add_series(f"{old}/grid_frequency_2023_12.parquet", "grid", "one_bus", write_grid_parquet,
                    "n_rows", rows(50_000), row_cap, start="2023-12-01T00:00:00")
    tree.add(f"{old}/backup/MHD_{n_fusion}_run01_partial.h5", "fusion", "truncated", write_truncated_hdf5)

    tree.add("README.txt", None, "decoy", write_readme, seeded=False)
    tree.add("lab/sensor_log.csv", None, "decoy", write_sensor_log)
    tree.add("lab/run_0007.h5", "fusion", "metadata_only", write_metadata_only_fusion, n=n_fusion, nz=FUSION_NZ)
    tree.add(".cache/MHD_cached.h5", "fusion", "hidden", write_fusion_plain, hidden=True, n=8, nz=2)
    tree.symlink("archive/2023/loop", "..")
    if config_dir is not None:
        write_shot_capsule(config_dir)
        tree.add("campaigns/2024/shots/shotlog_2024_03.log", "shots", "shot_log", write_shot_log,
                 n_shots=min(count(2_000, 100), row_cap))
    return {**tree.summary(), "config_dir": None if config_dir is None else str(config_dir)}


# (weight, name prefix, extension, capsule, writer, kwargs): mostly data files of a few KB.
_SMALL_FILE_MIX: list[tuple[float, str, str, str | None, Callable, dict]] = [
    (5.0, "grid_frequency", "csv", "grid", write_grid_csv, {"n_rows": 60}),
    (2.0, "grid_frequency", "parquet", "grid", write_grid_parquet, {"n_rows": 60}),
    (1.0, "grid_frequency_3bus", "parquet", "grid", write_grid_parquet, {"n_rows": 40, "buses": 3}),
    (2.0, "MHD_small", "h5", "fusion", write_fusion_plain, {"n_time": 2, "n": 4, "nz": 2}),
    (1.0, "plasma_well", "h5", "fusion", write_fusion_well, {"n_time": 2, "n": 4, "nz": 2}),
    (1.0, "wafer", "nc", "wafer", write_wafer_netcdf, {"n_time": 2, "n": 8}),
    (1.0, "thermal_legacy", "nc", "wafer", write_wafer_netcdf,
     {"n_time": 2, "n": 8, "file_format": "NETCDF3_CLASSIC"}),
    (1.0, "notes", "txt", None, lambda path, seed: write_readme(path), {}),
    (1.0, "sensor_log", "csv", None, write_sensor_log, {"n_rows": 30}),
    (0.3, "grid_frequency_junk", "csv", "grid", write_junk_csv, {"n_rows": 40}),
    (0.2, "MHD_empty", "h5", "fusion", lambda path, seed: write_empty(path), {}),
]


def make_many_small_files(root, n_files: int = 10_000, seed: int = 0, *, variants: int = 8,
                          per_folder: int = 50) -> dict:
    """A tree of `n_files` tiny files (a few KB; mostly data, some decoys and faults) for the crawl benchmark.

    Files sit `per_folder` to a folder, two levels deep (set_NN/day_NN/). Each kind of file
    is generated in `variants` versions; the rest are byte copies of those, which keeps
    10,000 files to seconds. Returns the same summary as `make_demo_tree`.
    """
    root = Path(root)
    tree = _Tree(root, seed)
    rng = np.random.default_rng(seed)
    weights = np.array([kind[0] for kind in _SMALL_FILE_MIX])
    choices = rng.choice(len(_SMALL_FILE_MIX), n_files, p=weights / weights.sum())
    pool: dict[tuple[int, int], bytes] = {}
    for i, k in enumerate(choices):
        _, prefix, ext, capsule, write, kwargs = _SMALL_FILE_MIX[k]
        leaf = i // per_folder
        folder = f"set_{leaf // 10:02d}/day_{leaf % 10:02d}"
        relpath = f"{folder}/{prefix}_{i:05d}.{ext}"
        variant = (int(k), int(rng.integers(variants)))
        path = root / relpath
        if i % per_folder == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        if variant in pool:
            path.write_bytes(pool[variant])
        else:
            write(path, seed=_file_seed(seed, f"{variant}"), **kwargs)
            pool[variant] = path.read_bytes()
        tree.files[relpath] = {"capsule": capsule, "kind": prefix, "bytes": len(pool[variant])}
    return tree.summary()
