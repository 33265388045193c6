"""User capsules (DESIGN.md's YAML): the state is the capsule's `variables`, one sample per row.

They are columns of a CSV/Parquet table, fields of a text log's lines, 1-D root datasets of an
HDF5 file, or 1-D variables of a NetCDF file (all of one length), named in the files as the
capsule's `columns:` says (default: the variable's own name). Units are the capsule's `units`
(no conversion).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ebm_vae.data.extractors.base import (
    ExtractError,
    Extractor,
    FilePlan,
    StateInfo,
    require,
    require_numeric,
    table_extent,
    variables_of,
)
from ebm_vae.data.readers.base import ArrayHandle, FileInfo, TableHandle, VariableInfo


class TableExtractor(Extractor):
    name = "table"
    formats = ("csv", "parquet", "log", "hdf5", "netcdf")

    @property
    def names(self) -> list[str]:
        """The variables' names as written in the files, in the capsule's order."""
        if not self.capsule.variables:
            raise ExtractError(f"capsule '{self.capsule.name}' lists no variables")
        return [self.column(v) for v in self.capsule.variables]

    def _state(self) -> StateInfo:
        variables = tuple(self.capsule.variables)
        units = tuple(self.capsule.units) or ("",) * len(variables)
        return StateInfo("vector", (len(variables),), variables, units)

    def _array_length(self, variables: dict[str, VariableInfo]) -> int:
        shapes = {n: tuple(variables[n].shape) for n in self.names}
        not_1d = [n for n, s in shapes.items() if len(s) != 1]
        if not_1d:
            raise ExtractError(f"variables {not_1d} are not 1-D: {[shapes[n] for n in not_1d]}")
        lengths = {s[0] for s in shapes.values()}
        if len(lengths) != 1:
            raise ExtractError(f"variables have different lengths {dict((n, s[0]) for n, s in shapes.items())}")
        return lengths.pop()

    def plan(self, info: FileInfo) -> FilePlan:
        self.check_format(info)
        variables = variables_of(info)
        require(variables, self.names)
        require_numeric(variables, self.names)
        if info.n_rows is not None:  # a table: CSV, Parquet, log
            n_rows, extent = table_extent(info)
            return FilePlan(n_samples=n_rows, extent=extent, state=self._state())
        n = self._array_length(variables)
        return FilePlan(n_samples=n, extent=n, state=self._state())

    def iter_states(self, handle: ArrayHandle | TableHandle, plan: FilePlan, start: int, stop: int,
                    chunk: int) -> Iterator[np.ndarray]:
        names = self.names
        if isinstance(handle, TableHandle):
            for batch in handle.iter_batches(names, start, stop, batch_rows=chunk):
                if len(batch[names[0]]):
                    yield self._stack([batch[n] for n in names])
            return
        for i in range(start, stop, max(1, chunk)):
            rows = slice(i, min(stop, i + max(1, chunk)))
            yield self._stack([handle.read(n, (rows,)) for n in names])

    @staticmethod
    def _stack(columns: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(columns[0]), len(columns)), dtype=np.float32)
        for j, column in enumerate(columns):
            out[:, j] = column
        return out
