"""`ebm-vae-train`: fit the VAE of one capsule on its stream (a thin Hydra app around `train`).

    ebm-vae-train capsule=NAME data.root=DIR [trainer=gpu] [trainer.max_steps=N] [ckpt_path=last]
    ebm-vae-train -m capsule=fusion,wafer,grid data.root=DIR      # one run per capsule
    ebm-vae-train capsule=NAME init_from=PATH                     # fine-tune: weights only

Outputs: checkpoints/<capsule>/{last,epoch_NNN}.ckpt and logs/tensorboard/<capsule>/ (one
directory per capsule, so a resumed run continues its curves).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, open_dict

from ebm_vae.config import config_dir

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


def resolve_ckpt_path(ckpt_path: str | None, checkpoints: Path) -> str | None:
    """`last` -> `<checkpoints>/last.ckpt` when it exists (else start fresh); a path must exist."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = checkpoints / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.info("no %s yet: starting a fresh run", last)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
    return str(ckpt_path)


def warm_start(model: L.LightningModule, path: str | Path) -> None:
    """Fine-tuning: take the weights of the checkpoint's VAE where names and shapes match.

    The model keeps its own normalisation (the new statistics) and gets a fresh optimiser and
    step count, unlike `ckpt_path` (a resume, which restores all of them).
    """
    from ebm_vae.energy.model import load_vae

    own = dict(model.named_parameters())
    taken = {name: weights for name, weights in load_vae(path, "cpu").named_parameters()
             if name in own and own[name].shape == weights.shape}
    if not taken:
        raise ValueError(f"init_from={path}: none of its weights fit this model (other state or widths)")
    model.load_state_dict(taken, strict=False)
    log.info("fine-tuning from %s (%d of %d weight tensors)", path, len(taken), len(own))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the VAE of `cfg.capsule`; returns the final metrics (val/iwae, val/elbo, ...) as floats."""
    from ebm_vae.data.datamodule import datamodule_from_config  # torch + readers: import on use

    L.seed_everything(cfg.seed, workers=True)
    datamodule = datamodule_from_config(cfg)  # validates the capsule first, naming a bad key
    capsule, stats = datamodule.capsule, datamodule.stats
    log.info("capsule %s: state %s, %d samples; training on %d work units, validating on %d",
             capsule.name, tuple(datamodule.state.shape), stats.count,
             len(datamodule.train_units), len(datamodule.val_units))

    model = instantiate(
        cfg.model, _convert_="all", state=stats.state, capsule=dataclasses.asdict(capsule),
        stats_meta={"count": stats.count, "created": stats.created, "files": stats.files,
                    "field_rank": stats.field_rank},
    )
    model.set_normalization(stats)
    if cfg.get("init_from"):
        warm_start(model, cfg.init_from)
    log.info("model: %s (%s, latent %d, %d parameters)", cfg.model._target_, model.hparams.arch,
             model.hparams.latent_dim, sum(p.numel() for p in model.parameters()))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    log.info("callbacks: %s; logger: %s", ", ".join(type(c).__name__ for c in callbacks),
             type(logger).__name__ if logger else None)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    log.info("trainer: %s, %s x %s, precision %s, max_steps %s", trainer.strategy.__class__.__name__,
             trainer.num_nodes, trainer.num_devices, trainer.precision, trainer.max_steps)

    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, Path(cfg.paths.checkpoints) / capsule.name)
    # weights_only: a checkpoint is a file from somewhere; torch < 2.6 would unpickle anything in it
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("%s: %s", capsule.name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return metrics


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    from ebm_vae.capsules import hydra_search_path

    with open_dict(cfg):
        cfg.capsule_search_path = list(cfg.capsule_search_path) + hydra_search_path()
    metrics = train(cfg)
    return metrics.get("val/iwae", math.nan)  # for sweepers: lower is better
