"""The capsule registry and the typed config schemas: bad configuration fails at start, naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from ebm_vae.capsules import CapsuleError, load_capsule_file, parse_capsule, visible_capsules
from ebm_vae.config import compose, config_dir

USER_CAPSULE = """\
name: pendulum
match: {name: ["*pendulum*"]}
extractor: table
variables: [theta, omega]
units: [rad, rad/s]
"""


def write_capsule(root, name, text):
    d = root / "capsule"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(text)
    return root


def test_builtin_capsules_are_valid():
    capsules = visible_capsules()
    assert set(capsules) >= {"fusion", "wafer", "grid"}
    assert capsules["grid"].units == ["Hz", "rad"]
    assert capsules["fusion"].extractor == "fusion"


def test_user_capsule_is_added_and_replaces_a_builtin(tmp_path):
    write_capsule(tmp_path, "pendulum", USER_CAPSULE)
    write_capsule(tmp_path, "grid", USER_CAPSULE.replace("pendulum", "grid"))
    capsules = visible_capsules([tmp_path])
    assert capsules["pendulum"].variables == ["theta", "omega"]
    assert capsules["grid"].extractor == "table"  # the user's file replaced the built-in one
    assert capsules["fusion"].extractor == "fusion"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (USER_CAPSULE + "variabels: [x]\n", "variabels"),
        (USER_CAPSULE + "_target_: os.system\n", "_target_"),
        (USER_CAPSULE.replace("extractor: table", "extractor: magic"), "magic"),
        (USER_CAPSULE.replace("units: [rad, rad/s]", "units: [rad]"), "units"),
        (USER_CAPSULE.replace('match: {name: ["*pendulum*"]}', "match: {}"), "match"),
        (USER_CAPSULE.replace("name: pendulum", "name: other"), "differs"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_capsule_files_fail_naming_the_key_and_file(tmp_path, text, needle):
    path = write_capsule(tmp_path, "pendulum", text) / "capsule" / "pendulum.yaml"
    with pytest.raises(CapsuleError) as info:
        load_capsule_file(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_parse_capsule_rejects_non_mapping():
    with pytest.raises(CapsuleError, match="mapping"):
        parse_capsule(["not", "a", "mapping"])


def test_compose_fails_on_misspelt_or_mistyped_keys():
    cfg = compose("export", ["capsule=grid", "export.k=8"])
    assert cfg.export.k == 8
    with pytest.raises(ConfigCompositionException, match="resolutoin"):
        compose("export", ["capsule=grid", "export.resolutoin=8"])
    with pytest.raises(ConfigCompositionException, match="export.k"):
        compose("export", ["capsule=grid", "export.k=many"])
    with pytest.raises(ConfigCompositionException, match="batch_sise"):
        compose("crawl", ["data.batch_sise=3"])


def test_capsule_is_required_and_user_dirs_reach_the_group(tmp_path):

    with pytest.raises(ConfigCompositionException, match="capsule=<OPTION>"):
        compose("export", [])
    write_capsule(tmp_path, "pendulum", USER_CAPSULE)
    cfg = compose("export", ["capsule=pendulum"], extra_dirs=[tmp_path])
    assert cfg.capsule.name == "pendulum"
    assert list(cfg.capsule_search_path) == [str(tmp_path.resolve())]


def test_outputs_follow_paths_root(tmp_path):
    cfg = compose("crawl", [f"paths.root={tmp_path}"])
    assert cfg.paths.index == f"{tmp_path}/index"
    assert cfg.paths.checkpoints == f"{tmp_path}/checkpoints"
    assert (config_dir() / "crawl.yaml").is_file()
