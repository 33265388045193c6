"""The console scripts as a user meets them: argument order, --help, one-line user errors.

Most cases call the apps' `main` in this process (a fresh Hydra each time) and read what
they print; one runs the installed console script, to show the same from a shell.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ebm_vae import demo
from ebm_vae.cli import message_of
from ebm_vae.config import compose
from ebm_vae.crawl import app as crawl_app
from ebm_vae.crawl.crawl import crawl
from ebm_vae.crawl.manifest import read_manifest
from ebm_vae.errors import USER_ERRORS, ConfigError, is_user_error
from ebm_vae.export import main as export_main
from ebm_vae.train import main as train_main
from ebm_vae.usage import ArgumentError, parse_arguments

PENDULUM = """\
# A pendulum: angle and angular velocity.
name: pendulum
match: {name: ["*pendulum*"]}
extractor: table
variables: [theta, omega]
units: [rad, rad/s]
"""


@pytest.fixture
def myconf(tmp_path) -> Path:
    conf = tmp_path / "MYCONF"
    (conf / "capsule").mkdir(parents=True)
    (conf / "capsule" / "pendulum.yaml").write_text(PENDULUM)
    return conf


def run(main, *argv: str, capsys) -> tuple[int, str, str]:
    """Call a console script's main in this process: (exit status, stdout, stderr)."""
    try:
        main(list(argv))
        status = 0
    except SystemExit as exc:
        status = exc.code or 0
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- argument order


def test_every_order_of_flags_and_overrides_reaches_hydra_the_same(myconf):
    parts = [("--config-dir", str(myconf)), ("capsule=pendulum",), ("trainer.max_steps=300",), ("-m",)]
    expected = [f"--config-dir={myconf}", "--multirun", "capsule=pendulum", "trainer.max_steps=300"]
    for order in itertools.permutations(parts):
        args = parse_arguments([token for part in order for token in part])
        flags = [a for a in args.hydra_argv if a.startswith("-")]
        overrides = [a for a in args.hydra_argv if not a.startswith("-")]
        assert args.hydra_argv == flags + overrides  # flags first: what Hydra's parser needs
        assert sorted(args.hydra_argv) == sorted(expected)
        assert overrides == [p[0] for p in order if not p[0].startswith("-")]  # their order kept
        assert args.config_dir == myconf


@pytest.mark.parametrize("spelling", [["--config-dir", "{d}"], ["--config-dir={d}"], ["-cd", "{d}"]])
def test_config_dir_spellings(myconf, spelling):
    args = parse_arguments(["capsule=pendulum", *(s.format(d=myconf) for s in spelling), "seed=1"])
    assert args.hydra_argv == [f"--config-dir={myconf}", "capsule=pendulum", "seed=1"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["grid"], "'grid' is not a setting: settings are KEY=VALUE, e.g. capsule=grid"),
        (["--bogus", "capsule=grid"], "unknown option '--bogus'"),
        (["capsule=grid", "--config-dir"], "option --config-dir needs a value: --config-dir DIR"),
        (["--config-dir", "-m", "capsule=grid"], "option --config-dir needs a value"),
        (["--cfg", "everything"], "--cfg takes one of job, hydra, all"),
        (["-m=1"], "option --multirun takes no value"),
        (["--config-dir", "{d}", "--config-dir", "{d}/other"], "option --config-dir given twice"),
        (["--config-dir", "{d}/nope"], "no such folder"),
        (["--config-dir", "{d}/capsule"], "pass the folder above it, --config-dir {d}"),
    ],
)
def test_command_lines_hydra_would_misread_are_refused_saying_what_to_type(myconf, argv, needle):
    (myconf / "other").mkdir()
    with pytest.raises(ArgumentError, match=None) as info:
        parse_arguments([a.format(d=myconf) for a in argv], "ebm-vae-train")
    assert needle.format(d=myconf) in str(info.value)


def test_user_capsule_flow_in_any_order_composes(myconf, tmp_path, capsys):
    """The README's flow, `ebm-vae-train --config-dir MYCONF ... capsule=pendulum`, in each order."""
    for argv in (["--config-dir", str(myconf), "capsule=pendulum", "trainer.max_steps=300"],
                 ["capsule=pendulum", "--config-dir", str(myconf), "trainer.max_steps=300"],
                 ["capsule=pendulum", "trainer.max_steps=300", "--config-dir", str(myconf)]):
        status, out, err = run(train_main, *argv, f"paths.root={tmp_path}", "--cfg", "job", capsys=capsys)
        assert status == 0, err
        cfg = yaml.safe_load(out)
        assert cfg["capsule"]["name"] == "pendulum" and cfg["trainer"]["max_steps"] == 300
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- --help


