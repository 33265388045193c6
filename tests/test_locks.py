"""Two processes on the same outputs: a lock per output, waits that say so, refusals in one line.

Every test runs real concurrent processes: a child holds a lock (or does the real work) while
this process, or a second child, wants the same output.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ebm_vae import EnergyMap, demo
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.io import atomic_write_text
from ebm_vae.locks import LockedError, lock_path, output_lock

HOLD = """
import sys, time
from pathlib import Path
from ebm_vae.locks import output_lock

target, purpose, mode, ready = sys.argv[1:5]
with output_lock(target, purpose, shared=mode == "shared"):
    Path(ready).touch()
    time.sleep(float(sys.argv[5]))
"""


def hold(target: Path, purpose: str, ready: Path, seconds: float = 60.0, mode: str = "exclusive"):
    """A child holding the lock of `target` until it is killed or `seconds` pass."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(target), purpose, mode, str(ready), str(seconds)],
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, child.stdout.read()
        assert time.monotonic() < deadline, "the child never took the lock"
        time.sleep(0.02)
    return child


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)


def test_a_held_lock_refuses_naming_its_holder_and_is_freed_when_the_holder_dies(tmp_path):
    target = tmp_path / "checkpoints" / "grid"
    child = hold(target, "training capsule grid", tmp_path / "ready")
    try:
        with pytest.raises(LockedError) as info, output_lock(target, "training", wait=False, advice="wait"):
            pass
        message = str(info.value)
        assert message.startswith(f"{target} is in use by training capsule grid (")
        assert f"pid {child.pid} on " in message and message.endswith("; wait")
    finally:
        stop(child)  # kill -9: the kernel drops the lock, no stale lock is left behind
    with output_lock(target, "training", wait=False):
        assert lock_path(target).is_file()
    assert not lock_path(target).exists()  # the last holder removes the lock file


def test_a_second_writer_waits_saying_for_whom(tmp_path, caplog):
    target = tmp_path / "energy_maps" / "grid.npz"
    child = hold(target, "the export of capsule grid", tmp_path / "ready", seconds=1.0)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ebm_vae.locks"), output_lock(target, "the export"):
            waited = time.monotonic() - started
        assert child.wait(timeout=30) == 0  # it finished its hold: we got the lock after it
        assert waited > 0.3
        assert f"waiting for {target}: in use by the export of capsule grid" in caplog.text
        assert f"{target} is free after" in caplog.text
    finally:
        stop(child)


