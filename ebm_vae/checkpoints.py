"""Training checkpoints that survive a kill or a full disk, and resumes that survive a damaged one.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin) writes every checkpoint through
  `ebm_vae.io.atomic_path`: a kill during the save leaves the previous file, a full disk says
  that the previous file is intact, and a killed save's temporary is removed by the next save.
  (Lightning's own writer replaces the file without an fsync and names no file on ENOSPC.)
- `resume_path("last", folder)` checks that `last.ckpt` loads; a damaged one (cut short by a
  kill from an older version, a bad disk) falls back to the newest checkpoint of the folder
  that loads, with a warning naming both, or fails with one line naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ebm_vae.data.readers.base import one_line
from ebm_vae.energy.model import CheckpointError
from ebm_vae.io import OutputError, atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing local files atomically (remote URLs as before)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                torch.save(checkpoint, tmp)
        except OutputError as exc:
            kept = (f"the previous {path.name} is intact" if path.is_file()
                    else f"there was no earlier {path.name}")
            raise OutputError(exc.errno, f"{exc.strerror}; {kept} (resume with ckpt_path=last "
                                         "once the cause is fixed)") from exc
        return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as saved by Lightning, loaded safely, or CheckpointError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # cut short, overwritten, not torch at all, a pickle of objects
        raise CheckpointError(f"{path}: not loadable as a checkpoint (damaged or cut short?): "
                              f"{one_line(exc)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise CheckpointError(f"{path}: not a training checkpoint (no state_dict and global_step)")
    return checkpoint


def resume_path(ckpt_path: str | None, folder: Path) -> str | None:
    """The checkpoint that `ckpt_path` (None, "last" or a path) resumes from; None = a fresh run.

    `last` is `<folder>/last.ckpt` when it exists (else a fresh run); when it does not load,
    the newest checkpoint of the folder that does (by global step), said in a warning.
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
        read_checkpoint(ckpt_path)
        return str(ckpt_path)
    last = folder / "last.ckpt"
    if not last.is_file():
        log.info("no %s yet: starting a fresh run", last)
        return None
    try:
        read_checkpoint(last)
    except CheckpointError as damaged:
        loadable = []
        for path in sorted(folder.glob("*.ckpt")):
            if path == last:
                continue
            try:
                loadable.append((read_checkpoint(path)["global_step"], path.stat().st_mtime, path))
            except CheckpointError as also:
                log.warning("%s", also)
        if not loadable:
            raise CheckpointError(f"ckpt_path=last: {damaged}; no other checkpoint in {folder} "
                                  f"loads: move {last.name} away to start a fresh run, or pass "
                                  "ckpt_path=PATH") from None
        step, _, newest = max(loadable)
        log.warning("%s; resuming from %s (step %d) instead, the newest checkpoint there that loads",
                    damaged, newest, step)
        return str(newest)
    log.info("resuming from %s", last)
    return str(last)
