"""The LightningDataModule of one capsule: StateStreams for training and validation.

Work units come from the manifest's usable rows of the capsule, normalisation from its
statistics. `datamodule_from_config` builds it from a composed train config, crawling the
data tree and running the statistics pass first when their outputs are missing.
"""

from __future__ import annotations

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
from ebm_vae.data.extractors import EXTRACTORS, StateInfo
from ebm_vae.data.stats import Stats, run_stats_pass
from ebm_vae.data.stream import StateStream, split_train_val, stream_args
from ebm_vae.data.units import make_units
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
    def __init__(self, data_cfg: Any, capsule: CapsuleConfig, manifest: Manifest, stats: Stats):
        super().__init__()
        self.cfg = data_cfg
        self.capsule = capsule
        self.stats = stats
        self.root = Path(data_cfg.root) if data_cfg.root else manifest.root
        self.extractor = EXTRACTORS[capsule.extractor](capsule)
        units = make_units(manifest.usable(capsule.name), self.extractor, self.state,
                           data_cfg.unit_samples, data_cfg.unit_bytes)
        if not units:
            raise ConfigError(f"capsule '{capsule.name}': none of the usable files in the index of "
                              f"data.root={manifest.root} has the state shape {self.state.shape} of its "
                              "statistics; re-run ebm-vae-crawl data.root=DIR")
        self.train_units, self.val_units = split_train_val(units, data_cfg.val_fraction)

    @property
    def state(self) -> StateInfo:
        return self.stats.state_info

    def stream(self, train: bool) -> StateStream:
        return StateStream(self.train_units if train else self.val_units, self.extractor, self.state,
                           self.root, train=train, **stream_args(self.cfg))

    def _loader(self, train: bool) -> StreamLoader:
        workers = self.cfg.num_workers
        return StreamLoader(self.stream(train), epoch_source=self._current_epoch if train else None,
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


def load_index(cfg: Any, capsule: CapsuleConfig) -> tuple[Manifest, Stats]:
    """The manifest and the capsule's statistics under `cfg.paths.index`, as one snapshot.

    Both are read under the index's lock, so a crawl writing them at the same time is waited
    for. Crawls `cfg.data.root` when there is no manifest yet (an index of another root than
    `data.root` is refused there: `crawl.replace_index=true` replaces it), and runs the
    statistics pass when the capsule has no `stats.json` yet.
    """
    index = Path(cfg.paths.index)
    data_root = Path(cfg.data.root).expanduser().resolve() if cfg.data.root else None
    purpose = f"reading the index for capsule {capsule.name}"
    with output_lock(index, purpose, shared=True):
        manifest, stats = _read_index(index, capsule.name)
    if manifest is not None and stats is not None and data_root in (None, manifest.root.resolve()):
        return manifest, stats
    with output_lock(index, purpose.replace("reading", "completing")):  # another process may have
        manifest, stats = _read_index(index, capsule.name)              # completed it meanwhile
        if manifest is None or data_root not in (None, manifest.root.resolve()):
            if data_root is None:
                raise FileNotFoundError(f"{index}: no manifest; pass data.root=DIR to crawl one")
            from ebm_vae.crawl.crawl import crawl

            log.info("crawling %s into %s", data_root, index)
            manifest = crawl(cfg)
            stats = _read_index(index, capsule.name)[1]
        if stats is None:
            if not manifest.usable(capsule.name):
                raise ConfigError(f"capsule '{capsule.name}' has no usable files under data.root="
                                  f"{manifest.root} (see the error column of {index / 'manifest.parquet'})")
            log.info("running the statistics pass for %s", capsule.name)
            stats = run_stats_pass(manifest, capsule, index, cfg)
    return manifest, stats


def _read_index(index: Path, capsule: str) -> tuple[Manifest | None, Stats | None]:
    try:
        manifest = read_manifest(index)
    except FileNotFoundError:
        return None, None
    stats_path = index / capsule / "stats.json"
    return manifest, Stats.load(stats_path) if stats_path.is_file() else None


def datamodule_from_config(cfg: Any) -> CapsuleDataModule:
    """The data module of `cfg.capsule` from a composed train config."""
    capsule = parse_capsule(cfg.capsule, source=f"capsule '{cfg.capsule.get('name', '?')}'")
    manifest, stats = load_index(cfg, capsule)
    return CapsuleDataModule(cfg.data, capsule, manifest, stats)
