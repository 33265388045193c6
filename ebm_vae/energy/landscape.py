"""The landscape: every capsule's map and checkpoint, catalogued in `energy_maps/landscape.json`.

    land = EnergyLandscape.open("energy_maps/")      # root: the folder above it (paths.root)
    land.capsules                                    # ['fusion', 'grid', ...]
    land.map("grid"), land.model("grid")             # EnergyMap, EnergyModel
    result = land.energy("grid", states)             # full states -> the checkpoint,
    result.energy, result.source                     # states on the map's axes -> the map

`ebm-vae-build` writes the catalogue (atomically, after every capsule). It is plain JSON:
one entry per capsule with its method and quantity, the map's axes and units, the files,
bytes and samples behind it, the checkpoint, creation time, quality figures and the command
that reproduces it. Every path in it is relative to the landscape's root, `paths.root`.

Opening a landscape trusts nothing in the file: it is parsed as JSON (no YAML tags, no
pickles), every field is type-checked, and a path that is absolute, climbs with `..`, or
resolves (symlinks followed) outside the root is refused with one line naming the entry. The
root itself comes from the caller (default: the folder above the catalogue's), never from
the file, so a tampered catalogue cannot widen it. Maps load with `allow_pickle=False` and
checkpoints with `weights_only=True`: loading runs no code.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ebm_vae import __version__
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.energy.mapfile import EnergyMap, json_safe
from ebm_vae.energy.states import StateBatch, StatesError, as_array, validated_states
from ebm_vae.errors import UserError
from ebm_vae.io import atomic_write_text

FILENAME = "landscape.json"
FORMAT = "ebm-vae-landscape"
VERSION = 1
MAX_BYTES = 64 * 2**20  # a catalogue of thousands of capsules is a few MB; refuse anything huge
MAP_CHUNK_ROWS = 1 << 18  # states per interpolation chunk (bounded temporaries for any N)


class LandscapeError(UserError, ValueError):
    """A landscape that cannot be used, or a capsule it lacks; the message is one line."""


# -- the catalogue ----------------------------------------------------------------------


@dataclass
class LandscapeEntry:
    """One capsule's map, as `ebm-vae-build` made it. Paths are POSIX, relative to the root."""

    capsule: str
    method: str  # the map's metadata method: vae-elbo, vae-iwae, histogram
    quantity: str  # marginal | slice
    map: str  # energy_maps/<capsule>.npz
    axes: list[dict[str, Any]]  # [{name, unit, limits: [lo, hi], points}]
    state: dict[str, Any]  # StateInfo.to_dict(): kind, shape, names/units or channels
    data: dict[str, int]  # files, bytes, samples behind the map; skipped_files, skipped_rows
    created: str
    command: str  # reproduces the map with the per-stage commands
    method_reason: str | None = None
    plot: str | None = None
    checkpoint: str | None = None  # checkpoints/<capsule>/last.ckpt, or None (histogram)
    quality: dict[str, float | None] = field(default_factory=dict)  # val/iwae, ... or empty_fraction
    training: dict[str, Any] | None = None  # {mode, seconds, steps} of the run behind the checkpoint
    fingerprint: dict[str, str] = field(default_factory=dict)  # data / train / export settings
    outputs: dict[str, Any] = field(default_factory=dict)  # {map|checkpoint: {size, mtime_ns}}

    @property
    def state_info(self) -> StateInfo:
        return StateInfo.from_dict(self.state)

    @property
    def axis_names(self) -> list[str]:
        return [a["name"] for a in self.axes]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "capsule": (str,), "method": (str,), "quantity": (str,), "map": (str,), "axes": (list,),
    "state": (dict,), "data": (dict,), "created": (str,), "command": (str,),
    "method_reason": (str, type(None)), "plot": (str, type(None)), "checkpoint": (str, type(None)),
    "quality": (dict,), "training": (dict, type(None)), "fingerprint": (dict,), "outputs": (dict,),
}
_REQUIRED = ("capsule", "method", "quantity", "map", "axes", "state", "data", "created", "command")


