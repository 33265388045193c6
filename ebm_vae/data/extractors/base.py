"""What every state extractor offers: a plan per file (at crawl time) and state vectors per range.

An extractor turns a file of its capsule into flat float32 state vectors in physical units,
C-order over `StateInfo.shape`. It never loads a whole file: `iter_states` reads the range
[start, stop) of the plan's extent a chunk at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ebm_vae.config import CapsuleConfig
from ebm_vae.data.readers.base import ArrayHandle, FileInfo, TableHandle


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
        return {"kind": self.kind, "shape": list(self.shape), "names": list(self.names),
                "units": list(self.units), "channel_names": list(self.channel_names),
                "channel_units": list(self.channel_units)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateInfo:
        return cls(kind=d["kind"], shape=tuple(d["shape"]), names=tuple(d["names"]),
                   units=tuple(d["units"]), channel_names=tuple(d.get("channel_names", ())),
                   channel_units=tuple(d.get("channel_units", ())))


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

    @abstractmethod
    def plan(self, info: FileInfo) -> FilePlan:
        """From metadata alone; raise ExtractError naming what is missing or wrong."""

    @abstractmethod
    def iter_states(self, handle: ArrayHandle | TableHandle, plan: FilePlan, start: int,
                    stop: int, chunk: int) -> Iterator[np.ndarray]:
        """Yield float32 arrays (n, D) of states over [start, stop) of `plan.extent`.

        NaN/Inf values pass through (the stream counts and drops them).
        """
