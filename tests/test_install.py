"""Installed use: the console scripts work from a wheel, not only from a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ebm_vae import demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True, capture_output=True, cwd=out,
    )
    (path,) = out.glob("ebm_vae-*.whl")
    return path


def test_wheel_carries_every_module_config_and_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ebm_vae").rglob("*.py")}
    configs = {"ebm_vae/conf/" + p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert modules - names == set(), "a package is missing from [tool.setuptools] packages"
    assert configs - names == set()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("ebm-vae-crawl", "ebm-vae-train", "ebm-vae-export", "ebm-vae-build", "ebm-vae-query"):
        assert script in text


def test_installed_query_reads_its_packaged_defaults(wheel, tmp_path):
    """ebm-vae-query is no Hydra app: it finds conf/query.yaml inside the installed package."""
    from landscapes import make_landscape

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    make_landscape(tmp_path / "land")
    (tmp_path / "points.csv").write_text("a,b\n0.5,1.0\n")
    program = ("import sys; from ebm_vae.query import main;"
               f"sys.exit(main(['paths.root={tmp_path / 'land'}', 'capsule=counts', 'input=points.csv', 'output=e.csv']))")
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "e.csv").read_text().splitlines()[0] == '"a","b","energy"'


def test_installed_crawl_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    data = tmp_path / "data"
    data.mkdir()
    demo.write_grid_csv(data / "grid_frequency_2024_01.csv", n_rows=200)
    program = (
        "import sys, ebm_vae.config as c; print(c.config_dir());"
        "from ebm_vae.crawl.app import main;"
        f"sys.argv = ['ebm-vae-crawl', 'data.root={data}', 'paths.root={tmp_path / 'out'}', 'crawl.progress=false'];"
        "main()"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0] == str(site / "ebm_vae" / "conf")
    assert (tmp_path / "out" / "index" / "manifest.parquet").is_file()
    assert (tmp_path / "out" / "index" / "grid" / "stats.json").is_file()