@pytest.mark.parametrize("main", [train_main, export_main, crawl_app.main])
def test_help_needs_no_other_argument_and_lists_choices(main, myconf, capsys):
    status, out, err = run(main, "--config-dir", str(myconf), "--help", capsys=capsys)
    assert status == 0 and err == ""
    assert out.count("Powered by Hydra") == 1
    assert "_schema" not in out and "Traceback" not in out
    for capsule in ("fusion", "grid", "wafer", "pendulum"):  # the user's capsule too
        assert f"      {capsule}" in out
    assert "pendulum  A pendulum: angle and angular velocity." in out
    assert "Common overrides" in out and "paths.root=DIR" in out


def test_train_help_lists_presets_trainers_and_models(capsys):
    status, out, _ = run(train_main, "-h", capsys=capsys)
    assert status == 0
    for section in ("capsule  (required)", "preset  (picked by the capsule's name)",
                    "trainer  (default cpu)", "model  (default auto)"):
        assert section in out
    for option in ("cpu", "gpu", "ddp", "auto", "conv", "mlp", "demo", "fast"):
        assert f"      {option} " in out
    for override in ("data.root=DIR", "trainer.max_steps=N", "ckpt_path=last|PATH"):
        assert f"  {override} " in out


def test_installed_console_script_help_from_a_shell(tmp_path):
    done = subprocess.run(["ebm-vae-export", "--help"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert "export.method=vae|histogram" in done.stdout and done.stdout.count("Powered by Hydra") == 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- one-line errors


def one_error_line(err: str, program: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{program}: error: "), err
    return lines[0]


def crawled_grid_tree(base: Path) -> tuple[Path, Path]:
    """A crawled grid tree with statistics: (data root, paths.root)."""
    data, out = base / "data", base / "out"
    demo.write_grid_parquet(data / "grid_a.parquet", n_rows=400)
    crawl(compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1",
                            "crawl.progress=false"]))
    return data, out


@pytest.fixture(scope="module")
def grid_index(tmp_path_factory):
    """Shared by the tests that leave it as it is (a failing command writes nothing)."""
    return crawled_grid_tree(tmp_path_factory.mktemp("grid_index"))


@pytest.mark.parametrize(
    ("program", "argv", "needle"),
    [
        ("export", ["capsule=nosuch"], "Could not find 'capsule/nosuch'; Available options in 'capsule': fusion, grid, wafer"),
        ("export", [], "You must specify 'capsule'"),
        ("export", ["capsule=grid", "data.bogus=1"], "Key 'bogus' not in 'DataConfig'"),
        ("export", ["capsule=grid", "export.method=histogram", "export.axes=[foo,bar]"],
         "export.axes: unknown state component(s) ['foo', 'bar']"),
        ("export", ["capsule=grid", "export.method=histogram", "export.limits=[[1000,2000],[0,1]]"],
         "export.limits for frequency: [1000.0, 2000.0] lies outside the data"),
        ("export", ["capsule=grid", "ckpt={out}/nope.ckpt"], "nope.ckpt: no checkpoint"),
        ("export", ["capsule=grid", "export.method=magic"], "export.method must be"),
        ("train", ["capsule=grid", "paths.root={out}/fresh"], "no manifest; pass data.root=DIR"),
        ("train", ["capsule=grid", "ckpt_path={out}/nope.ckpt"], "ckpt_path: no checkpoint at"),
        ("train", ["capsule=pendulum", "--config-dir", "{conf}"], "capsule 'pendulum' has no usable files under data.root="),
        ("train", ["capsule=broken", "--config-dir", "{conf}"], "invalid capsule key 'variabels'"),
        ("export", ["capsule=notyaml", "--config-dir", "{conf}"], "notyaml.yaml\", line 1, column 7"),
        ("export", ["capsule=evil", "--config-dir", "{conf}"],
         "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
        ("crawl", [], "data.root is not set"),
        ("crawl", ["data.root={out}/nope"], "not a directory"),
    ],
)
def test_a_user_error_is_one_line_exit_1_and_leaves_no_run_folder(grid_index, myconf, capsys, program, argv, needle):
    data, out = grid_index
    (myconf / "capsule" / "broken.yaml").write_text(PENDULUM.replace("pendulum", "broken") + "variabels: [x]\n")
    (myconf / "capsule" / "notyaml.yaml").write_text("name: [unclosed\n")
    (myconf / "capsule" / "evil.yaml").write_text(PENDULUM.replace("pendulum", "evil").replace(
        "extractor: table", f'extractor: !!python/object/apply:os.system ["touch {myconf}/ran"]'))
    main = {"export": export_main, "train": train_main, "crawl": crawl_app.main}[program]
    argv = [a.format(out=out, conf=myconf) for a in argv]
    if not any(a.startswith("paths.root=") for a in argv):
        argv.append(f"paths.root={out}")
    status, _, err = run(main, *argv, capsys=capsys)
    assert status == 1
    assert needle in one_error_line(err, f"ebm-vae-{program}")
    assert not (out / "logs").exists()
    assert not (myconf / "ran").exists()  # a YAML tag never runs code


def test_debug_shows_the_traceback(grid_index, tmp_path):
    _, out = grid_index
    from ebm_vae.energy.grid import GridError

    with pytest.raises(GridError, match="unknown state component"):
        export_main(["capsule=grid", "export.method=histogram", "export.axes=[foo,bar]",
                     f"paths.root={tmp_path}", f"paths.index={out}/index", "--debug"])
    assert list((tmp_path / "logs" / "hydra" / "runs").glob("*/export.log"))  # kept, for the bug report


def test_a_run_that_warned_keeps_its_log_with_the_error_in_it(tmp_path, capsys):
    data, out = crawled_grid_tree(tmp_path)
    os.utime(data / "grid_a.parquet", ns=(1, 1))  # changed since the crawl: skipped with a warning
    status, _, err = run(export_main, "capsule=grid", "export.method=histogram", f"paths.root={out}",
                         capsys=capsys)
    line = one_error_line(err, "ebm-vae-export")
    assert status == 1 and f"no usable file in the index of data.root={data}" in line
    (log_file,) = (out / "logs" / "hydra" / "runs").glob("*/export.log")
    text = log_file.read_text()
    assert "changed since the crawl" in text and line in text


def test_a_sweep_reports_each_failed_run_and_goes_on(grid_index, capsys):
    _, out = grid_index
    status, _, err = run(train_main, "-m", "capsule=grid,wafer", f"ckpt_path={out}/nope.ckpt",
                         f"paths.root={out}", "debug=fast", capsys=capsys)
    assert status == 1
    lines = [line for line in err.splitlines() if line.startswith("ebm-vae-train")]
    assert lines[0].startswith("ebm-vae-train (capsule=grid ckpt_path=") and "no checkpoint" in lines[0]
    assert lines[1].startswith("ebm-vae-train (capsule=wafer ckpt_path=")
    assert lines[2].startswith("ebm-vae-train: 2 of 2 runs failed")
    assert not (out / "logs").exists()  # the sweep folder holds nothing: gone too


def test_the_registry_names_real_exception_classes():
    import importlib

    for name in USER_ERRORS:
        module, _, cls = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type), name
    assert is_user_error(ConfigError("x")) and is_user_error(FileNotFoundError("ours"))
    assert not is_user_error(FileNotFoundError(2, "No such file or directory"))  # the OS's: a bug
    assert not is_user_error(ValueError("x"))


def test_hydra_messages_become_one_line():
    from hydra.errors import MissingConfigException

    exc = MissingConfigException("In 'train': Could not find 'capsule/x'\n\nAvailable options in "
                                 "'capsule':\n\tfusion\n\tgrid\nConfig search path:\n\tprovider=hydra")
    assert message_of(exc) == "In 'train': Could not find 'capsule/x'; Available options in 'capsule': fusion, grid"


# --------------------------------------------------------------------------- the index of another root


def test_crawling_another_root_into_an_index_is_refused_naming_both(tmp_path, caplog):
    data, out = crawled_grid_tree(tmp_path)
    other = tmp_path / "other"
    demo.write_grid_csv(other / "grid_b.csv", n_rows=100)
    cfg = compose("crawl", [f"data.root={other}", f"paths.root={out}", "crawl.workers=1", "crawl.progress=false"])
    before = (out / "index" / "manifest.parquet").read_bytes()
    with pytest.raises(ConfigError) as info:
        crawl(cfg)
    assert f"is the index of data.root={data}" in str(info.value)
    assert f"not of {other}" in str(info.value) and "crawl.replace_index=true" in str(info.value)
    assert (out / "index" / "manifest.parquet").read_bytes() == before

    train_cfg = compose("train", ["capsule=grid", f"data.root={other}", f"paths.root={out}"])
    from ebm_vae.data.datamodule import load_index

    with pytest.raises(ConfigError, match="crawl.replace_index=true"):  # training: the same refusal
        load_index(train_cfg, pytest.importorskip("ebm_vae.capsules").visible_capsules()["grid"])

    with caplog.at_level(logging.WARNING, logger="ebm_vae.crawl.crawl"):
        manifest = crawl(compose("crawl", [f"data.root={other}", f"paths.root={out}", "crawl.workers=1",
                                           "crawl.progress=false", "crawl.stats=false",
                                           "crawl.replace_index=true"]))
    assert manifest.root == other and read_manifest(out / "index").root == other
    assert f"replacing the index of {data}" in caplog.text and "removed its statistics (grid)" in caplog.text
    assert not (out / "index" / "grid" / "stats.json").exists()  # they described the old tree
