"""A damaged file cannot stop a training run (issue 12): crashes and hangs in the data chunks.

Each case trains in a child process on two good fusion files and damaged ones:
- the issue's recipes: `write_fusion_plain(n_time=2, n=4, nz=2)` with byte 1657 set to 23
  (crashes libhdf5 2.0) or byte 2176 set to 181 (hangs it). With HDF5 2.0 and our reader both
  strike in the metadata the crawl reads (dataset attributes), so the crawl's isolation turns
  them into error rows;
- damage in the data only: flipping each byte of that file (two values each) found none that
  passes the crawl and then crashes or hangs a data read, so the reader is made to do what
  libhdf5 does on such files: segfault (SIGSEGV), or never return, in a read of the damaged
  file's data.
The statistics pass reads every file's data in isolated worker processes: the file is
quarantined (its reason in the manifest, kept by the next crawl, skipped by the statistics and
exports), training goes on without it, with `data.num_workers` 0 and 2, the state cache on
and off, and the end-of-run summary names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ebm_vae import demo
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.data.stats import Stats

TRAIN_WITH_A_DAMAGED_FILE = """
import logging, os, signal, sys, time
from ebm_vae.config import compose
from ebm_vae.data.readers import hdf5
from ebm_vae.train import train

read = hdf5.Hdf5Handle.read


def fails_on_the_damaged_file(self, name, selection=()):  # what libhdf5 does on some files
    if self.path.name == "MHD_damaged_data.h5" and name == "B":
        if sys.argv[1] == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(3600)
    return read(self, name, selection)


hdf5.Hdf5Handle.read = fails_on_the_damaged_file
logging.basicConfig(level=logging.INFO, format="%(message)s")  # as ebm-vae-train's Hydra logging
train(compose("train", sys.argv[2:]))
"""


def damaged_copy(path: Path, offset: int, value: int) -> Path:
    demo.write_fusion_plain(path, n_time=2, n=4, nz=2)
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))
    return path


def write_tree(data: Path, how: str) -> None:
    for k in range(2):
        demo.write_fusion_plain(data / f"MHD_good_{k}.h5", n_time=8, n=4, nz=2, seed=k)
    damaged_copy(data / "MHD_damaged_meta.h5", *({"crash": (1657, 23), "hang": (2176, 181)}[how]))
    demo.write_fusion_plain(data / "MHD_damaged_data.h5", n_time=2, n=4, nz=2, seed=3)


def train_in_child(tmp_path: Path, how: str, workers: int, cache: str) -> tuple[int, str]:
    data, out = tmp_path / "data", tmp_path / "out"
    write_tree(data, how)
    overrides = ["capsule=fusion", f"data.root={data}", f"paths.root={out}", "crawl.progress=false",
                 "crawl.file_timeout_s=3", f"data.num_workers={workers}", f"data.cache={cache}",
                 "data.batch_size=4", "model.channels=4", "model.val_k=2", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    child = subprocess.Popen([sys.executable, "-c", TRAIN_WITH_A_DAMAGED_FILE, how, *overrides],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=300)
    finally:  # its worker processes too, if any are left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    return child.returncode, output


REASONS = {"crash": "the reader crashed on this file", "hang": "the reader did not finish within 3 s"}


@pytest.mark.parametrize("how, workers, cache", [
    ("crash", 2, "on"), ("hang", 0, "off"),
    pytest.param("crash", 0, "off", marks=pytest.mark.slow), pytest.param("hang", 2, "on", marks=pytest.mark.slow),
])
def test_a_file_that_crashes_or_hangs_its_reader_is_quarantined_and_training_goes_on(tmp_path, how, workers,
                                                                                      cache):
    code, output = train_in_child(tmp_path, how, workers, cache)
    assert code == 0, output[-3000:]
    reason = REASONS[how]
    index = tmp_path / "out" / "index"
    rows = {e.path: e.error for e in read_manifest(index).entries()}
    assert rows["MHD_damaged_data.h5"] == f"quarantined: {reason} (reading its data)"
    assert rows["MHD_damaged_meta.h5"] == f"unreadable: {reason}"  # the crawl's own isolation
    assert rows["MHD_good_0.h5"] is None and rows["MHD_good_1.h5"] is None
    assert f"quarantined: MHD_damaged_data.h5: {reason} (reading its data)" in output  # the summary
    assert "data summary of capsule fusion:" in output and "train stream: " in output
    stats = Stats.load(index / "fusion" / "stats.json")
    assert [f["path"] for f in stats.files] == ["MHD_good_0.h5", "MHD_good_1.h5"] and stats.count == 16
    assert (tmp_path / "out" / "checkpoints" / "fusion" / "last.ckpt").is_file()
    # the next crawl keeps the quarantine (the file is unchanged), so every stage skips it
    again = crawl(compose("crawl", [f"data.root={tmp_path / 'data'}", f"paths.root={tmp_path / 'out'}",
                                    "crawl.progress=false", "crawl.file_timeout_s=3"]))
    assert {e.path: e.error for e in again.entries()}["MHD_damaged_data.h5"].startswith("quarantined: ")
    assert [e.path for e in again.usable("fusion")] == ["MHD_good_0.h5", "MHD_good_1.h5"]
    json.dumps(stats.to_dict())  # plain containers
