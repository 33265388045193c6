"""Interruptions: kill -9 during the crawl, the training and an export write; a full disk.

A killed crawl leaves no manifest or a valid earlier one, and a re-crawl inspects only the
files it had not reached. A killed training run resumes from `last.ckpt` at its global step
and epoch. A killed or failed write leaves the previous output intact and nothing under its
name; a full disk is an error naming the output that could not be written.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ebm_vae import EnergyMap, demo
from ebm_vae.callbacks import ValidateAtEnd
from ebm_vae.capsules import visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.data.stats import run_stats_pass
from ebm_vae.export import export
from ebm_vae.train import train


def crawl_cfg(data: Path, out: Path, *overrides: str):
    return compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1",
                             "crawl.progress=false", *overrides])


def start(script: str, *args: object) -> subprocess.Popen:
    """A Python child in its own process group, so that a kill reaches everything it started."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the child ended (rc {child.returncode}) first:\n{child.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.01)


def kill_9(child: subprocess.Popen) -> None:
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL  # killed, not finished


def litter(folder: Path, keep: set[str]) -> list[str]:
    """Files in `folder` other than `keep` that are not hidden temporaries of an atomic write."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep and not p.name.startswith("."))


# --------------------------------------------------------------------------- kill -9


CRAWL_SLOWLY = """
import sys, time
from ebm_vae.config import compose
from ebm_vae.crawl import crawl as crawl_module

identify = crawl_module.identify

def identify_slowly(*args):  # a slow network drive: 2 ms per file
    time.sleep(0.002)
    return identify(*args)

crawl_module.identify = identify_slowly
crawl_module.crawl(compose("crawl", [f"data.root={sys.argv[1]}", f"paths.root={sys.argv[2]}",
                                     "crawl.workers=1", "crawl.progress=false", "crawl.stats=false",
                                     "crawl.checkpoint_s=0"]))
"""


def test_kill_9_during_the_crawl_leaves_a_valid_index_that_a_recrawl_completes(tmp_path, caplog):
    data, out = tmp_path / "data", tmp_path / "out"
    summary = demo.make_many_small_files(data, n_files=1000, per_folder=100)
    index = out / "index"
    child = start(CRAWL_SLOWLY, data, out)
    wait_for(lambda: (index / "manifest.parquet").exists(), child)
    time.sleep(0.3)  # a few checkpoints later: the kill may land in one of their writes
    kill_9(child)

    partial = read_manifest(index)  # a whole earlier manifest, never half of one
    n_partial = len(partial)
    assert 0 < n_partial < 1000
    for entry in partial.entries():
        st = (data / entry.path).stat()
        assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert entry.capsule == summary["files"][entry.path]["capsule"]

    with caplog.at_level(logging.INFO, logger="ebm_vae.crawl.crawl"):
        manifest = crawl(crawl_cfg(data, out, "crawl.stats=false"))
    assert f"crawled 1000 files ({1000 - n_partial} inspected, {n_partial} unchanged" in caplog.text
    assert {e.path: e.capsule for e in manifest.entries()} == {
        path: f["capsule"] for path, f in summary["files"].items()}
    assert litter(index, {"manifest.parquet"}) == []


WRITE_A_MAP_AND_HANG = """
import sys, time
import numpy as np
from ebm_vae.energy.mapfile import EnergyMap

def savez_halfway(fh, **arrays):  # the kill lands in the middle of the write
    fh.write(b"PK\\x03\\x04" + bytes(4096))
    fh.flush()
    open(sys.argv[2], "w").close()
    time.sleep(120)

np.savez = savez_halfway
axis = np.linspace(0.0, 1.0, 4)
EnergyMap(np.zeros((4, 4)), [axis, axis], {"capsule": "grid"}).save(sys.argv[1])
"""


def test_kill_9_in_the_middle_of_writing_a_map_leaves_the_old_one(tmp_path):
    maps = tmp_path / "energy_maps"
    axis = np.linspace(0.0, 1.0, 5)
    old = EnergyMap(np.arange(25.0).reshape(5, 5), [axis, axis], {"capsule": "grid"}).save(maps / "grid.npz")
    before = old.read_bytes()
    marker = tmp_path / "writing"
    child = start(WRITE_A_MAP_AND_HANG, old, marker)
    wait_for(marker.exists, child)
    kill_9(child)
    assert old.read_bytes() == before
    assert EnergyMap.load(old).energy_map[4, 4] == 24.0
    assert litter(maps, {"grid.npz"}) == []  # at most a hidden temporary, never a partial grid.npz


TRAIN_UNTIL_KILLED = """
import sys
import torch
from ebm_vae.config import compose
from ebm_vae.train import train

