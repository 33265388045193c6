"""States handed to an energy query: checked once, converted a chunk at a time.

What a query does with bad states (DESIGN.md, "Query API"; tests/test_landscape.py):

- **Wrong shape** (not (N, D), (N, *state_shape), or (N,) for a one-component state) and
  **wrong dtype** (anything but real numbers: strings, objects, complex, dates): a
  `StatesError` (a ValueError) with one line naming the shape or dtype expected.
- **NaN or Inf components**: the row is not evaluated. Its energy is NaN when a component
  is NaN (the state is unknown) and +inf when a component is +/-inf and none is NaN (a
  state at infinity has zero density); one `NonFiniteStatesWarning` gives the counts.
- **Many states** (1e7 or more): nothing is copied whole. `StateBatch.chunk` converts one
  slice of the caller's array to float32 when the evaluation asks for it, so memory beyond
  the input and the (N,) result is one chunk.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ebm_vae.errors import UserError


class StatesError(UserError, ValueError):
    """States of the wrong shape or dtype; the message is one line naming what was expected."""


class NonFiniteStatesWarning(UserWarning):
    """Some states had NaN/Inf components; their energies are NaN / +inf."""


def as_array(states: Any) -> np.ndarray:
    """A NumPy view of array-likes and tensors (no copy where there is one already)."""
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded; the map path never loads it
    if torch is not None and isinstance(states, torch.Tensor):
        states = states.detach().cpu().numpy()
    if isinstance(states, np.ndarray):
        return states
    try:
        return np.asarray(states)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise StatesError(f"states must be a rectangular array of numbers: {exc}") from None


@dataclass
class StateBatch:
    """N states as flat rows (a view of the caller's array where possible) and their finiteness."""

    flat: np.ndarray  # (N, D), the caller's dtype
    nan_rows: np.ndarray  # (N,) bool: a NaN component
    inf_rows: np.ndarray  # (N,) bool: an Inf component and no NaN
    fill: np.ndarray  # (D,): evaluated in place of non-finite rows (discarded after)
    columns: list[int] | None = None  # a reordering of the components, applied per chunk

    def __len__(self) -> int:
        return len(self.flat)

    @property
    def n_nonfinite(self) -> int:
        return int(np.count_nonzero(self.nan_rows) + np.count_nonzero(self.inf_rows))

    def chunk(self, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows [start, stop) as `dtype` (the model's float32 by default; maps interpolate in
        float64), columns reordered; non-finite rows replaced by `fill`."""
        rows = self.flat[start:stop]
        out = np.asarray(rows if self.columns is None else rows[:, self.columns], dtype=dtype)
        bad = self.nan_rows[start:stop] | self.inf_rows[start:stop]
        if bad.any() or not out.flags.writeable:  # a view of the caller's array: never write into it
            out = out.copy()
            out[bad] = self.fill
        return out

    def finish(self, energy: np.ndarray, *others: np.ndarray) -> None:
        """Set the energies of non-finite rows in place (NaN or +inf; NaN for `others`, e.g. std)."""
        energy[self.nan_rows] = np.nan
        energy[self.inf_rows] = np.inf
        for values in others:
            values[self.nan_rows | self.inf_rows] = np.nan


def validated_states(states: Any, state_shape: tuple[int, ...], what: str,
                     fill: np.ndarray | None = None, names: tuple[str, ...] = (),
                     chunk_rows: int = 1 << 20) -> StateBatch:
    """Check `states` against `state_shape` and flag non-finite rows (see the module docstring).

    `what` names the target in messages ("capsule 'grid'", "the map of 'grid'"); `names`, when
    given, are listed in the shape error; `fill` is a valid state (default zeros).
    """
    array = as_array(states)
    dim = int(np.prod(state_shape))
    if array.dtype.kind not in "fiu":
        raise StatesError(f"states must be real numbers for {what}, got dtype {array.dtype}")
    if array.ndim == 1 and dim == 1:
        flat = array.reshape(-1, 1)
    elif array.ndim == 2 and array.shape[1] == dim or array.shape[1:] == tuple(state_shape):
        flat = array.reshape(len(array), dim)
    else:
        expected = f"(N, {dim})" if len(state_shape) == 1 else f"(N, {dim}) or (N, {', '.join(map(str, state_shape))})"
        listed = f" [{', '.join(names)}]" if names and len(names) <= 8 else ""
        raise StatesError(f"states must have shape {expected}{listed} for {what}, got {array.shape}")
    nan_rows = np.zeros(len(flat), dtype=bool)
    inf_rows = np.zeros(len(flat), dtype=bool)
    if flat.dtype.kind == "f":
        for start in range(0, len(flat), chunk_rows):  # bounded temporaries for any N
            part = flat[start : start + chunk_rows]
            nan_rows[start : start + len(part)] = np.isnan(part).any(axis=1)
            inf_rows[start : start + len(part)] = np.isinf(part).any(axis=1)
        inf_rows &= ~nan_rows
    batch = StateBatch(flat, nan_rows, inf_rows,
                       np.zeros(dim, np.float32) if fill is None else np.asarray(fill, np.float32).reshape(dim))
    if batch.n_nonfinite:
        warnings.warn(f"{what}: {batch.n_nonfinite} of {len(flat)} states have NaN/Inf components "
                      f"({int(nan_rows.sum())} NaN -> energy nan, {int(inf_rows.sum())} Inf -> energy +inf)",
                      NonFiniteStatesWarning, stacklevel=3)
    return batch
