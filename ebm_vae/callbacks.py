"""Lightning callbacks of `ebm-vae-train` (conf/callbacks/default.yaml plugs them in).

- `LastCheckpoint`: `last.ckpt` on a step schedule and at the end (resume: ckpt_path=last).
- `ValidateAtEnd`: every run ends with fresh validation metrics.
- `StepProgressBar`: step / max_steps, samples/s and the time left, across epochs and resumes.
- `TimeCapWarning`: says loudly when `trainer.max_time` cut a run short of its step budget.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, Timer
from rich.progress import (
    BarColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` steps and when training ends.

    (Lightning's own `save_last` skips the final save whenever any earlier one happened, so a
    run ending between two saves would resume from a stale checkpoint.)
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 200):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidateAtEnd(Callback):
    """Validate at the step that reaches `max_steps` too, not only on the schedule.

    Every run then ends with fresh validation metrics (returned to sweepers) and a best
    checkpoint, however its length relates to `val_check_interval`. Lightning validates when
    `should_stop` is raised; this raises it at the last step.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class _SamplesPerSecond(ProgressColumn):
    """Rows advance in steps (training) or batches (validation): samples/s = rate x samples each."""

    def __init__(self, samples_per_unit: int):
        super().__init__()
        self.samples_per_unit = samples_per_unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("- samples/s", style="progress.data.speed")
        rate = speed * task.fields.get("samples_per_unit", self.samples_per_unit)
        return Text(f"{rate:,.0f} samples/s", style="progress.data.speed")


class StepProgressBar(RichProgressBar):
    """One bar for the whole run in optimizer steps: `train grid  1200/3000  41,000 samples/s
    0:01:02 • 0:01:40  train/loss ...`, continuing from the resumed step.

    Lightning's own bar counts the batches of an epoch against `max_epochs`, which a run
    limited by `max_steps` over a stream leaves unset: it showed `Epoch 117/-2` and, after a
    resume, `55/8`. `batch_size` is the per-rank batch (samples/s counts every rank).
    """

    def __init__(self, batch_size: int, refresh_rate: int = 1, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.batch_size = batch_size

    def configure_columns(self, trainer: L.Trainer) -> list:
        return [TextColumn("[progress.description]{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                _SamplesPerSecond(self.batch_size * trainer.world_size),
                TimeElapsedColumn(), TextColumn("•"), TimeRemainingColumn()]

    def _total_steps(self, trainer: L.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        if trainer.max_epochs and trainer.max_epochs > 0 and self.total_train_batches != float("inf"):
            return int(trainer.max_epochs * self.total_train_batches / trainer.accumulate_grad_batches)
        return None

    def _start_train_bar(self, trainer: L.Trainer) -> None:
        name = getattr(trainer.lightning_module.hparams, "capsule", {}).get("name", "")
        self.train_progress_bar_id = self.progress.add_task(
            f"train {name}".strip(), total=self._total_steps(trainer), completed=trainer.global_step,
            samples_per_unit=self.batch_size * trainer.world_size * trainer.accumulate_grad_batches)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._start_train_bar(trainer)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._start_train_bar(trainer)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class TimeCapWarning(Callback):
    """A WARNING when `trainer.max_time` ended the run before `trainer.max_steps`.

    The step budget is what makes a run's result repeatable; the time cap is a safety net. A
    run the cap cut short depends on how busy the machine was, and the user must know.
    `cut_short` holds the message (None when the run reached its step budget).
    """

    def __init__(self) -> None:
        self.cut_short: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or not 0 < trainer.global_step < trainer.max_steps:
            return
        if (timer.time_remaining("train") or 0.0) > 0:
            return  # stopped for another reason
        elapsed = dt.timedelta(seconds=round(timer.time_elapsed("train")))
        self.cut_short = (
            f"trainer.max_time cut the run short after {elapsed} at step {trainer.global_step} "
            f"of trainer.max_steps={trainer.max_steps}: the machine was slower or busier than the cap "
            f"allows, so this model (and its map) is not the one its step budget gives; "
            f"finish it with ckpt_path=last, or raise trainer.max_time")
        if trainer.is_global_zero:
            log.warning(self.cut_short)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence exactly the Lightning and torch messages that say nothing about this run, and
    Lightning's second copy of its own lines.

    - Lightning's "💡 Tip" adverts for its cloud logger and model registry.
    - torch's FutureWarning on `LeafSpec`, raised inside Lightning's own `_pytree` helper.
    - "Your `IterableDataset` has `__len__` defined ... could be inaccurate": the stream
      splits its work units across DataLoader workers and ranks itself (every sample once,
      tests/test_stream.py::test_every_id_exactly_once_over_2_ranks_x_2_workers) and its
      `__len__` is the number of batches each rank yields.
    - "The number of training batches (N) is smaller than the logging interval": metrics are
      logged every `log_every_n_steps` optimizer steps across epochs, so short epochs lose none.
    """
    import warnings

    root = logging.getLogger()
    if root.hasHandlers():  # the app's logging (Hydra's console and log file) shows Lightning's
        umbrella = logging.getLogger("lightning")  # lines; `import lightning` adds a second console
        for handler in [h for h in umbrella.handlers if type(h) is logging.StreamHandler]:
            umbrella.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller "
                                              r"than the logging interval")
