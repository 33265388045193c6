"""Power-grid states: frequency (Hz) and phase angle (rad) per sample, for one bus or many.

Columns: `frequency` / `phase_angle` for one bus, or `frequency_<b>` / `phase_angle_<b>` for
several (buses sorted naturally: 1, 2, 10); the capsule's `columns:` may rename the two
(`frequency: "Freq (Hz)"`, then `Freq (Hz)_<b>` per bus). Text logs give the same columns
from `frequency=... phase_angle=...` tokens (or the capsule's `log.pattern`). `params.per_bus` true: every (row, bus) is its own
2-D sample [frequency, phase_angle] (n_samples = rows x buses); false: one state per row,
[f_1, phi_1, f_2, phi_2, ...]. `params.buses` (optional) rejects files with another bus count.

A bus without a phase column gets the phase derived from its frequency,
phi(t_k) = wrap(2 pi * integral_{t_0}^{t_k} (f - params.nominal_frequency) dt) by the trapezoid
rule over the `timestamp` column (float seconds: the readers convert timestamp types; t_0 is
the file's first row). That needs every earlier row, so such a file is planned `whole_file`
and streamed batch by batch with the running phase carried across batches. A missing
frequency counts as nominal and an interval with a missing timestamp adds nothing, so one bad
row does not poison the rest of the file. All phases are wrapped to (-pi, pi].
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ebm_vae.data.extractors.base import (
    ExtractError,
    Extractor,
    FilePlan,
    StateInfo,
    require_numeric,
    table_extent,
    variables_of,
)
from ebm_vae.data.readers.base import FileInfo, TableHandle, VariableInfo

TWO_PI = 2.0 * np.pi
# rad; beyond any real unwrapped phase (2 pi x 1 Hz x 100 years ~ 2e10), and where float64
# still resolves 1e-4 rad: larger values are corrupt, and wrapping them would give noise.
PHASE_LIMIT = 1e12
FLOAT32_MAX = float(np.finfo(np.float32).max)


def wrap_phase(phase: np.ndarray) -> np.ndarray:
    """Map angles to (-pi, pi] (pi stays pi, -pi becomes pi); |phase| >= PHASE_LIMIT becomes
    +/-inf (counted and dropped downstream like any non-finite value), never a random angle."""
    if phase.size and phase.min() > -np.pi and phase.max() <= np.pi:  # the usual case, 10x cheaper
        return phase
    with np.errstate(invalid="ignore"):  # inf - inf: NaN stays NaN
        wrapped = np.pi - np.mod(np.pi - phase, TWO_PI)
    return np.where(np.abs(phase) >= PHASE_LIMIT, np.copysign(np.inf, phase), wrapped)


@dataclass(frozen=True)
class _Bus:
    label: str  # "" for a single-bus file
    frequency: str
    phase: str | None  # None: derived from the frequency


def _bus_order(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


class PhaseIntegrator:
    """Running trapezoid integral of 2 pi (f - f0) dt, carried across the batches of one file."""

    def __init__(self, nominal_frequency: float, n_buses: int):
        self.nominal = nominal_frequency
        self.phase = np.zeros(n_buses)  # kept wrapped so that float64 keeps its precision
        self.last_time = np.nan  # NaN before the first row: the first interval adds nothing
        self.last_deviation = np.zeros(n_buses)
        self.origin: float | None = None  # the first timestamp (offsets keep float64 precision)

    def seconds(self, timestamps: np.ndarray) -> np.ndarray:
        """Float seconds (the readers' timestamps) as offsets from the file's first timestamp."""
        seconds = np.asarray(timestamps, dtype=np.float64)
        if self.origin is None:
            finite = seconds[np.isfinite(seconds)]
            self.origin = float(finite[0]) if finite.size else None
        return seconds - (self.origin or 0.0)

    def __call__(self, timestamps: np.ndarray, frequency: np.ndarray) -> np.ndarray:
        """Phase (rows, buses) for the next rows of the file, wrapped to (-pi, pi]."""
        t = self.seconds(timestamps)
        frequency = np.asarray(frequency, dtype=np.float64)
        # A frequency the float32 state cannot hold (its row is dropped) counts as missing too.
        deviation = np.where(np.abs(frequency) <= FLOAT32_MAX, frequency - self.nominal, 0.0)
        dt = np.diff(t, prepend=self.last_time)
        dt[~np.isfinite(dt)] = 0.0
        previous = np.concatenate([self.last_deviation[None, :], deviation[:-1]])
        phase = self.phase + TWO_PI * np.cumsum(0.5 * (deviation + previous) * dt[:, None], axis=0)
        self.phase = wrap_phase(phase[-1])
        self.last_time, self.last_deviation = t[-1], deviation[-1]
        return wrap_phase(phase)


class GridExtractor(Extractor):
    name = "grid"
    formats = ("csv", "parquet", "log")

    def _buses(self, variables: dict[str, VariableInfo]) -> list[_Bus]:
        frequency, phase = self.column("frequency"), self.column("phase_angle")
        bus_column = re.compile(rf"^{re.escape(frequency)}_(\w+)$")
        labels = sorted((m.group(1) for n in variables if (m := bus_column.match(n))), key=_bus_order)
        if labels:
            buses = [_Bus(b, f"{frequency}_{b}", f"{phase}_{b}") for b in labels]
        elif frequency in variables:
            buses = [_Bus("", frequency, phase)]
        else:
            raise ExtractError(f"missing variables [{frequency!r}]")
        buses = [b if b.phase in variables else _Bus(b.label, b.frequency, None) for b in buses]
        expected = self.capsule.params.get("buses")
        if expected is not None and int(expected) != len(buses):
            raise ExtractError(f"expected {int(expected)} buses, file has {len(buses)}")
        if any(b.phase is None for b in buses) and "timestamp" not in variables:
            raise ExtractError("missing variables ['timestamp'] (needed to derive the phase angle)")
        require_numeric(variables, [c for b in buses for c in (b.frequency, b.phase) if c is not None])
        return buses

    @property
    def per_bus(self) -> bool:
        return bool(self.capsule.params.get("per_bus", True))

    def _state(self, buses: list[_Bus]) -> StateInfo:
        if self.per_bus or len(buses) == 1:
            return StateInfo("vector", (2,), ("frequency", "phase_angle"), ("Hz", "rad"))
        names = tuple(f"{q}_{b.label}" for b in buses for q in ("frequency", "phase_angle"))
        return StateInfo("vector", (2 * len(buses),), names, ("Hz", "rad") * len(buses))

    def plan(self, info: FileInfo) -> FilePlan:
        self.check_format(info)
        buses = self._buses(variables_of(info))
        n_rows, extent = table_extent(info)
        n_samples = n_rows * len(buses) if self.per_bus else n_rows
        return FilePlan(n_samples=n_samples, extent=extent, state=self._state(buses),
                        whole_file=any(b.phase is None for b in buses))

    def iter_states(self, handle: TableHandle, plan: FilePlan, start: int, stop: int,
                    chunk: int) -> Iterator[np.ndarray]:
        buses = self._buses(variables_of(handle))
        derived = [i for i, b in enumerate(buses) if b.phase is None]
        if derived and (start, stop) != (0, plan.extent):
            raise ExtractError("a derived phase angle needs the whole file in one range")
        columns = [b.frequency for b in buses] + [b.phase for b in buses if b.phase is not None]
        columns += ["timestamp"] if derived else []
        integrate = PhaseIntegrator(float(self.capsule.params.get("nominal_frequency", 50.0)), len(derived))
        for batch in handle.iter_batches(columns, start, stop, batch_rows=chunk):
            n = len(batch[buses[0].frequency])
            if n == 0:
                continue
            out = np.empty((n, len(buses), 2), dtype=np.float32)
            for i, bus in enumerate(buses):
                out[:, i, 0] = batch[bus.frequency]
                if bus.phase is not None:
                    out[:, i, 1] = wrap_phase(batch[bus.phase])
            if derived:
                frequency = np.stack([batch[buses[i].frequency] for i in derived], axis=1)
                out[:, derived, 1] = integrate(batch["timestamp"], frequency)
            yield out.reshape(n * len(buses), 2) if self.per_bus else out.reshape(n, -1)
