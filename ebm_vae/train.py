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
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from ebm_vae.cli import App
from ebm_vae.errors import ConfigError

log = logging.getLogger(__name__)


def data_provenance(datamodule: Any) -> dict[str, Any]:
    """The checkpoint's `stats_meta`: the statistics' count, date and files, and the split's
    train/validation samples and files (plain containers)."""
    stats = datamodule.stats
    files = [{k: v for k, v in f.items() if k != "blocks"} for f in stats.files]
    return {"count": stats.count, "created": stats.created, "files": files, "split": datamodule.split,
            "field_rank": stats.field_rank}


def warm_start(model, path: str | Path) -> None:
    """Fine-tuning: take the weights of the checkpoint's VAE where names and shapes match.

    The model keeps its own normalisation (the new statistics) and gets a fresh optimiser and
    step count, unlike `ckpt_path` (a resume, which restores all of them).
    """
    from ebm_vae.energy.model import load_vae

    own = dict(model.named_parameters())
    taken = {name: weights for name, weights in load_vae(path, "cpu").named_parameters()
             if name in own and own[name].shape == weights.shape}
    if not taken:
        raise ConfigError(f"init_from={path}: none of its weights fit this model (other state or widths)")
    model.load_state_dict(taken, strict=False)
    log.info("fine-tuning from %s (%d of %d weight tensors)", path, len(taken), len(own))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the VAE of `cfg.capsule`; returns the final metrics (val/iwae, val/elbo, ...) as floats."""
    import lightning as L  # torch, Lightning and the readers: imported on use (a fast --help)
    from lightning.pytorch.callbacks import ProgressBar

    from ebm_vae.callbacks import quiet_lightning
    from ebm_vae.checkpoints import AtomicCheckpointIO, resume_path
    from ebm_vae.data.datamodule import datamodule_from_config
    from ebm_vae.data.report import DataSummary

    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = datamodule_from_config(cfg)  # validates the capsule first, naming a bad key
    capsule, stats = datamodule.capsule, datamodule.stats
    split = datamodule.split
    log.info("capsule %s: state %s; training on %d samples of %d files, validating on %d samples of %d files",
             capsule.name, tuple(datamodule.state.shape), split["train_samples"], split["train_files"],
             split["val_samples"], split["val_files"])

    model = instantiate(cfg.model, _convert_="all", state=stats.state, capsule=dataclasses.asdict(capsule),
                        stats_meta=data_provenance(datamodule))
    model.set_normalization(stats)
    if cfg.get("init_from"):
        warm_start(model, cfg.init_from)
    log.info("model: %s (%s, latent %d, %d parameters)", cfg.model._target_, model.hparams.arch,
             model.hparams.latent_dim, sum(p.numel() for p in model.parameters()))
    data_summary = DataSummary()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [data_summary]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    log.info("callbacks: %s; logger: %s", ", ".join(type(c).__name__ for c in callbacks),
             type(logger).__name__ if logger else None)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()],
                          precision=trainer_precision(cfg.trainer, model.hparams.arch))
    log.info("trainer: %s, %s x %s, precision %s, max_steps %s", trainer.strategy.__class__.__name__,
             trainer.num_nodes, trainer.num_devices, trainer.precision, trainer.max_steps)

    checkpoints = Path(cfg.paths.checkpoints) / capsule.name
    with _checkpoint_folder_lock(checkpoints, capsule.name):
        ckpt_path = resume_path(cfg.ckpt_path, checkpoints)
        with warnings.catch_warnings():
            if ckpt_path is not None:  # a resume writes into its own folder: no news
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            # weights_only: a checkpoint is a file from somewhere; torch < 2.6 would unpickle anything in it
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("%s: %s", capsule.name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if trainer.is_global_zero:
        report_data(datamodule, data_summary.totals)
    return metrics


def trainer_precision(trainer_cfg: Any, arch: str) -> str:
    """The trainer's precision: the configured one, else (`trainer=gpu` leaves it null) the fast
    one per model on a GPU: bf16-mixed for the conv field model (faster than fp32 there); fp32
    with TF32 matmuls for the MLP, where bf16 autocast measured slower (0.83-0.87 of fp32: the
    casts cost more than the small matmuls gain). Without a GPU: fp32."""
    import torch

    if trainer_cfg.get("precision") is not None:
        return str(trainer_cfg.precision)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and arch == "conv":
        return "bf16-mixed"
    if on_gpu:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (process-wide)
    return "32-true"


def report_data(datamodule: Any, totals: dict[str, dict[str, Any]]) -> None:
    """The run's closing data summary: the split, NaN/Inf samples and rows that did not parse,
    quarantined and skipped files, totalled over workers and ranks."""
    from ebm_vae.data.report import summary_lines

    for line in summary_lines(datamodule.capsule.name, datamodule.split, datamodule.stats,
                              datamodule.manifest, totals):
        log.info(line)


def _checkpoint_folder_lock(folder: Path, capsule: str):
    """One training per checkpoint folder: a second one of the same capsule and paths.root
    would interleave its checkpoints and curves with the first's. Held by the global rank 0
    only (from the launcher's environment: the trainer has not started the other ranks yet)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from ebm_vae.locks import output_lock

    if getattr(rank_zero_only, "rank", 0) != 0:
        return nullcontext()
    return output_lock(folder, f"training capsule {capsule}", wait=False,
                       advice="one training per capsule and paths.root: wait for it to end, "
                              "or give this one another paths.root=DIR")


def objective(cfg: DictConfig) -> float:
    """`train`, returning val/iwae for Hydra's sweepers (lower is better)."""
    return train(cfg).get("val/iwae", math.nan)


main = App(
    name="ebm-vae-train", config_name="train", task=objective,
    summary="fit the VAE of one capsule on its stream of states (PyTorch Lightning); writes "
            "checkpoints/<capsule>/ and logs/tensorboard/<capsule>/ under paths.root",
    usage=("capsule=NAME [data.root=DIR] [KEY=VALUE ...] [--config-dir MYCONF]",
           "-m capsule=fusion,wafer,grid data.root=DIR      # one run per capsule",
           "capsule=NAME ckpt_path=last                     # resume (a killed run, or more steps)"),
    choices=("capsule", "preset", "trainer", "model", "experiment", "debug"),
    overrides=(
        ("data.root=DIR", "the data tree; crawled into paths.root/index first if not indexed yet"),
        ("paths.root=DIR", "where every output goes (default: the current folder)"),
        ("trainer.max_steps=N", "optimizer steps of the run (presets: a brief run)"),
        ("ckpt_path=last|PATH", "resume from checkpoints/<capsule>/last.ckpt, or a checkpoint file"),
        ("trainer=gpu", "one GPU, precision chosen per model (fp32/TF32 MLP, bf16 conv); trainer=ddp trainer.devices=N for several"),
        ("data.batch_size=N", "states per batch and rank"),
        ("data.num_workers=N", "DataLoader worker processes per rank"),
        ("model.latent_dim=N", "latent dimension (default: the core's size up to 64, else 16)"),
        ("model.lr=X", "AdamW learning rate"),
        ("trainer.max_time=DD:HH:MM:SS", "a wall-time cap (a safety net: the step budget decides)"),
        ("callbacks.checkpoint.every_n_train_steps=N", "how often last.ckpt is written"),
    ),
).main
