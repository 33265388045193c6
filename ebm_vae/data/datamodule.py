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
from ebm_vae.data.stream import StateStream, stream_args
from ebm_vae.data.units import plan_units, split_warnings

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
        split = plan_units(manifest.usable(capsule.name), self.extractor, self.state, data_cfg.unit_samples,
                           data_cfg.unit_bytes, data_cfg.val_fraction, data_cfg.val_block)
        if not split.train:
            raise ValueError(f"capsule '{capsule.name}': no usable files of state shape "
                             f"{self.state.shape} in the manifest")
        self.train_units, self.val_units = split.train, split.val
        self.split = split.report({f["path"]: f["blocks"] for f in stats.files if "blocks" in f})
        for line in split_warnings(self.split):
            log.warning("capsule %s: %s", capsule.name, line)

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
    """The manifest and the capsule's statistics under `cfg.paths.index`.

    Crawls `cfg.data.root` when there is no manifest (or it indexes another root), and runs the
    statistics pass when the capsule has no `stats.json` yet.
    """
    index = Path(cfg.paths.index)
    data_root = Path(cfg.data.root).resolve() if cfg.data.root else None
    try:
        manifest = read_manifest(index)
        stale = data_root is not None and manifest.root.resolve() != data_root
    except FileNotFoundError:
        manifest, stale = None, True
    if stale:
        if data_root is None:
            raise FileNotFoundError(f"{index}: no manifest; pass data.root=DIR to crawl one")
        from ebm_vae.crawl.crawl import crawl

        log.info("crawling %s into %s", data_root, index)
        manifest = crawl(cfg)
    stats_path = index / capsule.name / "stats.json"
    if stats_path.is_file():
        return manifest, Stats.load(stats_path)
    log.info("running the statistics pass for %s", capsule.name)
    return manifest, run_stats_pass(manifest, capsule, index, cfg)


def datamodule_from_config(cfg: Any) -> CapsuleDataModule:
    """The data module of `cfg.capsule` from a composed train config."""
    capsule = parse_capsule(cfg.capsule, source=f"capsule '{cfg.capsule.get('name', '?')}'")
    manifest, stats = load_index(cfg, capsule)
    return CapsuleDataModule(cfg.data, capsule, manifest, stats)
