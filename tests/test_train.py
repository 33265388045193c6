"""`train(cfg)` end to end on tiny demo data: a run per capsule, checkpoints, resume, CLI, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from ebm_vae.callbacks import ValidateAtEnd
from ebm_vae.capsules import CapsuleError
from ebm_vae.data.stats import Stats
from ebm_vae.model.vae import VAE
from ebm_vae.train import train

CAPSULES = ("fusion", "wafer", "grid")
VAL_METRICS = ("val/elbo", "val/iwae", "val/recon", "val/kl", "val/iwae_phys")


def tensorboard_tags(run_dir: Path) -> dict[Path, dict[str, list[int]]]:
    """{event file: {tag: [steps]}} of a TensorBoard run directory."""
    out = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        tags: dict[str, list[int]] = {}
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
        out[path] = tags
    return out


@pytest.fixture(scope="module")
def runs(train_cfg, tmp_path_factory) -> dict[str, tuple[Path, dict[str, float]]]:
    """One single-step training run per built-in capsule: {capsule: (paths.root, metrics)}."""
    results = {}
    for capsule in CAPSULES:
        out = tmp_path_factory.mktemp(f"run_{capsule}")
        results[capsule] = out, train(train_cfg(out, capsule, "trainer.max_steps=1"))
    return results


@pytest.mark.parametrize("capsule", CAPSULES)
def test_a_one_step_run_per_builtin_capsule(runs, capsule):
    out, metrics = runs[capsule]
    assert all(math.isfinite(metrics[k]) for k in (*VAL_METRICS, "train/loss"))
    ckpts = out / "checkpoints" / capsule
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    tb = out / "logs" / "tensorboard" / capsule
    tags = {t for file_tags in tensorboard_tags(tb).values() for t in file_tags}
    assert {*VAL_METRICS, "train/loss", "hp_metric", "val/energy_slice"} <= tags
    assert any(t.startswith("lr-") for t in tags)
    assert ("val/reconstructions" in tags) == (capsule != "grid")


def test_checkpoint_is_self_describing_and_loads_in_a_fresh_process(runs, demo_index, tmp_path):
    out, _ = runs["fusion"]
    ckpt = out / "checkpoints" / "fusion" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain containers only
    assert raw["hyper_parameters"]["capsule"]["name"] == "fusion"
    assert raw["hyper_parameters"]["state"]["channel_names"] == ["Bx", "By", "Bz"]
    stats = Stats.load(demo_index["index"] / "fusion" / "stats.json")

    model = VAE.load_from_checkpoint(ckpt, weights_only=True)
    assert model.state_info.shape == (3, 16, 16)
    assert model.transform.out_shape == (stats.field_rank,) and model.hparams.arch == "mlp"
    assert model.pca_components.shape == (4, 3 * 16 * 16)
    x = torch.randn(3, *model.transform.out_shape, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    expected = model.log_prob_bound(x, k=8, generator=torch.Generator().manual_seed(0))

    script = (
        "import json, sys, torch\n"
        "from ebm_vae.model.vae import VAE\n"
        "m = VAE.load_from_checkpoint(sys.argv[1], weights_only=True)\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "b = m.log_prob_bound(x, k=8, generator=torch.Generator().manual_seed(0))\n"
        "print(json.dumps({'bound': b.tolist(), 'log_jacobian': m.log_jacobian}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(ckpt), str(tmp_path / "x.pt")],
                          capture_output=True, text=True, check=True)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(fresh["bound"], expected.numpy(), rtol=1e-5)
    assert fresh["log_jacobian"] == pytest.approx(model.log_jacobian)


def test_resume_after_an_interrupted_run_continues_steps_and_curves(train_cfg, tmp_path, monkeypatch):
    n = 4
    cfg = train_cfg(tmp_path, "grid", f"trainer.max_steps={2 * n}", "trainer.log_every_n_steps=1",
                    f"callbacks.checkpoint.every_n_train_steps={n}", f"trainer.val_check_interval={n}")
    last = tmp_path / "checkpoints" / "grid" / "last.ckpt"

    def killed_after_step_n(self, trainer, *args):
        if trainer.global_step > n:
            raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(ValidateAtEnd, "on_train_batch_end", killed_after_step_n)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    assert torch.load(last, weights_only=True)["global_step"] == n

    cfg.ckpt_path = "last"
    metrics = train(cfg)
    assert math.isfinite(metrics["val/iwae"])
    assert torch.load(last, weights_only=True)["global_step"] == 2 * n
    tb = tmp_path / "logs" / "tensorboard"
    assert [p.name for p in tb.iterdir()] == ["grid"]  # the same run directory, no version_1
    first, second = tensorboard_tags(tb / "grid").values()
    assert min(first["train/loss"]) == 0
    assert n <= min(second["train/loss"]) and max(second["train/loss"]) == 2 * n - 1

    cfg.trainer.max_steps = 3 * n  # a finished run extends the same way
    train(cfg)
    assert torch.load(last, weights_only=True)["global_step"] == 3 * n
    third = list(tensorboard_tags(tb / "grid").values())[-1]
    assert 2 * n <= min(third["train/loss"]) and max(third["train/loss"]) == 3 * n - 1
    assert min(third["val/iwae"]) >= 2 * n


def test_resume_from_last_without_a_checkpoint_starts_fresh(train_cfg, tmp_path):
    metrics = train(train_cfg(tmp_path, "grid", "ckpt_path=last", "trainer.max_steps=1"))
    assert math.isfinite(metrics["val/iwae"])


def test_bad_keys_fail_at_start_naming_them(train_cfg, tmp_path):
    with pytest.raises(CapsuleError, match="bogus"):
        train(train_cfg(tmp_path, "grid", "+capsule.bogus=1"))
    with pytest.raises(Exception, match="latnt_dim"):
        train(train_cfg(tmp_path, "grid", "+model.latnt_dim=3"))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("capsule", ["fusion", "grid"])
def test_gpu_run_in_bf16(train_cfg, tmp_path, capsule):
    metrics = train(train_cfg(tmp_path, capsule, "trainer=gpu", "trainer.max_steps=3"))
    assert all(math.isfinite(metrics[k]) for k in VAL_METRICS)
    model = VAE.load_from_checkpoint(tmp_path / "checkpoints" / capsule / "last.ckpt",
                                     map_location="cuda", weights_only=True)
    x = torch.randn(64, *model.state_info.shape, device="cuda")
    exact = model.log_prob_bound(x, k=4, generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = model.log_prob_bound(x, k=4, generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(mixed, exact, rtol=1e-2, atol=0.05)


def run_cli(args: list[str], tmp_path: Path, extra_path: Path | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    done = subprocess.run(["ebm-vae-train", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def cli_overrides(demo_index, out: Path) -> list[str]:
    return [f"data.root={demo_index['data']}", f"paths.root={out}",
            f"paths.index={demo_index['index']}", "debug=fast", "trainer.enable_progress_bar=false"]


def test_multirun_trains_one_model_per_capsule(demo_index, tmp_path):
    run_cli(["-m", "capsule=fusion,wafer,grid", *cli_overrides(demo_index, tmp_path)], tmp_path)
    for capsule in CAPSULES:
        assert (tmp_path / "checkpoints" / capsule / "last.ckpt").is_file()
        assert (tmp_path / "logs" / "tensorboard" / capsule).is_dir()
    assert (tmp_path / "logs" / "hydra" / "multiruns").is_dir()  # not in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "logs"]


RECORDER = """
import numpy as np
from lightning.pytorch.callbacks import Callback


