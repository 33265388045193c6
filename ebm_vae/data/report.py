"""Counts, not silence: what the stream read, dropped and skipped, totalled over workers and ranks.

A stream's DataLoader workers are processes of their own, so per-process counters would be
reported once per worker (or lost). `StreamCounters` lives in shared memory, made before the
workers start: each worker writes only its own slot (states read, NaN/Inf states dropped, and
a small ledger of skipped files with their reasons), and the training process sums the slots.
At the end of a run `DataSummary` gathers every rank's totals (all ranks take part) and
`summary_lines` puts them beside what the statistics pass found per file (NaN/Inf samples,
rows that did not parse) and the quarantined files, for `ebm-vae-train`'s closing summary.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

LEDGER_BYTES = 1 << 14  # per worker: skipped files and reasons (more are counted, not named)


class StreamCounters:
    """Per-worker-slot totals of one stream in shared memory (see the module docstring)."""

    READ, DROPPED, SKIPPED, SKIPPED_ROWS = range(4)

    def __init__(self, n_slots: int = 1):
        n_slots = max(1, n_slots)
        self.numbers = torch.zeros((n_slots, 4), dtype=torch.int64).share_memory_()
        self.ledger = torch.zeros((n_slots, LEDGER_BYTES), dtype=torch.uint8).share_memory_()
        self.used = torch.zeros(n_slots, dtype=torch.int64).share_memory_()
        self._views: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_views": None}  # the tensors travel as shared memory; views do not

    def _arrays(self) -> tuple:
        """NumPy views of the shared tensors: writing a number through one costs ~0.1 us, a
        torch op on a tensor element ~1,000 times more."""
        if self._views is None:
            self._views = (self.numbers.numpy(), self.ledger.numpy(), self.used.numpy())
        return self._views

    def add(self, slot: int, read: int = 0, dropped: int = 0, skipped_rows: int = 0) -> None:
        numbers = self._arrays()[0]
        row = slot % len(numbers)
        numbers[row, self.READ] += read
        numbers[row, self.DROPPED] += dropped
        numbers[row, self.SKIPPED_ROWS] += skipped_rows

    def skipped(self, slot: int, path: str, reason: str) -> None:
        """Note a file this worker skipped (once per worker and file)."""
        numbers, ledger, used = self._arrays()
        slot %= len(numbers)
        numbers[slot, self.SKIPPED] += 1
        line = f"{path}\t{reason}\n".encode("utf-8", errors="replace")
        start = int(used[slot])
        if start + len(line) <= LEDGER_BYTES:
            ledger[slot, start : start + len(line)] = np.frombuffer(line, dtype=np.uint8)
            used[slot] = start + len(line)

    def totals(self) -> dict[str, Any]:
        """{read, dropped, skipped_rows, skipped: {path: reason}} over every slot (a file
        skipped by several workers is one file)."""
        numbers, ledger, used = self._arrays()
        read, dropped, _, skipped_rows = numbers.sum(axis=0).tolist()
        skipped: dict[str, str] = {}
        for slot in range(len(used)):
            for line in ledger[slot, : used[slot]].tobytes().decode("utf-8", errors="replace").splitlines():
                path, _, reason = line.partition("\t")
                skipped.setdefault(path, reason)
        return {"read": int(read), "dropped": int(dropped), "skipped_rows": int(skipped_rows),
                "skipped": skipped}


def merge_totals(parts: list[dict[str, Any]]) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    for part in parts:
        for path, reason in part["skipped"].items():
            skipped.setdefault(path, reason)
    return {"read": sum(p["read"] for p in parts), "dropped": sum(p["dropped"] for p in parts),
            "skipped_rows": sum(p.get("skipped_rows", 0) for p in parts), "skipped": skipped}


def gather_totals(totals: dict[str, Any]) -> dict[str, Any]:
    """Every rank's totals merged (a collective: every rank must call it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, totals)
        return merge_totals(parts)
    return totals


class DataSummary(L.Callback):
    """At the end of `fit`, the train and validation streams' totals over workers and ranks."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, Any]] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        streams = getattr(trainer.datamodule, "streams", {})
        for name in ("train", "val"):
            empty = {"read": 0, "dropped": 0, "skipped_rows": 0, "skipped": {}}
            stream = streams.get(name)
            self.totals[name] = gather_totals(stream.counters.totals() if stream is not None else empty)


def summary_lines(capsule: str, split: dict[str, Any], stats: Any, manifest: Any,
                  totals: dict[str, dict[str, Any]]) -> list[str]:
    """The closing summary of a training run, one fact per line."""
    lines = [f"data summary of capsule {capsule}:",
             f"  split: {split['train_samples']:,} training samples from {split['train_files']} files, "
             f"{split['val_samples']:,} validation samples from {split['val_files']} files"
             f"{'' if split.get('exact', True) else ' (CSV counts estimated from bytes)'}"]
    nonfinite = sum(f.get("n_read", 0) - f.get("n_finite", 0) for f in stats.files)
    if nonfinite:
        lines.append(f"  {nonfinite:,} samples with NaN/Inf values in the data (statistics pass): never used")
    bad_rows = {f["path"]: f["skipped_rows"] for f in stats.files if f.get("skipped_rows")}
    if bad_rows:
        lines.append(f"  {sum(bad_rows.values()):,} rows/lines that did not parse, in {len(bad_rows)} files: "
                     + ", ".join(f"{p} ({n:,})" for p, n in list(bad_rows.items())[:5])
                     + (" ..." if len(bad_rows) > 5 else ""))
    quarantined = [(e.path, e.error) for e in manifest.entries()
                   if e.capsule == capsule and e.error and e.error.startswith("quarantined")]
    for path, error in quarantined:
        lines.append(f"  quarantined: {path}: {error.removeprefix('quarantined: ')}")
    for name in ("train", "val"):
        t = totals.get(name)
        if not t:
            continue
        lines.append(f"  {name} stream: {t['read']:,} states read, {t['dropped']:,} dropped (NaN/Inf), "
                     f"{t.get('skipped_rows', 0):,} rows/lines that did not parse (every pass meets them "
                     f"again), {len(t['skipped'])} files skipped")
        for path, reason in sorted(t["skipped"].items()):
            lines.append(f"    skipped {path}: {reason}")
    for path in [s["path"] for s in stats.skipped if s["path"] not in dict(quarantined)]:
        reason = next(s["reason"] for s in stats.skipped if s["path"] == path)
        lines.append(f"  not in the statistics: {path}: {reason}")
    return lines
