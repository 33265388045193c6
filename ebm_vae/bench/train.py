"""Training throughput: `python scripts/bench.py train [--json] [--quick] [--gpu] [--workdir DIR]`.

`grid_cpu`: samples/s of the full training pipeline of the grid capsule as `ebm-vae-train` runs
it (Lightning Trainer, the capsule's StateStream from demo Parquet files, the VAE, AdamW,
gradient clipping; the preset's batch of 4096) beside an in-memory loop of the same model, batch and optimiser over a
pre-generated tensor, and their ratio (target >= 0.8). Steps after a warm-up are timed; figures
are the best of `REPEATS` runs made in turns, per wall-second and per CPU-second (one torch
thread, so that on a shared machine the CPU clock is stable).
`--gpu` adds `grid_gpu` (the same at batch 16,384 with bf16 autocast, data loader workers
feeding pinned batches; target ratio >= 0.5) and `grid_gpu_precision` (the in-memory loop in
bf16-mixed beside float32).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from ebm_vae import demo
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data.datamodule import datamodule_from_config
from ebm_vae.data.extractors.base import StateInfo

REPEATS = 3


class StepClock(Callback):
    """Wall and CPU time from the end of step `warmup` to the end of step `warmup + steps`."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.start: tuple[float, float] | None = None
        self.elapsed: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        now = (time.perf_counter(), time.process_time())
        if trainer.global_step == self.warmup:
            self.start = now
        elif trainer.global_step == self.warmup + self.steps and self.start is not None:
            self.elapsed = (now[0] - self.start[0], now[1] - self.start[1])


def _config(root: Path, out: Path, overrides: list[str]) -> Any:
    return compose("train", ["capsule=grid", f"data.root={root}", f"paths.root={out}", *overrides])


def _pipeline(cfg: Any, warmup: int, steps: int) -> tuple[float, float]:
    """(wall, cpu) seconds of `steps` training steps of the full pipeline, after `warmup`."""
    datamodule = datamodule_from_config(cfg)
    model = instantiate(cfg.model, _convert_="all", state=datamodule.stats.state)
    model.set_normalization(datamodule.stats)
    clock = StepClock(warmup, steps)
    trainer = instantiate(cfg.trainer, max_steps=warmup + steps, max_time=None, logger=False,
                          callbacks=[clock], enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert clock.elapsed is not None
    return clock.elapsed


def _in_memory(cfg: Any, state: dict, device: torch.device, precision: str, warmup: int,
               steps: int) -> tuple[float, float]:
    """(wall, cpu) seconds of `steps` steps of the same model, loss, optimiser and clipping
    over batches of a tensor already on `device`."""
    model = instantiate(cfg.model, _convert_="all", state=state).to(device)
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    batch_size = cfg.data.batch_size
    data = torch.randn(8 * batch_size, *model.state_info.shape, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    clip = cfg.trainer.gradient_clip_val

    def step(i: int) -> None:  # what the Trainer runs per step: support, loss, clip, step, EMA
        x = data[(i % 8) * batch_size:(i % 8 + 1) * batch_size]
        model.record_support(x)
        with autocast:
            objective, _ = model.training_loss(x)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.members.parameters(), clip)
        optimizer.step()
        scheduler.step()
        model.update_ema()

    for i in range(warmup):
        step(i)
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(i)
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(samples: int, *fns) -> list[dict[str, float]]:
    """Best samples per wall- and CPU-second of each `fn() -> (wall, cpu)`, run in turns."""
    best = [{"wall": 0.0, "cpu": 0.0} for _ in fns]
    for _ in range(REPEATS):
        for rates, fn in zip(best, fns, strict=True):
            wall, cpu = fn()
            rates["wall"] = max(rates["wall"], samples / wall)
            rates["cpu"] = max(rates["cpu"], samples / cpu)
    return best


def _entry(pipeline: dict[str, float], memory: dict[str, float], key: str, **extra: Any) -> dict[str, Any]:
    return {"pipeline_samples_per_s": pipeline[key], "in_memory_samples_per_s": memory[key],
            "ratio": pipeline[key] / memory[key], **extra}


def _grid_tree(root: Path, quick: bool) -> None:
    rows = 200_000 if quick else 500_000
    for i in range(2):
        demo.write_grid_parquet(root / f"grid_frequency_{i}.parquet", n_rows=rows, seed=i)


def _field_precision(device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """The fusion conv VAE (3 x 64 x 64, GPU-sized widths) in memory: bf16-mixed beside fp32."""
    batch, channels = 256, 32
    cfg = compose("train", ["capsule=fusion", "trainer=gpu", f"data.batch_size={batch}",
                            f"model.channels={channels}"])
    state = StateInfo.field(["Bx", "By", "Bz"], ["T"] * 3, (64, 64)).to_dict()
    bf16, fp32 = _best(steps * batch,
                       lambda: _in_memory(cfg, state, device, "bf16-mixed", warmup, steps),
                       lambda: _in_memory(cfg, state, device, "32-true", warmup, steps))
    return {"bf16_samples_per_s": bf16["wall"], "fp32_samples_per_s": fp32["wall"],
            "ratio": bf16["wall"] / fp32["wall"], "batch_size": batch, "channels": channels}


def run(args: Any) -> dict[str, dict[str, Any]]:
    logging.getLogger("ebm_vae").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warmup, steps = (5, 40) if args.quick else (10, 100)
    results: dict[str, dict[str, Any]] = {}
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root, out = work / "train_tree", work / "train_out"
        _grid_tree(root, args.quick)
        with contextlib.redirect_stdout(None):
            crawl(compose("crawl", [f"data.root={root}", f"paths.root={out}", "crawl.progress=false"]))

        cfg = _config(root, out, ["trainer=cpu"])  # the capsule's preset batch size
        state = datamodule_from_config(cfg).stats.state
        torch.set_num_threads(1)
        try:
            pipeline, memory = _best(
                steps * cfg.data.batch_size, lambda: _pipeline(cfg, warmup, steps),
                lambda: _in_memory(cfg, state, torch.device("cpu"), "32-true", warmup, steps))
        finally:
            torch.set_num_threads(threads)
        results["grid_cpu"] = _entry(pipeline, memory, "cpu", batch_size=cfg.data.batch_size,
                                     pipeline_wall_samples_per_s=pipeline["wall"],
                                     in_memory_wall_samples_per_s=memory["wall"],
                                     wall_ratio=pipeline["wall"] / memory["wall"], target_ratio=0.8)

        if args.gpu and torch.cuda.is_available():
            workers = max(1, min(8, (os.cpu_count() or 2) - 1))
            gpu = _config(root, out, ["trainer=gpu", "data.batch_size=16384", f"data.num_workers={workers}"])
            cuda = torch.device("cuda")
            pipeline, memory, fp32 = _best(
                steps * gpu.data.batch_size, lambda: _pipeline(gpu, warmup, steps),
                lambda: _in_memory(gpu, state, cuda, "bf16-mixed", warmup, steps),
                lambda: _in_memory(gpu, state, cuda, "32-true", warmup, steps))
            results["grid_gpu"] = _entry(pipeline, memory, "wall", batch_size=16384,
                                         num_workers=workers, precision="bf16-mixed",
                                         device=torch.cuda.get_device_name(cuda), target_ratio=0.5)
            results["grid_gpu_precision"] = {
                "bf16_samples_per_s": memory["wall"], "fp32_samples_per_s": fp32["wall"],
                "ratio": memory["wall"] / fp32["wall"], "batch_size": 16384}
            results["fusion_gpu_precision"] = _field_precision(cuda, warmup, steps)
    return results
