"""Shared fixtures: a tiny crawled data tree with one file per built-in capsule."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ebm_vae import demo
from ebm_vae.config import compose


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny networks on a 2-core machine: a second intra-op thread only spins (measured ~40x
    slower when the other core is busy, e.g. with DataLoader workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def restore_logging():
    """Hydra configures the root logger for each in-process run (its handlers hold the
    captured stream of that test); give the next test the logging it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory) -> dict[str, Path]:
    """Small demo files of fusion (3 x 16 x 16), wafer (1 x 16 x 16) and grid, crawled with
    statistics. Returns {"data": data root, "index": index dir}; treat both as read-only."""
    base = tmp_path_factory.mktemp("demo_index")
    data = base / "data"
    demo.write_fusion_well(data / "mhd" / "MHD_16_run01.h5", n_traj=2, n_time=8, n=16, nz=4)
    demo.write_fusion_plain(data / "mhd" / "plasma_shot_7.h5", n_time=8, n=16, nz=4, seed=1)
    demo.write_wafer_netcdf(data / "fab" / "wafer_lot_1.nc", n_time=24, n=16)
    demo.write_wafer_netcdf(data / "fab" / "wafer_lot_2.nc", n_time=24, n=16, seed=1)
    demo.write_grid_parquet(data / "grid" / "grid_frequency_a.parquet", n_rows=3000)
    demo.write_grid_csv(data / "grid" / "grid_frequency_b.csv", n_rows=3000, seed=1)
    from ebm_vae.crawl.crawl import crawl

    cfg = compose("crawl", [f"data.root={data}", f"paths.root={base / 'out'}", "crawl.workers=1",
                            "crawl.progress=false", "crawl.n_components=4"])
    crawl(cfg)
    return {"data": data, "index": base / "out" / "index"}


@pytest.fixture(scope="session")
def train_cfg(demo_index):
    """Factory: a composed train config on `demo_index` with outputs under `out`, shrunk to a
    few CPU steps (debug=fast); extra overrides come last."""

    def make(out: Path, capsule: str, *overrides: str):
        return compose("train", [f"capsule={capsule}", f"data.root={demo_index['data']}",
                                 f"paths.root={out}", f"paths.index={demo_index['index']}",
                                 "debug=fast", "trainer.enable_progress_bar=false",
                                 "trainer.enable_model_summary=false", *overrides])

    return make
