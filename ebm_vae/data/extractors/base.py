"""What every state extractor offers: a plan per file (at crawl time) and state vectors per range.

An extractor turns a file of its capsule into float32 state vectors in physical units,
C-order over `StateInfo.shape`. It never loads a whole file: `iter_states` reads the range
[start, stop) of the plan's extent a chunk at a time.
"""

from __future__ import annotations

import functools
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ebm_vae.config import CapsuleConfig
from ebm_vae.data.readers import READERS
from ebm_vae.data.readers.base import ArrayHandle, FileInfo, ReadOptions, TableHandle, VariableInfo


class ExtractError(Exception):
    """A file of the capsule that cannot give its states, e.g. "missing variables ['Bx']"."""


@dataclass(frozen=True)
class StateInfo:
    kind: str  # "vector" (MLP) or "field" (conv)
    shape: tuple[int, ...]  # (D,) or (C, H, W), channels first
    names: tuple[str, ...]  # one per flat component, C-order: "frequency", "Bx[0,0]", ...
    units: tuple[str, ...]  # one per flat component
    channel_names: tuple[str, ...] = ()  # fields: (Bx, By, Bz) / (surface_temperature,)
    channel_units: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    def to_dict(self) -> dict[str, Any]:
        """Compact plain dict (checkpoint hparams, JSON): field names are regenerated, not stored."""
        d = {"kind": self.kind, "shape": list(self.shape), "channel_names": list(self.channel_names),
             "channel_units": list(self.channel_units)}
        if self.kind != "field":
            d.update(names=list(self.names), units=list(self.units))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateInfo:
        if d["kind"] == "field":
            return cls.field(d["channel_names"], d["channel_units"], tuple(d["shape"][1:]))
        return cls(kind=d["kind"], shape=tuple(d["shape"]), names=tuple(d["names"]),
                   units=tuple(d["units"]), channel_names=tuple(d.get("channel_names", ())),
                   channel_units=tuple(d.get("channel_units", ())))

    @classmethod
    def field(cls, channel_names: Sequence[str], channel_units: Sequence[str],
              spatial: tuple[int, ...]) -> StateInfo:
        """A (C, H, W) field state; flat names follow the C-order reshape: Bx[0,0], Bx[0,1], ..."""
        return _field_state(tuple(channel_names), tuple(channel_units), tuple(spatial))


@functools.lru_cache(maxsize=64)
def _field_state(channel_names: tuple[str, ...], channel_units: tuple[str, ...],
                 spatial: tuple[int, ...]) -> StateInfo:
    """Cached: the crawl plans every file of a capsule, and 12,288 pixel names per file add up."""
    pixels = list(itertools.product(*(range(n) for n in spatial)))
    names = tuple(f"{c}[{','.join(map(str, ij))}]" for c in channel_names for ij in pixels)
    units = tuple(u for u in channel_units for _ in pixels)
    return StateInfo(kind="field", shape=(len(channel_names), *spatial), names=names, units=units,
                     channel_names=channel_names, channel_units=channel_units)


@dataclass(frozen=True)
class FilePlan:
    n_samples: int  # states this file yields (rows x buses, trajectories x times, ...)
    extent: int  # the addressable length work units split: rows/snapshots, or bytes for CSV
    state: StateInfo  # the state this file yields (fields: its own H x W)
    whole_file: bool = False  # True when states depend on earlier rows (integrated phase)


