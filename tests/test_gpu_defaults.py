"""`trainer=gpu` picks the fast path: precision per model, pinned host batches, non-blocking copies.

The choice itself is checked on any machine; what it does on a device (pinned batches, a run
in the chosen precision) only where CUDA is (`-m gpu`, skipped without it).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ebm_vae.config import compose
from ebm_vae.data.datamodule import datamodule_from_config
from ebm_vae.train import train, trainer_precision


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_the_gpu_trainer_leaves_the_precision_to_the_model(restore_matmul_precision):
    gpu = compose("train", ["capsule=grid", "trainer=gpu"]).trainer
    assert gpu.precision is None  # chosen per model unless the user sets it
    assert trainer_precision(gpu, "conv") == "bf16-mixed"
    torch.set_float32_matmul_precision("highest")
    assert trainer_precision(gpu, "mlp") == "32-true"  # bf16 autocast measured slower for MLPs
    assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls
    chosen = compose("train", ["capsule=grid", "trainer=gpu", "trainer.precision=bf16-mixed"]).trainer
    assert trainer_precision(chosen, "mlp") == "bf16-mixed"
    cpu = compose("train", ["capsule=grid", "trainer=cpu"]).trainer
    assert trainer_precision(cpu, "conv") == "32-true"
    ddp = OmegaConf.merge(compose("train", ["capsule=grid", "trainer=ddp"]).trainer, {"accelerator": "cpu"})
    assert trainer_precision(ddp, "conv") == "32-true"  # DDP on CPUs: no autocast


def test_batches_are_pinned_when_the_trainer_runs_on_cuda(demo_index, tmp_path):
    cfg = compose("train", ["capsule=grid", f"data.root={demo_index['data']}", f"paths.root={tmp_path}",
                            f"paths.index={demo_index['index']}", "data.batch_size=64"])
    datamodule = datamodule_from_config(cfg)
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")),
                                         current_epoch=0)
    assert datamodule.train_dataloader().pin_memory and datamodule.val_dataloader().pin_memory
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                         current_epoch=0)
    assert not datamodule.train_dataloader().pin_memory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_batches_arrive_pinned_and_the_grid_model_trains_in_fp32(train_cfg, tmp_path,
                                                                         restore_matmul_precision):
    cfg = train_cfg(tmp_path, "grid", "trainer=gpu", "trainer.max_steps=3")
    datamodule = datamodule_from_config(cfg)
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda")),
                                         current_epoch=0)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.is_pinned()
    moved = batch.to("cuda", non_blocking=True)  # what Lightning does with a batch for CUDA
    torch.cuda.synchronize()
    assert torch.equal(moved.cpu(), batch)
    metrics = train(cfg)
    assert math.isfinite(metrics["val/iwae"]) and torch.get_float32_matmul_precision() == "high"
