"""The LightningDataModule of one capsule: StateStreams for training and validation.

Work units come from the manifest's usable rows of the capsule, normalisation from its
statistics. `datamodule_from_config` builds it from a composed train config, crawling the
data tree and running the statistics pass first when their outputs are missing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ebm_vae.capsules import parse_capsule
from ebm_vae.config import CapsuleConfig
from ebm_vae.crawl.manifest import Manifest, read_manifest
from ebm_vae.data.cache import StateCache, state_cache
from ebm_vae.data.extractors import EXTRACTORS, StateInfo
from ebm_vae.data.filepass import fill_cache, launched_ranks
from ebm_vae.data.stats import Stats, run_stats_pass
from ebm_vae.data.stream import StateStream, stream_args
from ebm_vae.data.units import (
    WorkUnit,
    block_grid,
    entry_plan,
    mark_finite,
    plan_units,
    split_warnings,
)
from ebm_vae.errors import ConfigError
from ebm_vae.locks import output_lock

log = logging.getLogger(__name__)


class StreamLoader(DataLoader):
    """A DataLoader that tells its stream the epoch each time an epoch's iterator is made.

    Lightning calls `set_epoch` only on samplers, which an IterableDataset has none of; the
    epoch is read from `epoch_source` (the trainer's current epoch, right after a resume too)
    and reaches persistent workers through the stream's shared-memory epoch.
    """

    def __init__(self, stream: StateStream, epoch_source: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self.epoch_source = epoch_source

    def __iter__(self):
        if self.epoch_source is not None:
            self.dataset.set_epoch(self.epoch_source())
        return super().__iter__()


class CapsuleDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Any, capsule: CapsuleConfig, manifest: Manifest, stats: Stats,
                 cache: StateCache | None = None):
        super().__init__()
        self.cfg = data_cfg
        self.capsule = capsule
        self.stats = stats
        self.manifest = manifest
        self.root = Path(data_cfg.root) if data_cfg.root else manifest.root
        self.extractor = EXTRACTORS[capsule.extractor](capsule)
        entries = manifest.usable(capsule.name)
        split = plan_units(entries, self.extractor, self.state, data_cfg.unit_samples,
                           data_cfg.unit_bytes, data_cfg.val_fraction, data_cfg.val_block)
        if not split.train:
            raise ConfigError(f"capsule '{capsule.name}': none of the usable files in the index of "
                              f"data.root={manifest.root} has the state shape {self.state.shape} of its "
                              "statistics; re-run ebm-vae-crawl data.root=DIR")
        self.train_units, self.val_units = (mark_finite(units, stats.files) for units in (split.train, split.val))
        self.split = split.report({f["path"]: f["blocks"] for f in stats.files if "blocks" in f})
        for line in split_warnings(self.split):
            log.warning("capsule %s: %s", capsule.name, line)
        self.shards = cached_shards(cache, self.extractor, entries, split) if cache is not None else {}
        self.streams: dict[str, StateStream] = {}  # the loaders' streams, for the run's summary

    @property
    def state(self) -> StateInfo:
        return self.stats.state_info

    def stream(self, train: bool) -> StateStream:
        return StateStream(self.train_units if train else self.val_units, self.extractor, self.state,
                           self.root, train=train, shards=self.shards, n_slots=max(1, self.cfg.num_workers),
                           **stream_args(self.cfg))

    def _loader(self, train: bool) -> StreamLoader:
        workers = self.cfg.num_workers
        stream = self.streams["train" if train else "val"] = self.stream(train)
        return StreamLoader(stream, epoch_source=self._current_epoch if train else None,
                            num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=self._pin_memory())

    def train_dataloader(self) -> StreamLoader:
        return self._loader(train=True)

    def val_dataloader(self) -> StreamLoader:
        return self._loader(train=False)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _pin_memory(self) -> bool:
        if self.cfg.pin_memory is not None:
            return bool(self.cfg.pin_memory)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()


def cached_shards(cache: StateCache, extractor: Any, entries: list, split: Any) -> dict[str, str]:
    """Unit path -> `.npy` of its complete shard, for the files the cache holds on the split's blocks."""
    grids = {f.path: f.grid for f in split.files}
    shards = {}
    for entry in entries:
        grid = grids.get(entry.path)
        if grid is None:
            continue
        key = cache.key(WorkUnit.whole(entry, entry_plan(extractor, entry)), grid)
        if cache.lookup(key) is not None:
            shards[entry.path] = str(cache.files(key)[0])
    return shards


def load_index(cfg: Any, capsule: CapsuleConfig) -> tuple[Manifest, Stats]:
    """The manifest and the capsule's statistics under `cfg.paths.index` (see `load_data`)."""
    manifest, stats, _ = load_data(cfg, capsule)
    return manifest, stats


def load_data(cfg: Any, capsule: CapsuleConfig) -> tuple[Manifest, Stats, StateCache | None]:
    """The manifest, the capsule's statistics under `cfg.paths.index` (one snapshot), and its
    state cache.

    Both are read under the index's lock, so a crawl writing them at the same time is waited
    for. Crawls `cfg.data.root` when there is no manifest yet (an index of another root than
    `data.root` is refused there: `crawl.replace_index=true` replaces it), and runs the
    statistics pass when the capsule has no `stats.json` yet. With the state cache on
    (`data.cache`), the files it lacks are extracted into it (by the statistics pass when it
    runs, else by a fill pass); both read files in isolated processes, so a file that crashes or
    hangs its reader is quarantined before training starts. Under a launcher with several ranks
    the passes are collective: every rank takes part, and rank 0 alone writes (under the lock).
    """
    index = Path(cfg.paths.index)
    data_root = Path(cfg.data.root).expanduser().resolve() if cfg.data.root else None
    purpose = f"reading the index for capsule {capsule.name}"
    with output_lock(index, purpose, shared=True):
        manifest, stats = _read_index(index, capsule.name)
    complete = manifest is not None and stats is not None and data_root in (None, manifest.root.resolve())
    # a collective pass must not wait on a lock that another rank of the same pass holds
    completing = (contextlib.nullcontext() if complete or launched_ranks() > 1
                  else output_lock(index, purpose.replace("reading", "completing")))
    with completing:
        if not complete:  # another process may have completed it meanwhile
            manifest, stats = _read_index(index, capsule.name)
        if manifest is None or data_root not in (None, manifest.root.resolve()):
            if data_root is None:
                raise FileNotFoundError(f"{index}: no manifest; pass data.root=DIR to crawl one")
            from ebm_vae.crawl.crawl import crawl

            log.info("crawling %s into %s", data_root, index)
            manifest = crawl(cfg)
            stats = _read_index(index, capsule.name)[1]
        if not manifest.usable(capsule.name):
            raise ConfigError(f"capsule '{capsule.name}' has no usable files under data.root="
                              f"{manifest.root} (see the error column of {index / 'manifest.parquet'})")
        cache = state_cache(cfg, capsule, manifest)
        if stats is None:
            log.info("running the statistics pass for %s", capsule.name)
            stats = run_stats_pass(manifest, capsule, index, cfg, cache)
        elif cache is not None:
            fill_cache(manifest, capsule, cfg, cache, index)
    if cache is not None:
        prune_cache(cfg, capsule, manifest, cache)
    warn_unread(capsule.name, manifest, stats, cache)
    return manifest, stats, cache


def _read_index(index: Path, capsule: str) -> tuple[Manifest | None, Stats | None]:
    try:
        manifest = read_manifest(index)
    except FileNotFoundError:
        return None, None
    stats_path = index / capsule / "stats.json"
    return manifest, Stats.load(stats_path) if stats_path.is_file() else None


def prune_cache(cfg: Any, capsule: CapsuleConfig, manifest: Manifest, cache: StateCache) -> None:
    """Remove the shards of files changed or gone since they were written."""
    extractor = EXTRACTORS[capsule.extractor](capsule)
    keep = set()
    for entry in manifest.usable(capsule.name):
        plan = entry_plan(extractor, entry)
        keep.add(cache.key(WorkUnit.whole(entry, plan), block_grid(plan, cfg.data.val_block)))
    removed = cache.prune(keep)
    if removed:
        log.info("state cache of %s: removed %d shards of changed or deleted files", capsule.name, removed)


def warn_unread(capsule: str, manifest: Manifest, stats: Stats, cache: StateCache | None) -> None:
    """Files the statistics pass never read cannot be known not to crash their reader."""
    if cache is not None:
        return  # the fill pass has read every file the cache lacked, in isolation
    seen = {(f["path"], f["size"], f["mtime_ns"]) for f in stats.files + stats.skipped if "size" in f}
    unread = [e.path for e in manifest.usable(capsule) if (e.path, e.size, e.mtime_ns) not in seen]
    if unread:
        log.warning("capsule %s: %d files were never read by the statistics pass (crawled with "
                    "crawl.stats=false?), e.g. %s; a reader that crashes on one would stop training. "
                    "Re-run the statistics (ebm-vae-crawl) or set data.cache=on.", capsule, len(unread),
                    ", ".join(unread[:3]))


def datamodule_from_config(cfg: Any) -> CapsuleDataModule:
    """The data module of `cfg.capsule` from a composed train config."""
    capsule = parse_capsule(cfg.capsule, source=f"capsule '{cfg.capsule.get('name', '?')}'")
    manifest, stats, cache = load_data(cfg, capsule)
    return CapsuleDataModule(cfg.data, capsule, manifest, stats, cache)