class Extractor(ABC):
    """One per kind of state; registered in `ebm_vae.data.extractors.EXTRACTORS` under `name`."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # formats it can read

    def __init__(self, capsule: CapsuleConfig):
        self.capsule = capsule
        self.read_options = read_options(capsule)

    def column(self, variable: str) -> str:
        """The column/variable as written in the files for a capsule variable (`columns:`)."""
        return self.capsule.columns.get(variable, variable)

    def open(self, path: str | os.PathLike, fmt: str) -> ArrayHandle | TableHandle:
        """A file of the capsule opened as the capsule reads it (CSV skip_rows, log rule)."""
        return READERS[fmt].open(Path(path), self.read_options)

    def check_format(self, info: FileInfo) -> None:
        if info.format not in self.formats:
            raise ExtractError(f"format '{info.format}' not supported by the {self.name} extractor "
                               f"(reads {', '.join(self.formats)})")

    @abstractmethod
    def plan(self, info: FileInfo) -> FilePlan:
        """From metadata alone; raise ExtractError naming what is missing or wrong."""

    @abstractmethod
    def iter_states(self, handle: ArrayHandle | TableHandle, plan: FilePlan, start: int,
                    stop: int, chunk: int) -> Iterator[np.ndarray]:
        """Yield float32 arrays of the states over [start, stop) of `plan.extent`, one state per
        row: (n, D), or (n, *state.shape) in any memory layout (a field read channels-last
        yields its channels-first view: the training shuffle's one copy of each state then
        transposes it; `flat_states` gives (n, D) to every other reader).

        NaN/Inf values pass through (the stream counts and drops them).
        """


def flat_states(states: np.ndarray) -> np.ndarray:
    """(n, D) C-contiguous states from what `iter_states` yields (a copy only of a strided view)."""
    return np.ascontiguousarray(states).reshape(len(states), -1)


def read_options(capsule: CapsuleConfig) -> ReadOptions:
    """How a capsule's files are read: lines above a CSV header, and its log rule, whose
    fields are the variables (the `log.pattern` group of each, or its key as written)."""
    fields = tuple((capsule.columns.get(v, v), v if capsule.log.pattern else capsule.columns.get(v, v))
                   for v in capsule.variables)
    return ReadOptions(skip_rows=capsule.csv.skip_rows, log_pattern=capsule.log.pattern, log_fields=fields,
                       timestamp_format=capsule.log.timestamp_format)


def variables_of(source: FileInfo | ArrayHandle | TableHandle) -> dict[str, VariableInfo]:
    """Name -> VariableInfo, from a FileInfo (crawl time) or an open handle (stream time).

    Extractors derive their layout from this one mapping, so `plan` and `iter_states` agree.
    """
    if isinstance(source, FileInfo):
        return {v.name: v for v in source.variables}
    if isinstance(source, TableHandle):
        return dict(source.columns)
    return dict(source.variables)


def require(variables: dict[str, VariableInfo], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in variables]
    if missing:
        raise ExtractError(f"missing variables {missing}")


def require_numeric(variables: dict[str, VariableInfo], names: Sequence[str]) -> None:
    """Refuse text columns at plan time (crawl), not halfway through a read."""
    text = [n for n in names if not _numeric(variables[n].dtype)]
    if text:
        raise ExtractError(f"variables {text} are not numeric ({[variables[n].dtype for n in text]})")


def _numeric(dtype: str) -> bool:
    try:
        return np.dtype(dtype).kind in "biuf"
    except TypeError:  # a type numpy does not know (e.g. an HDF5 compound or string type name)
        return False


def table_extent(info: FileInfo) -> tuple[int, int]:
    """(n_rows, extent) of a table file: rows for Parquet, bytes (split at line ends) for CSV and logs."""
    if info.n_rows is None:
        raise ExtractError(f"the {info.format} reader reported no row count")
    extent = info.extent if info.extent is not None else (None if READERS[info.format].byte_extent else info.n_rows)
    if extent is None:
        raise ExtractError(f"the {info.format} reader reported no byte extent")
    return int(info.n_rows), int(extent)


def pool_factor(params: dict[str, Any]) -> int:
    pool = int(params.get("pool", 1) or 1)
    if pool < 1:
        raise ExtractError(f"params.pool must be >= 1, got {pool}")
    return pool


def avg_pool(block: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool the last two axes by `factor`; trailing rows/columns that do not fill a
    whole window are dropped (so H, W = floor(H / factor), floor(W / factor))."""
    if factor == 1:
        return block
    *lead, h, w = block.shape
    hp, wp = h // factor, w // factor
    block = block[..., : hp * factor, : wp * factor]
    return block.reshape(*lead, hp, factor, wp, factor).mean(axis=(-3, -1), dtype=np.float32)