def test_readers_share_and_a_writer_waits_for_them(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    child = hold(index, "reading the index", tmp_path / "ready", mode="shared")
    try:
        with output_lock(index, "a second reader", shared=True, wait=False):
            pass  # readers share
        with pytest.raises(LockedError, match="in use by another process"), \
                output_lock(index, "a crawl", wait=False):
            pass
    finally:
        stop(child)


def test_without_file_locks_the_block_runs_unlocked(tmp_path, monkeypatch, caplog):
    import errno

    import ebm_vae.locks as locks

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(locks.os, "open", read_only)
    monkeypatch.setattr(locks, "_unsupported_warned", False)
    with caplog.at_level(logging.WARNING, logger="ebm_vae.locks"):
        with output_lock(tmp_path / "index", "reading a read-only index", shared=True):
            pass
        assert caplog.text == ""  # a reader of a read-only index: nothing to say
        with output_lock(tmp_path / "index", "a crawl"), output_lock(tmp_path / "map.npz", "an export"):
            pass
    assert caplog.text.count("two runs on the same outputs are not kept apart here") == 1


def test_locks_nest_within_a_process(tmp_path):
    with output_lock(tmp_path / "index", "crawl"), output_lock(tmp_path / "index", "stats pass"), \
            output_lock(tmp_path / "index", "read", shared=True):
        pass
    assert not lock_path(tmp_path / "index").exists()


def test_the_next_write_removes_a_killed_writers_temporaries(tmp_path):
    maps = tmp_path / "energy_maps"
    maps.mkdir()
    leftover = maps / ".grid.npz.0123456789ab.npz.tmp"  # what kill -9 mid-write leaves
    leftover.write_bytes(b"PK half a map")
    other = maps / ".wafer.npz.0123456789ab.npz.tmp"  # another output's: not this write's business
    other.write_bytes(b"PK")
    import numpy as np

    axis = np.linspace(0.0, 1.0, 3)
    EnergyMap(np.zeros((3, 3)), [axis, axis], {"capsule": "grid"}).save(maps / "grid.npz")
    assert not leftover.exists() and other.exists()
    assert sorted(p.name for p in maps.iterdir()) == [".wafer.npz.0123456789ab.npz.tmp", "grid.npz"]


def test_a_write_waits_for_a_concurrent_write_of_the_same_file(tmp_path):
    target = tmp_path / "stats.json"
    child = hold(target, "writing stats.json", tmp_path / "ready", seconds=0.5)
    try:
        atomic_write_text(target, "{}\n")  # waits: the child's temporary is never removed under it
        assert target.read_text() == "{}\n"
    finally:
        stop(child)


# --------------------------------------------------------------------------- the real commands


CRAWL = """
import logging, sys, time
from ebm_vae.config import compose
from ebm_vae.crawl import crawl as crawl_module

identify = crawl_module.identify

def identify_slowly(*args):  # a slow drive: the crawls overlap
    time.sleep(0.05)
    return identify(*args)

logging.basicConfig(level=logging.INFO)
crawl_module.identify = identify_slowly
crawl_module.crawl(compose("crawl", [f"data.root={sys.argv[1]}", f"paths.root={sys.argv[2]}",
                                     "crawl.workers=1", "crawl.progress=false", "crawl.checkpoint_s=0"]))
"""


def test_two_crawls_of_one_index_take_turns(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    for k in range(40):
        demo.write_grid_csv(data / f"grid_{k:02d}.csv", n_rows=20, seed=k)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children = []
    for _ in range(2):
        children.append(subprocess.Popen([sys.executable, "-c", CRAWL, str(data), str(out)], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(0.5)
    logs = [c.communicate(timeout=300)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0], logs
    text = "\n".join(logs)
    assert f"waiting for {out / 'index'}: in use by the crawl of {data}" in text
    assert "crawled 40 files (40 inspected" in text and "crawled 40 files (0 inspected, 40 unchanged" in text
    manifest = read_manifest(out / "index")
    assert len(manifest) == 40 and len(manifest.usable("grid")) == 40
    assert sorted(p.name for p in (out / "index").iterdir()) == ["grid", "manifest.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["cache", "index"]  # no lock or temporary left


def test_training_reads_the_index_after_a_running_crawl(tmp_path, caplog):
    """A crawl holds the index: a training run waits, then reads its manifest and statistics
    as one snapshot (the statistics count exactly the manifest's usable files)."""
    from ebm_vae.capsules import visible_capsules
    from ebm_vae.data.datamodule import load_index

    data, out = tmp_path / "data", tmp_path / "out"
    demo.write_grid_csv(data / "grid_a.csv", n_rows=50)
    crawl(compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1", "crawl.progress=false"]))
    for k in range(30):  # new files: the next crawl rewrites the manifest and the statistics
        demo.write_grid_csv(data / f"grid_new_{k:02d}.csv", n_rows=20, seed=k)
    cfg = compose("train", ["capsule=grid", f"data.root={data}", f"paths.root={out}"])
    child = subprocess.Popen([sys.executable, "-c", CRAWL, str(data), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not lock_path(out / "index").exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="ebm_vae.locks"):
        manifest, stats = load_index(cfg, visible_capsules()["grid"])
    assert child.wait(timeout=300) == 0, child.stdout.read()
    assert f"waiting for {out / 'index'}: in use by the crawl of {data}" in caplog.text
    usable = {(e.path, e.size, e.mtime_ns) for e in manifest.usable("grid")}
    assert len(usable) == 31
    assert {(f["path"], f["size"], f["mtime_ns"]) for f in stats.files} == usable


def test_a_second_training_of_a_capsule_is_refused_in_one_line(train_cfg, tmp_path):
    from ebm_vae.train import train

    child = hold(tmp_path / "checkpoints" / "grid", "training capsule grid", tmp_path / "ready")
    try:
        with pytest.raises(LockedError, match=r"checkpoints/grid is in use by training capsule grid .*"
                                              r"one training per capsule and paths.root"):
            train(train_cfg(tmp_path, "grid"))
    finally:
        stop(child)
    assert not (tmp_path / "checkpoints" / "grid" / "last.ckpt").exists()


def test_two_exports_of_one_map_take_turns(demo_index, tmp_path, caplog):
    from ebm_vae.export import export_locked, map_path

    cfg = compose("export", ["capsule=grid", f"paths.root={tmp_path}", f"paths.index={demo_index['index']}",
                             "export.method=histogram", "export.resolution=8", "export.progress=false"])
    child = hold(map_path(cfg), "the export of capsule grid", tmp_path / "ready", seconds=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="ebm_vae.locks"):
            out = export_locked(cfg)
    finally:
        stop(child)
    assert "waiting for" in caplog.text and "in use by the export of capsule grid" in caplog.text
    assert EnergyMap.load(out).metadata["capsule"] == "grid" and out.with_suffix(".png").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.npz", "grid.png"]
