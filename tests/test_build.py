"""`ebm-vae-build`: every capsule in one run, incremental reruns, failures kept to their capsule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from ebm_vae import EnergyLandscape, demo
from ebm_vae.build import build, split_overrides, training_mode
from ebm_vae.config import compose
from ebm_vae.data.stats import Stats
from ebm_vae.errors import ConfigError
from ebm_vae.locks import LockedError

SETTINGS = ["debug=fast", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "export.resolution=8", "export.k=2", "export.progress=false", "crawl.progress=false",
            "crawl.workers=1", "export.device=cpu"]
BROKEN = "name: broken\nmatch: {name: ['broken_*']}\nextractor: table\nvariables: [u, v]\nunits: [m, m]\n"
SHOTS_PRESET = "# @package _global_\nmodel:\n  hidden: 16\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """grid (CSV, 2-D: counted), shots (a plasma shot log, user capsule, 3-D: the VAE, with a
    preset), broken (a user capsule whose only file has no finite value)."""
    base = tmp_path_factory.mktemp("build")
    data, config = base / "data", base / "conf"
    demo.write_grid_csv(data / "grid" / "grid_frequency_a.csv", n_rows=20_000)
    demo.write_shot_capsule(config)
    demo.write_shot_log(data / "shots" / "shotlog_2024.log", n_shots=400)
    (config / "capsule" / "broken.yaml").write_text(BROKEN)
    (config / "preset").mkdir()
    (config / "preset" / "shots.yaml").write_text(SHOTS_PRESET)
    (data / "other").mkdir()
    (data / "other" / "broken_1.csv").write_text("u,v\n" + "nan,nan\n" * 50)
    return {"data": data, "config": config, "out": base / "out"}


def run_build(tree, *extra: str):
    overrides = [f"data.root={tree['data']}", f"paths.root={tree['out']}", *SETTINGS, *extra]
    return build(compose("build", overrides, extra_dirs=[tree["config"]]), overrides)


@pytest.fixture(scope="module")
def first(tree):
    return run_build(tree)


def rows_by_name(report):
    return {r.capsule: r for r in report.rows}


def test_one_run_builds_every_capsule_and_reports_each(first, tree):
    rows = rows_by_name(first)
    assert set(rows) == {"broken", "fusion", "grid", "shots", "wafer"}
    assert rows["fusion"].status == rows["wafer"].status == "no usable files"
    assert rows["grid"].status == "built" and rows["grid"].method == "histogram"
    assert rows["grid"].train_s is None and rows["grid"].files == 1 and rows["grid"].samples == 20_000
    assert rows["shots"].status == "built" and rows["shots"].method == "vae-iwae"
    assert rows["shots"].train_s > 0 and np.isfinite(rows["shots"].val_bound)
    assert rows["broken"].status == "failed" and "no finite samples" in rows["broken"].reason
    assert "\n" not in rows["broken"].reason
    assert first.stages["total"] >= sum(first.stages[s] for s in ("crawl", "statistics", "method", "training", "export"))
    # the preset of the user's config dir applied to its capsule
    ckpt = torch.load(tree["out"] / "checkpoints" / "shots" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["hidden"] == 16


def test_the_catalogue_describes_every_map(first, tree):
    catalogue = json.loads((tree["out"] / "energy_maps" / "landscape.json").read_text())
    assert catalogue["maps_dir"] == "energy_maps" and set(catalogue["capsules"]) == {"grid", "shots"}
    grid, shots = catalogue["capsules"]["grid"], catalogue["capsules"]["shots"]
    assert grid["map"] == "energy_maps/grid.npz" and grid["plot"] == "energy_maps/grid.png"
    assert grid["checkpoint"] is None and grid["quantity"] == "marginal"
    assert "counting resolves the map" in grid["method_reason"]
    assert [(a["name"], a["unit"]) for a in grid["axes"]] == [("frequency", "Hz"), ("phase_angle", "rad")]
    assert grid["data"]["files"] == 1 and grid["data"]["samples"] == 20_000 and grid["data"]["bytes"] > 0
    assert 0 <= grid["quality"]["empty_fraction"] < 1
    assert shots["checkpoint"] == "checkpoints/shots/last.ckpt" and shots["quantity"] == "marginal"
    assert "counting does not resolve the map (392 states counted in 2-D" in shots["method_reason"]
    assert [a["unit"] for a in shots["axes"]] == ["MA", "1e19 m^-3"]
    assert shots["quality"]["val/iwae"] is not None and shots["training"]["mode"] == "fresh"
    data = shots["data"]  # 2 % malformed lines; a tenth of every file held out for validation
    assert data["samples"] + data["validation_samples"] == 400 - data["skipped_rows"] == 392
    assert 0 < data["validation_samples"] < 0.2 * 392 and grid["data"]["validation_samples"] is None
    assert shots["command"].startswith(f"ebm-vae-train --config-dir {tree['config']} capsule=shots")
    assert "&& ebm-vae-export" in shots["command"] and "export.method=vae" in shots["command"]
    assert shots["created"] and set(shots["fingerprint"]) == {"data", "settings", "train", "export"}


def test_the_build_is_one_query_surface(first, tree):
    land = EnergyLandscape.open(tree["out"] / "energy_maps")
    assert land.capsules == ["grid", "shots"]
    shots = land.energy("shots", np.array([[1.0, 4.0, 2.5], [1.2, 5.0, np.nan]]), k=2)
    assert shots.source == "model" and np.isfinite(shots.energy[0]) and np.isnan(shots.energy[1])
    stats = Stats.load(tree["out"] / "index" / "grid" / "stats.json")
    grid = land.energy("grid", stats.mean[None, :])
    assert grid.source == "map" and np.isfinite(grid.energy).all()


def test_a_second_run_redoes_only_what_changed(first, tree):
    again = rows_by_name(run_build(tree))
    assert again["grid"].status == again["shots"].status == "unchanged"
    assert again["broken"].status == "failed"  # still reported, still alone
    ckpt = tree["out"] / "checkpoints" / "shots" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns
    log = tree["data"] / "shots" / "shotlog_2024.log"
    log.write_text(log.read_text() + log.read_text().splitlines()[0] + "\n")  # one more shot
    changed = rows_by_name(run_build(tree))
    assert changed["shots"].status == "fine-tuned" and changed["grid"].status == "unchanged"
    assert ckpt.stat().st_mtime_ns != before
    entry = json.loads((tree["out"] / "energy_maps" / "landscape.json").read_text())["capsules"]["shots"]
    assert entry["training"]["mode"] == "fine-tune" and entry["training"]["why"] == "its files changed"
    # other export settings: the map is made again, the model is not trained again
    export_only = rows_by_name(run_build(tree, "export.resolution=6"))
    assert export_only["shots"].status == "re-exported" and export_only["grid"].status == "built"


def test_training_modes_from_the_checkpoint(first, tree):
    ckpt = tree["out"] / "checkpoints" / "shots" / "last.ckpt"
    stats = Stats.load(tree["out"] / "index" / "shots" / "stats.json")
    base = ["capsule=shots", f"data.root={tree['data']}", f"paths.root={tree['out']}", *split_overrides(SETTINGS)["train"]]
    cfg = compose("train", base, extra_dirs=[tree["config"]])
    assert training_mode(ckpt, stats, cfg, force=False)[0] == "up to date"
    assert training_mode(ckpt, stats, cfg, force=True)[0] == "fresh"
    with open_dict(cfg):
        cfg.trainer.max_steps = 1000
    assert training_mode(ckpt, stats, cfg, force=False) == ("resume", "3 of 1000 steps done")
    cfg.model.hidden = 8
    assert training_mode(ckpt, stats, cfg, force=False) == ("fresh", "model settings changed: hidden")
    assert training_mode(ckpt.with_name("none.ckpt"), stats, cfg, force=False)[0] == "fresh"


HOLD_LOCK = """
import sys, time
from ebm_vae.locks import output_lock
with output_lock(sys.argv[1], "a test holding the catalogue"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_build_on_the_same_outputs_is_refused(first, tree):
    """Another process holds the catalogue (as a running build does): this one refuses at once."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tree["out"] / "energy_maps" / "landscape.json")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match="another ebm-vae-build is writing this landscape"):
            run_build(tree)
    finally:
        holder.kill()
        holder.wait()


def test_overrides_reach_the_stage_they_belong_to():
    split = split_overrides(["trainer.max_steps=5", "export.k=2", "data.batch_size=64", "model=mlp",
                             "paths.root=/x", "data.root=/d", "hydra.run.dir=/h", "build.force=true",
                             "+export.reference={x: 1}", "debug=fast", "seed=3"])
    assert split["train"] == ["trainer.max_steps=5", "data.batch_size=64", "model=mlp", "debug=fast", "seed=3"]
    assert split["export"] == ["export.k=2", "data.batch_size=64", "+export.reference={x: 1}"]


@pytest.mark.parametrize("override, message", [
    ("export.out=/tmp/x.npz", "export.out does not apply to ebm-vae-build"),
    ("paths.checkpoints=/elsewhere", "lies outside paths.root"),
    ("build.capsules=[nope]", r"build.capsules: unknown capsule\(s\) \['nope'\]"),
])
def test_bad_settings_fail_at_start(tree, tmp_path, override, message):
    overrides = [f"data.root={tree['data']}", f"paths.root={tmp_path}", *SETTINGS, override]
    with pytest.raises(ConfigError, match=message):
        build(compose("build", overrides, extra_dirs=[tree["config"]]), overrides)


def test_a_misspelt_override_fails_at_compose():
    with pytest.raises(Exception, match="trainr"):
        compose("build", ["data.root=/tmp", "trainr.max_steps=3"])


@pytest.mark.slow
def test_the_seeds_scale_27_user_capsules_in_one_run(tmp_path):
    """27 generated capsules in six formats (CSV, Parquet, HDF5, NetCDF, regex and key=value
    logs), one build; every one mapped and queryable."""
    from ebm_vae.bench.build import make_capsules

    data, config = make_capsules(tmp_path, n=27, rows=1500)
    tree = {"data": data, "config": config, "out": tmp_path / "out"}
    report = run_build(tree)
    rows = [r for r in report.rows if r.capsule.startswith("probe")]
    assert len(rows) == 27 and not report.failed, [r.reason for r in report.failed]
    assert all(r.status == "built" and r.map for r in rows)
    land = EnergyLandscape.open(tree["out"] / "energy_maps")
    assert len(land.capsules) == 27
    for name in land.capsules:
        entry = land.entry(name)
        states = np.zeros((1, entry.state_info.dim)) + Stats.load(tree["out"] / "index" / name / "stats.json").mean
        assert np.isfinite(land.energy(name, states, k=2).energy).all(), name
    assert all(r.status == "unchanged" for r in run_build(tree).rows if r.capsule.startswith("probe"))


def test_the_console_script_says_what_failed_in_one_line_and_exits_1(tree, tmp_path, capsys):
    """`ebm-vae-build` through the shared wrapper: the summary, then one error line, exit 1."""
    from ebm_vae.build import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config-dir", str(tree["config"]), f"data.root={tree['data']}", f"paths.root={tmp_path}",
              "build.capsules=[broken]", *SETTINGS])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1
    assert "broken" in out and "failed" in out  # the summary row
    assert err.strip().splitlines()[-1] == ("ebm-vae-build: error: 1 of 1 capsules failed (broken; the reasons "
                                            "are above); the others are built and catalogued")


def test_help_lists_the_users_capsules(tree, capsys):
    from ebm_vae.build import main

    main(["--help", "--config-dir", str(tree["config"])])
    out = capsys.readouterr().out
    assert out.startswith("ebm-vae-build: the whole pipeline in one run")
    assert "shots" in out and "build.capsules=[a,b]" in out
