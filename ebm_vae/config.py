"""Typed config schemas, the location of `conf/`, and composing configs outside Hydra apps.

The dataclasses here are registered in Hydra's ConfigStore as the base of the matching
`conf/<group>/default.yaml`, so a misspelt key or a wrong type fails at compose time with
the key's name. `_target_` appears only in the groups that plug in (model, trainer,
logger, callbacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


def config_dir() -> Path:
    """The directory holding the top-level `conf/`.

    From a checkout (or an editable install) it is the repository's `conf/`; from a wheel
    it is `ebm_vae/conf`, copied in at build time (see `pyproject.toml`).
    """
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


@dataclass
class PathsConfig:
    """Every output lives under `root`; nothing is written into the data tree."""

    root: str = "."
    index: str = "${paths.root}/index"
    checkpoints: str = "${paths.root}/checkpoints"
    energy_maps: str = "${paths.root}/energy_maps"
    logs: str = "${paths.root}/logs"
    cache: str = "${paths.root}/cache"  # extracted states (data.cache)


@dataclass
class DataConfig:
    root: str | None = None  # the data tree; train/export fall back to the manifest's root
    batch_size: int = 1024
    num_workers: int = 0
    unit_samples: int = 65536  # samples per work unit (rows or snapshots)
    unit_bytes: int = 64 * 2**20  # bytes per work unit for CSV (split at line ends)
    shuffle_buffer: int = 65536  # samples held for the in-memory shuffle
    shuffle_buffer_bytes: int = 256 * 2**20  # ... and at most this many bytes of them (field states)
    chunk_bytes: int = 8 * 2**20  # bytes of float32 states per extractor read
    val_fraction: float = 0.1  # fraction of every file held out for validation (in blocks)
    val_block: int = 4096  # samples per split block (fewer for files under 64 blocks of it)
    seed: int = 0
    pin_memory: bool | None = None  # None = pin when CUDA is available
    batches_per_epoch: int | None = None  # None = derived from the manifest, equal for every rank
    cache: str = "auto"  # auto | on | off: extracted states under paths.cache, streamed every epoch


@dataclass
class CrawlConfig:
    # processes inspecting files; None = one per CPU (more can help on a high-latency network drive)
    workers: int | None = None
    checkpoint_s: float = 60.0  # write the manifest so far this often: a killed crawl resumes
    file_timeout_s: float = 60.0  # a file whose reader makes no progress this long: error row / quarantine
    stats: bool = True  # run the statistics pass for capsules with new or changed files
    # an index holds one data tree: crawling another into it is refused unless this is true
    # (the old index and its statistics are then replaced)
    replace_index: bool = False
    progress: bool = True
    stats_reservoir: int = 4096  # samples kept for the principal basis of larger field states
    # field states of up to this many components get the exact covariance (D^2 float64 in memory;
    # 2048: 32 MB), larger ones the SVD of the reservoir
    exact_covariance_max_dim: int = 2048
    n_components: int = 64  # principal components stored for field states: the cap on the field rank
    # processes of the statistics pass; None = one per CPU (shared by a node's ranks); 0 = this
    # process, without the isolation that survives a reader crashing or hanging on a file
    stats_workers: int | None = None


@dataclass
class ExportConfig:
    method: str = "vae"  # vae | histogram | auto (the histogram where counting resolves the map)
    # marginal (F of the axes, everything else integrated out) | slice (the joint energy through
    # export.reference); None = marginal, which for a state with no more components than axes is the slice
    quantity: str | None = None
    k: int = 64  # importance samples; 1 = negative ELBO (see ebm_vae/export.py for the default)
    resolution: int = 128  # grid points per axis
    axes: list[str] | None = None  # state components or pc1, pc2, ...; default: first two / pc1, pc2
    # [[lo, hi], ...] physical units; default from stats. list[list[float]] would refuse integers
    # inside nested lists (an OmegaConf quirk), so the numbers are checked by the grid instead.
    limits: list[list[Any]] | None = None
    reference: dict[str, float] = field(default_factory=dict)  # held off-grid values by name: +export.reference={NAME: V}
    out: str | None = None  # default ${paths.energy_maps}/<capsule>.npz
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    chunk_points: int | None = None  # grid points per evaluation chunk; None = sized to memory
    plot: bool = True  # a PNG next to the .npz
    plot_span: float = 12.0  # nats above the map's minimum that the PNG's colour scale spans
    progress: bool = True


@dataclass
class BuildConfig:
    """`ebm-vae-build`: which capsules, and whether to redo what is up to date."""

    capsules: list[str] | None = None  # only these (default: every capsule with usable files)
    force: bool = False  # retrain from scratch and re-export, even capsules that are up to date


@dataclass
class QueryConfig:
    """`ebm-vae-query capsule=NAME input=FILE output=FILE` (not a Hydra app: see ebm_vae/query.py)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    capsule: str = MISSING
    input: str = MISSING  # .csv, .parquet or .npy
    output: str = MISSING  # .csv, .parquet or .npy (format from the extension)
    source: str = "auto"  # auto | model | map (see EnergyLandscape.energy)
    k: int = 64  # importance samples of the model's bound (1 = negative ELBO)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    chunk_rows: int = 65536  # rows read, evaluated and written at a time (bounds memory)
    progress: bool = True


