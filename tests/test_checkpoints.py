"""Damaged and partial checkpoints: a cut last.ckpt, a full disk while saving, a killed save.

And what a training run shows on the console: the step bar after a resume, the time-cap
warning, none of Lightning's noise.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings

import pytest
import torch

from ebm_vae.callbacks import StepProgressBar
from ebm_vae.checkpoints import AtomicCheckpointIO, resume_path
from ebm_vae.energy.model import CheckpointError
from ebm_vae.io import OutputError
from ebm_vae.train import train


def fake_checkpoint(path, step: int) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step, "epoch": 0}, path)


def cut(path, keep: float = 0.5) -> None:
    """What a kill during a plain (non-atomic) save leaves: the file's first part."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_cut_last_ckpt_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, caplog):
    fake_checkpoint(tmp_path / "epoch_001.ckpt", 100)
    fake_checkpoint(tmp_path / "epoch_002.ckpt", 200)
    fake_checkpoint(tmp_path / "last.ckpt", 300)
    cut(tmp_path / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="ebm_vae.checkpoints"):
        assert resume_path("last", tmp_path) == str(tmp_path / "epoch_002.ckpt")
    assert f"{tmp_path / 'last.ckpt'}: not loadable as a checkpoint (damaged or cut short?)" in caplog.text
    assert f"resuming from {tmp_path / 'epoch_002.ckpt'} (step 200) instead" in caplog.text


def test_with_nothing_loadable_the_resume_fails_in_one_line_naming_the_file(tmp_path):
    fake_checkpoint(tmp_path / "last.ckpt", 300)
    cut(tmp_path / "last.ckpt")
    (tmp_path / "epoch_001.ckpt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:
        resume_path("last", tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"ckpt_path=last: {tmp_path / 'last.ckpt'}: not loadable")
    assert "move last.ckpt away to start a fresh run, or pass ckpt_path=PATH" in message
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'epoch_001.ckpt'}: not loadable"):
        resume_path(str(tmp_path / "epoch_001.ckpt"), tmp_path)  # an explicit path: the same line
    assert resume_path("last", tmp_path / "nothing_yet") is None  # no last.ckpt: a fresh run


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {}, "global_step": 1}, last)
    before = last.read_bytes()
    (tmp_path / ".last.ckpt.0123456789ab.ckpt.tmp").write_bytes(b"left by a killed save")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError) as info:
        io.save_checkpoint({"state_dict": {}, "global_step": 2}, last)
    assert str(info.value) == (f"[Errno 28] cannot write {last}: No space left on device; the previous "
                               "last.ckpt is intact (resume with ckpt_path=last once the cause is fixed)")
    assert last.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the old temporary went too


def test_resume_after_a_cut_last_ckpt_shows_steps_of_the_whole_run(train_cfg, tmp_path, monkeypatch, caplog):
    """A run of 4 steps, its last.ckpt cut; `ckpt_path=last` resumes from the best checkpoint
    and the bar counts the steps after it up to 8 of 8, not batches of an epoch."""
    overrides = ("trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(train_cfg(tmp_path, "grid", *overrides))
    noise = ("LeafSpec", "IterableDataset", "smaller than the logging interval")
    assert not [w for w in seen if any(n in str(w.message) for n in noise)]
    assert "💡" not in caplog.text
    folder = tmp_path / "checkpoints" / "grid"
    cut(folder / "last.ckpt")
    (best,) = folder.glob("epoch_*.ckpt")
    step = torch.load(best, weights_only=True)["global_step"]

    shown = []
    update = StepProgressBar._update
    monkeypatch.setattr(StepProgressBar, "_update", lambda self, task_id, current, *a, **k: (
        task_id == self.train_progress_bar_id and shown.append((current, self.progress.tasks[task_id].total)),
        update(self, task_id, current, *a, **k)))
    with caplog.at_level(logging.WARNING, logger="ebm_vae.checkpoints"), \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(train_cfg(tmp_path, "grid", "ckpt_path=last", "trainer.enable_progress_bar=true",
                        *overrides[1:], "trainer.max_steps=8"))
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]  # a resume: no news
    assert f"resuming from {best} (step {step}) instead" in caplog.text
    assert shown[0] == (step + 1, 8) and shown[-1] == (8, 8)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 8


def test_a_run_cut_short_by_max_time_says_so(train_cfg, tmp_path, monkeypatch, caplog):
    import time

    from ebm_vae.callbacks import ValidateAtEnd

    monkeypatch.setattr(ValidateAtEnd, "on_train_batch_start", lambda *a: time.sleep(0.4), raising=False)
    with caplog.at_level(logging.WARNING, logger="ebm_vae.callbacks"):
        train(train_cfg(tmp_path, "grid", "trainer.max_steps=1000", "trainer.max_time=00:00:00:01"))
    assert "trainer.max_time cut the run short after 0:00:0" in caplog.text
    assert "of trainer.max_steps=1000" in caplog.text and "ckpt_path=last" in caplog.text