def _entry_from_json(name: str, raw: Any, where: str) -> LandscapeEntry:
    """Type-check one entry; anything unexpected is a LandscapeError naming the key."""
    if not isinstance(raw, dict):
        raise LandscapeError(f"{where}: entry '{name}' must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_ENTRY_TYPES))
    if unknown:
        raise LandscapeError(f"{where}: entry '{name}' has unknown key '{unknown[0]}'")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise LandscapeError(f"{where}: entry '{name}' lacks '{missing[0]}'")
    for key, value in raw.items():
        if not isinstance(value, _ENTRY_TYPES[key]) or isinstance(value, bool):
            raise LandscapeError(f"{where}: entry '{name}'.{key} must be "
                                 f"{' or '.join(t.__name__ for t in _ENTRY_TYPES[key])}, got {type(value).__name__}")
    if raw["capsule"] != name:
        raise LandscapeError(f"{where}: entry '{name}' describes capsule '{raw['capsule']}'")
    for i, axis in enumerate(raw["axes"]):
        if not (isinstance(axis, dict) and isinstance(axis.get("name"), str)
                and isinstance(axis.get("unit", ""), str)):
            raise LandscapeError(f"{where}: entry '{name}'.axes[{i}] must be an object with a string 'name'")
    for key, value in raw["data"].items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise LandscapeError(f"{where}: entry '{name}'.data.{key} must be an integer or null")
    for key, value in raw["quality"].items():
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise LandscapeError(f"{where}: entry '{name}'.quality.{key} must be a number or null")
    try:
        StateInfo.from_dict(raw["state"])
        if not isinstance(raw["state"]["shape"], list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31 for n in raw["state"]["shape"]):
            raise TypeError("shape must be a list of positive integers")
    except (KeyError, TypeError, ValueError) as exc:
        raise LandscapeError(f"{where}: entry '{name}'.state is not a state description: {exc}") from None
    return LandscapeEntry(**raw)


def relative_path(path: str | os.PathLike, root: Path) -> str:
    """`path` as a POSIX path relative to `root`; a ValueError when it lies outside."""
    resolved, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        raise ValueError(f"{path} lies outside the landscape's root {root}") from None


def resolve_inside(text: str, root: Path, what: str) -> Path:
    """A catalogue path, resolved under `root`; refused when absolute, `..`, or leading outside."""
    pure = PurePosixPath(text)
    if not text or "\x00" in text or "\\" in text or pure.is_absolute() or ".." in pure.parts:
        raise LandscapeError(f"{what}: path '{text}' must be relative to the landscape's root, "
                             "without '..'")
    resolved = Path(os.path.realpath(root / pure))
    base = Path(os.path.realpath(root))
    if resolved != base and base not in resolved.parents:
        raise LandscapeError(f"{what}: path '{text}' leads outside the landscape's root {root} "
                             f"(to {resolved})")
    return resolved


def read_catalogue(json_path: Path) -> tuple[dict[str, Any], dict[str, LandscapeEntry]]:
    """(header, entries) of a landscape.json, type-checked; a LandscapeError on anything odd."""
    where = str(json_path)
    try:
        size = json_path.stat().st_size
        if size > MAX_BYTES:
            raise LandscapeError(f"{where}: {size} bytes, more than a catalogue holds ({MAX_BYTES})")
        raw = json.loads(json_path.read_bytes(), parse_constant=_refuse_constant)
    except FileNotFoundError:
        raise LandscapeError(f"{where}: no landscape catalogue; build one with "
                             "`ebm-vae-build data.root=DIR`") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, LandscapeError):
            raise
        raise LandscapeError(f"{where}: not a readable landscape catalogue: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise LandscapeError(f"{where}: not an ebm-vae landscape (no \"format\": \"{FORMAT}\")")
    if raw.get("version") != VERSION:
        raise LandscapeError(f"{where}: landscape version {raw.get('version')!r}; this ebm-vae reads {VERSION}")
    if not isinstance(raw.get("maps_dir"), str) or not isinstance(raw.get("capsules"), dict):
        raise LandscapeError(f"{where}: 'maps_dir' must be a string and 'capsules' an object")
    entries = {name: _entry_from_json(name, value, where) for name, value in raw["capsules"].items()}
    header = {k: v for k, v in raw.items() if k != "capsules"}
    return header, entries


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


def write_catalogue(maps_dir: Path, root: Path, entries: Mapping[str, LandscapeEntry],
                    data_root: str | None = None) -> Path:
    """Write `maps_dir/landscape.json` atomically (strict JSON: NaN/inf become null)."""
    payload = {
        "format": FORMAT, "version": VERSION, "maps_dir": relative_path(maps_dir, root),
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ebm_vae_version": __version__, "data_root": data_root,
        "capsules": {name: entries[name].to_dict() for name in sorted(entries)},
    }
    text = json.dumps(json_safe(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(maps_dir / FILENAME, text)


# -- queries ----------------------------------------------------------------------------


@dataclass
class LandscapeEnergy:
    """Energies of a landscape query and where they came from.

    `source` is "model" (the checkpoint's bound on full states) or "map" (interpolated on the
    map's axes; `quantity` says whether that is the marginal or a slice). `np.asarray(result)`
    gives the energies.
    """

    energy: np.ndarray  # (N,) float64 nats
    energy_std: np.ndarray | None  # (N,) float64 nats (model: the members' spread and the bound's Monte Carlo error), or None
    source: str  # "model" | "map"
    path: Path  # the checkpoint or the map used
    method: str  # vae-iwae (k = ...), vae-elbo, or the map's method
    quantity: str  # "joint" for the model; the map's quantity for the map
    columns: tuple[str, ...]  # what the input's columns were read as

    def __array__(self, dtype=None, copy=None):
        return self.energy if dtype is None else self.energy.astype(dtype)

    def __len__(self) -> int:
        return len(self.energy)


class EnergyLandscape:
    """Every capsule of a built landscape; see the module docstring."""

    def __init__(self, root: Path, maps_dir: Path, entries: dict[str, LandscapeEntry],
                 device: str | None = None):
        self.root, self.maps_dir, self.entries, self.device = root, maps_dir, entries, device
        self._maps: dict[str, EnergyMap] = {}
        self._models: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike = "energy_maps", root: str | os.PathLike | None = None,
             device: str | None = None) -> EnergyLandscape:
        """The landscape catalogued in `path` (a folder holding landscape.json, or the file).

        `root`: the folder every catalogued path lies in (`paths.root` of the build); default
        the folder above the catalogue's. `device` is used for checkpoints (None = auto).
        """
        path = Path(path)
        json_path = path / FILENAME if path.is_dir() or path.suffix != ".json" else path
        maps_dir = Path(os.path.realpath(json_path.parent))
        root = Path(os.path.realpath(root)) if root is not None else maps_dir.parent
        header, entries = read_catalogue(json_path)
        recorded = resolve_inside(header["maps_dir"], root, f"{json_path}: maps_dir")
        if recorded != maps_dir:
            raise LandscapeError(f"{json_path}: written for maps in <root>/{header['maps_dir']}, but "
                                 f"<root> = {root}; open it with root=<the build's paths.root>")
        for name, entry in entries.items():  # every path checked now, not at first use
            for key in ("map", "plot", "checkpoint"):
                if getattr(entry, key) is not None:
                    resolve_inside(getattr(entry, key), root, f"{json_path}: entry '{name}'.{key}")
        return cls(root, maps_dir, entries, device)

    @property
    def capsules(self) -> list[str]:
        return sorted(self.entries)

    def entry(self, name: str) -> LandscapeEntry:
        try:
            return self.entries[name]
        except KeyError:
            known = ", ".join(self.capsules) or "none"
            raise LandscapeError(f"unknown capsule '{name}': the landscape in {self.maps_dir} has "
                                 f"{known}") from None

    def path(self, name: str, key: str) -> Path | None:
        """The resolved `map`, `plot` or `checkpoint` path of a capsule (None when it has none)."""
        value = getattr(self.entry(name), key)
        return None if value is None else resolve_inside(value, self.root, f"entry '{name}'.{key}")

    def map(self, name: str) -> EnergyMap:
        if name not in self._maps:
            energy_map = EnergyMap.load(self.path(name, "map"))
            made_for = energy_map.metadata.get("capsule")
            if made_for != name:
                raise LandscapeError(f"entry '{name}': {self.path(name, 'map')} is a map of capsule '{made_for}'")
            self._maps[name] = energy_map
        return self._maps[name]

    def model(self, name: str):
        """The capsule's `EnergyModel`; a LandscapeError when its map needs no checkpoint."""
        if name not in self._models:
            ckpt = self.path(name, "checkpoint")
            if ckpt is None:
                raise LandscapeError(f"capsule '{name}' has no checkpoint (its map is a "
                                     f"{self.entry(name).method}); query states on its map axes "
                                     f"{self.entry(name).axis_names}")
            from ebm_vae.energy.model import EnergyModel  # torch: only when a model is asked for

            model = EnergyModel.from_checkpoint(ckpt, self.device)
            if model.capsule != name:
                raise LandscapeError(f"entry '{name}': {ckpt} is a checkpoint of capsule '{model.capsule}'")
            self._models[name] = model
        return self._models[name]

    # -- energies ---------------------------------------------------------------------

    def source_for(self, name: str, shape: tuple[int, ...], source: str = "auto") -> str:
        """"model" or "map" for states of `shape` (see `energy`); a StatesError when neither fits."""
        entry = self.entry(name)
        state = entry.state_info
        n_axes = len(entry.axes)
        full = (len(shape) == 2 and shape[1] == state.dim) or tuple(shape[1:]) == state.shape or (
            len(shape) == 1 and state.dim == 1)
        on_axes = (len(shape) == 2 and shape[1] == n_axes) or (len(shape) == 1 and n_axes == 1)
        as_axes = full and self._full_state_axes(entry) is not None  # full states that are map points
        # asked for the map, full states of a marginal map are placed on it by their projection
        projected = full and source == "map" and entry.quantity == "marginal"
        if source not in ("auto", "model", "map"):
            raise ValueError(f"source must be 'auto', 'model' or 'map', got '{source}'")
        if source == "model" or (source == "auto" and full and entry.checkpoint is not None):
            if not full:
                raise StatesError(f"states must have shape (N, {state.dim})"
                                  f"{'' if state.kind != 'field' else f' or (N, {state.shape})'} (full states) "
                                  f"for capsule '{name}', got {shape}")
            return "model"
        if on_axes or as_axes or projected:
            return "map"
        shapes = f"(N, {state.dim})" + (f" or (N, {', '.join(map(str, state.shape))})" if len(state.shape) > 1 else "")
        expected = [f"{shapes} full states" + ("" if entry.checkpoint else " (this capsule has no checkpoint)"),
                    f"(N, {n_axes}) points on the map axes [{', '.join(entry.axis_names)}]"]
        raise StatesError(f"states must have shape {' or '.join(expected)} for capsule '{name}', got {shape}")

    @staticmethod
    def _full_state_axes(entry: LandscapeEntry) -> list[int] | None:
        """Column of each map axis in a full state, when the map's axes are all its components."""
        names = entry.state_info.names
        if len(entry.axes) != len(names) or not all(a in names for a in entry.axis_names):
            return None
        return [names.index(a) for a in entry.axis_names]

    def energy(self, name: str, states: Any, *, source: str = "auto", k: int = 64, seed: int = 0,
               chunk_points: int | None = None) -> LandscapeEnergy:
        """E(x) in nats for `states` in physical units, from the checkpoint or the map.

        `source="auto"`: full states (N, D) or (N, *state_shape) go to the checkpoint; states
        on the map's axes (N, n_axes), and full states of a capsule without checkpoint whose
        map axes are its components, go to the map. `"model"` / `"map"` force one; with
        `"map"`, full states of a marginal map are placed on it by their projection (their
        principal coefficients, or their axis components): the energy is then F(axes), the
        marginal, which `quantity` says. Bad states behave as `ebm_vae.energy.states` says
        (one-line StatesError; NaN -> nan, Inf -> +inf).
        """
        entry = self.entry(name)
        state = entry.state_info
        states = as_array(states)
        shape = states.shape
        if self.source_for(name, shape, source) == "model":
            model = self.model(name)
            energy, std = model.energy(states, k=k, seed=seed, chunk_points=chunk_points, return_std=True)
            return LandscapeEnergy(energy, std, "model", self.path(name, "checkpoint"),
                                   "vae-elbo" if k == 1 else f"vae-iwae (k={k})", "joint", state.names)
        energy_map, project = self.map(name), None
        columns = self._full_state_axes(entry)
        on_axes = len(shape) == 2 and shape[1] == len(entry.axes) and columns is None
        if columns is not None:  # the axes are the state's components: columns in state order
            batch = validated_states(states, state.shape, f"the map of '{name}'", names=state.names)
            batch.columns = columns
            names = state.names
        elif not on_axes:  # full states of a marginal map (source="map"): their projection
            batch = validated_states(states, state.shape, f"the map of '{name}'", names=state.names)
            project, names = energy_map.project, tuple(entry.axis_names)
        else:
            batch = validated_states(states, (len(entry.axes),), f"the map of '{name}'",
                                     names=tuple(entry.axis_names))
            names = tuple(entry.axis_names)
        try:
            energy = map_energy(energy_map, batch, project)
        except ValueError as exc:  # a map that does not record how to project onto its axes
            raise StatesError(f"the map of '{name}': {exc}") from None
        return LandscapeEnergy(energy, None, "map", self.path(name, "map"), entry.method, entry.quantity, names)


def map_energy(energy_map: EnergyMap, batch: StateBatch, project=None,
               chunk_rows: int = MAP_CHUNK_ROWS) -> np.ndarray:
    """The map's energies of validated points (or of the projections of full states, with
    `project`), interpolated a chunk at a time."""
    out = np.empty(len(batch), dtype=np.float64)
    for start in range(0, len(batch), chunk_rows):
        stop = min(len(batch), start + chunk_rows)
        points = batch.chunk(start, stop, np.float64)
        out[start:stop] = energy_map.energy(points if project is None else project(points))
    batch.finish(out)
    return out


def quality_of(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """The validation figures worth keeping in the catalogue (nan -> None)."""
    keys = ("val/iwae", "val/iwae_phys", "val/elbo")
    return {k: (float(metrics[k]) if math.isfinite(float(metrics[k])) else None) for k in keys if k in metrics}