@dataclass
class MatchConfig:
    name: list[str] = field(default_factory=list)  # fnmatch patterns, case-insensitive
    attrs: dict[str, str] = field(default_factory=dict)  # global attributes / key-value metadata
    columns: list[str] = field(default_factory=list)  # table header columns that must all be present


@dataclass
class LogConfig:
    """How a text log of the capsule parses: one record per line."""

    pattern: str | None = None  # regex, named groups = variables; None = key=value tokens
    timestamp_format: str | None = None  # strptime format of a `timestamp` group, if any


@dataclass
class CsvConfig:
    skip_rows: int = 0  # lines above the header (e.g. a station line)


@dataclass
class CapsuleConfig:
    """One physics domain. User capsules are YAML files in `<config-dir>/capsule/NAME.yaml`."""

    name: str = MISSING
    match: MatchConfig = field(default_factory=MatchConfig)
    extractor: str = "table"  # fusion | wafer | grid | table
    variables: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)  # empty = whatever the extractor reads
    params: dict[str, Any] = field(default_factory=dict)  # extractor parameters
    log: LogConfig = field(default_factory=LogConfig)
    csv: CsvConfig = field(default_factory=CsvConfig)
    columns: dict[str, str] = field(default_factory=dict)  # variable -> column/variable as written
    # variable -> [lo, hi] physical support (null = unbounded on that side); E = +inf outside
    bounds: dict[str, list[Any]] = field(default_factory=dict)


_store = ConfigStore.instance()
_store.store(group="paths", name="paths_schema", node=PathsConfig)
_store.store(group="data", name="data_schema", node=DataConfig)
_store.store(group="crawl", name="crawl_schema", node=CrawlConfig)
_store.store(group="export", name="export_schema", node=ExportConfig)
_store.store(group="build", name="build_schema", node=BuildConfig)


def to_container(cfg: Any) -> Any:
    """Plain dicts/lists (resolved) for checkpoints and JSON: OmegaConf objects must not leak."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def compose(config_name: str, overrides: list[str] | None = None,
            extra_dirs: list[str | Path] | None = None) -> DictConfig:
    """Compose `conf/<config_name>.yaml` as the apps do (for tests, scripts and notebooks).

    `extra_dirs` play the role of `--config-dir`: their groups extend or replace the built-in ones.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    dirs = [str(Path(d).resolve()) for d in (extra_dirs or [])]
    if dirs:
        overrides.append(f"hydra.searchpath=[{','.join('file://' + d for d in dirs)}]")
        overrides.append(f"capsule_search_path=[{','.join(dirs)}]")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)