torch.set_num_threads(1)
train(compose("train", sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_training_resumes_from_last_ckpt_at_its_step_and_epoch(tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(3):
        demo.write_grid_parquet(data / f"grid_{k}.parquet", n_rows=400, seed=k)
    overrides = ["capsule=grid", f"data.root={data}", f"paths.root={out}", "data.batch_size=64",
                 "callbacks.checkpoint.every_n_train_steps=5", "trainer.val_check_interval=50",
                 "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "model.val_k=2"]
    last = out / "checkpoints" / "grid" / "last.ckpt"

    def saved_step() -> int:
        return torch.load(last, weights_only=True)["global_step"] if last.exists() else -1

    child = start(TRAIN_UNTIL_KILLED, *overrides, "trainer.max_steps=1000000")
    wait_for(lambda: saved_step() >= 40, child, timeout=600)  # a few epochs of ~16 batches in
    kill_9(child)
    checkpoint = torch.load(last, weights_only=True)
    step, epoch = checkpoint["global_step"], checkpoint["epoch"]
    assert step >= 40 and step % 5 == 0 and epoch >= 1

    seen = {}

    def record(self, trainer, pl_module, batch, batch_idx):
        seen.setdefault("first", (trainer.global_step, trainer.current_epoch,
                                  trainer.train_dataloader.dataset.epoch))

    monkeypatch.setattr(ValidateAtEnd, "on_train_batch_start", record, raising=False)
    train(compose("train", [*overrides, "ckpt_path=last", f"trainer.max_steps={step + 5}"]))
    # it continues at the saved step (the kill lost at most the 5 steps since), and the stream
    # replays the saved epoch from its start: the epoch boundary, never an earlier one
    assert seen["first"] == (step, epoch, epoch)
    assert torch.load(last, weights_only=True)["global_step"] == step + 5


# --------------------------------------------------------------------------- a full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def small_index(tmp_path):
    """A crawled grid tree with statistics and a histogram map: (data, out, crawl cfg)."""
    data, out = tmp_path / "data", tmp_path / "out"
    demo.write_grid_parquet(data / "grid_a.parquet", n_rows=300)
    demo.write_grid_csv(data / "grid_b.csv", n_rows=300, seed=1)
    cfg = crawl_cfg(data, out)
    crawl(cfg)
    return data, out, cfg


def histogram_cfg(out: Path):
    return compose("export", ["capsule=grid", f"paths.root={out}", "export.method=histogram",
                              "export.resolution=8", "export.progress=false"])


def test_a_full_disk_fails_each_write_naming_its_file_and_keeps_earlier_outputs(small_index, monkeypatch):
    data, out, cfg = small_index
    index, maps = out / "index", out / "energy_maps"
    export(histogram_cfg(out))
    outputs = [index / "manifest.parquet", index / "grid" / "stats.json", maps / "grid.npz", maps / "grid.png"]
    before = {path: path.read_bytes() for path in outputs}
    demo.write_grid_csv(data / "grid_c.csv", n_rows=100, seed=2)  # the next crawl has work to write

    def fails_naming(target: Path):
        return pytest.raises(OSError, match=f"^\\[Errno {errno.ENOSPC}\\] cannot write {re.escape(str(target))}: "
                                            "No space left on device$")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", no_space)  # what a full disk answers when data reach it
        with fails_naming(index / "manifest.parquet"):
            crawl(cfg)
        with fails_naming(index / "grid" / "stats.json"):
            run_stats_pass(read_manifest(index), visible_capsules()["grid"], index, cfg)
    with monkeypatch.context() as patch:
        def savez_until_full(fh, **arrays):
            fh.write(b"PK\x03\x04" + bytes(1000))
            no_space()

        patch.setattr(np, "savez", savez_until_full)
        with fails_naming(maps / "grid.npz"):
            export(histogram_cfg(out))
    assert {path: path.read_bytes() for path in outputs} == before  # earlier outputs intact
    for folder, names in ((index, {"manifest.parquet", "grid"}), (maps, {"grid.npz", "grid.png"})):
        assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporaries left
    assert len(read_manifest(index)) == 2 and EnergyMap.load(maps / "grid.npz").metadata["capsule"] == "grid"
