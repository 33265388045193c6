"""The index of a data tree: `index/manifest.parquet`, one row per file (docs/ARCHITECTURE.md).

Paths are POSIX paths relative to the data root; the absolute root travels in the file's
key-value metadata, so a manifest can be read without the config that wrote it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ebm_vae import __version__
from ebm_vae.data.readers.base import VariableInfo
from ebm_vae.io import atomic_path

FILENAME = "manifest.parquet"
VARIABLE = pa.struct([("name", pa.string()), ("shape", pa.list_(pa.int64())), ("dtype", pa.string())])
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("format", pa.string()),
    ("capsule", pa.string()),
    ("rule", pa.string()),
    ("variables", pa.list_(VARIABLE)),
    ("n_samples", pa.int64()),
    ("extent", pa.int64()),
    ("error", pa.string()),
    # rows the crawl's read skipped: log lines that do not parse (logs are parsed whole);
    # null where the crawl does not read rows (CSV ragged rows are counted when read)
    ("skipped_rows", pa.int64()),
])
ROOT_KEY, VERSION_KEY, CREATED_KEY = "ebm_vae.root", "ebm_vae.version", "ebm_vae.created"
CAPSULES_KEY = "ebm_vae.capsules"  # fingerprint of the capsule definitions the rows were assigned by


@dataclass
class ManifestEntry:
    """One file of the tree. `variables` hold name, shape and dtype (no attributes)."""

    path: str
    size: int
    mtime_ns: int
    format: str | None = None
    capsule: str | None = None
    rule: str | None = None
    variables: list[VariableInfo] = field(default_factory=list)
    n_samples: int = 0
    extent: int = 0
    error: str | None = None
    skipped_rows: int | None = None

    def to_row(self) -> dict[str, Any]:
        """A dict in SCHEMA's layout (written out: `dataclasses.asdict` deep-copies every
        variable's attributes, the slowest step of a crawl of many small files)."""
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "format": self.format,
                "capsule": self.capsule, "rule": self.rule, "n_samples": self.n_samples,
                "extent": self.extent, "error": self.error, "skipped_rows": self.skipped_rows,
                "variables": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype}
                              for v in self.variables]}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ManifestEntry:
        variables = [VariableInfo(v["name"], tuple(v["shape"]), v["dtype"]) for v in row["variables"] or ()]
        return cls(**{**row, "variables": variables})


class Manifest:
    """The rows as an Arrow table, plus the data root they are relative to."""

    def __init__(self, table: pa.Table, root: str | Path, capsules_fingerprint: str = ""):
        for name in SCHEMA.names:  # a manifest of an earlier version lacks the newer columns
            if name not in table.column_names:
                table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
        self.table = table.select(SCHEMA.names).cast(SCHEMA)
        self.root = Path(root)
        self.capsules_fingerprint = capsules_fingerprint

    @classmethod
    def from_entries(cls, entries: list[ManifestEntry], root: str | Path,
                     capsules_fingerprint: str = "") -> Manifest:
        rows = [e.to_row() for e in sorted(entries, key=lambda e: e.path)]
        return cls(pa.Table.from_pylist(rows, schema=SCHEMA), root, capsules_fingerprint)

    def __len__(self) -> int:
        return self.table.num_rows

    def entries(self) -> list[ManifestEntry]:
        return [ManifestEntry.from_row(r) for r in self.table.to_pylist()]

    def usable(self, capsule: str) -> list[ManifestEntry]:
        """Rows of `capsule` without an error, sorted by path."""
        return sorted((e for e in self.entries() if e.capsule == capsule and e.error is None),
                      key=lambda e: e.path)

    def file(self, entry: ManifestEntry) -> Path:
        """The absolute path of an entry."""
        return self.root / entry.path


def write_manifest(manifest: Manifest, index_dir: str | Path) -> Path:
    """Write `index_dir/manifest.parquet` atomically: a killed crawl leaves the previous one."""
    target = Path(index_dir) / FILENAME
    metadata = {
        ROOT_KEY: str(manifest.root),
        VERSION_KEY: __version__,
        CREATED_KEY: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        CAPSULES_KEY: manifest.capsules_fingerprint,
    }
    table = manifest.table.replace_schema_metadata(metadata)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def read_manifest(index_dir: str | Path) -> Manifest:
    """The manifest in `index_dir`; FileNotFoundError names the command that writes it."""
    path = Path(index_dir) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `ebm-vae-crawl data.root=DIR` first")
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if ROOT_KEY not in metadata:
        raise ValueError(f"{path}: not an ebm-vae manifest (no '{ROOT_KEY}' metadata)")
    return Manifest(table.replace_schema_metadata(None), metadata[ROOT_KEY],
                    metadata.get(CAPSULES_KEY, ""))