class RecordBatches(Callback):
    '''Saves the training states a rank saw in epoch 0 to OUT/rank<r>.npy.'''

    def __init__(self, out):
        self.out, self.rows = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.rows.append(batch.detach().cpu().reshape(len(batch), -1).numpy())

    def on_train_end(self, trainer, pl_module):
        np.save(f"{self.out}/rank{trainer.global_rank}.npy", np.concatenate(self.rows))
"""


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_shards_the_data(demo_index, tmp_path):
    (tmp_path / "record_batches.py").write_text(RECORDER)
    run_cli(["capsule=grid", *cli_overrides(demo_index, tmp_path), "trainer=ddp",
             "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=6",
             "data.batch_size=128", "data.unit_samples=500",
             "+callbacks.record._target_=record_batches.RecordBatches",
             f"+callbacks.record.out={tmp_path}"], tmp_path, extra_path=tmp_path)
    rank0, rank1 = (np.load(tmp_path / f"rank{r}.npy") for r in (0, 1))
    assert len(rank0) == len(rank1) > 0
    seen0 = {row.tobytes() for row in rank0}
    seen1 = {row.tobytes() for row in rank1}
    assert not seen0 & seen1
    assert torch.load(tmp_path / "checkpoints" / "grid" / "last.ckpt", weights_only=True)["global_step"] == 6
