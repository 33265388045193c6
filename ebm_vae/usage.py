"""What a user types and reads: the command line of a console script, and its `--help` page.

`parse_arguments` sorts Hydra's flags from the overrides, whatever their order (Hydra's own
argparse takes its flags only before the overrides). `help_page` lists an app's choices and
common overrides from the YAML files alone, so that it works with no other argument.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ebm_vae.config import config_dir

# Hydra's flags (hydra/_internal/utils.py::get_args_parser): alias -> name, and which take a value.
_ALIASES = {"-h": "--help", "-r": "--run", "-m": "--multirun", "-sc": "--shell-completion",
            "-c": "--cfg", "-p": "--package", "-cp": "--config-path", "-cn": "--config-name",
            "-cd": "--config-dir", "-i": "--info"}
_SWITCHES = {"--help", "--hydra-help", "--version", "--resolve", "--run", "--multirun",
             "--shell-completion", "--debug"}
_VALUED = {"--cfg", "--package", "--config-path", "--config-name", "--config-dir",
           "--experimental-rerun", "--info"}
_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_CFG_CHOICES = ("job", "hydra", "all")
_METAVARS = {"--config-dir": "DIR", "--cfg": "job|hydra|all", "--config-name": "NAME",
             "--config-path": "DIR", "--package": "PACKAGE", "--experimental-rerun": "FILE"}


class ArgumentError(Exception):
    """A command line that Hydra would misread; the message says what to type instead."""


@dataclass
class Arguments:
    hydra_argv: list[str]  # what Hydra's own parser gets: flags first, then the overrides
    overrides: list[str]
    config_dir: Path | None = None
    help: bool = False
    version: bool = False
    debug: bool = False


def parse_arguments(argv: Sequence[str], prog: str = "ebm-vae") -> Arguments:
    """Sort a command line into Hydra's flags and the overrides, whatever their order."""
    flags: list[str] = []
    overrides: list[str] = []
    seen: dict[str, str] = {}
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":  # the usual end of options: the rest are overrides
            overrides.extend(tokens[i:])
            break
        if not token.startswith("-"):
            if "=" not in token and not token.startswith("~"):
                raise ArgumentError(f"'{token}' is not a setting: settings are KEY=VALUE, e.g. "
                                    f"capsule={token} or trainer.max_steps=300 (see {prog} --help)")
            overrides.append(token)
            continue
        name, has_value, value = token.partition("=")
        name = _ALIASES.get(name, name)
        if name not in _SWITCHES | _VALUED:
            raise ArgumentError(f"unknown option '{token}': options are {', '.join(sorted(_SWITCHES | _VALUED))}; "
                                f"settings are KEY=VALUE (see {prog} --help)")
        if name in _SWITCHES:
            if has_value:
                raise ArgumentError(f"option {name} takes no value (got '{token}')")
            seen[name] = ""
            continue
        if not has_value:
            following = tokens[i] if i < len(tokens) else None
            if name == "--info" and following not in _INFO_CHOICES:
                value = "all"  # --info takes an optional value
            elif following is not None and not _is_flag(following):
                value, i = following, i + 1
            else:
                raise ArgumentError(f"option {name} needs a value: {name} {_METAVARS.get(name, 'VALUE')}")
        if name in seen and seen[name] != value:
            raise ArgumentError(f"option {name} given twice ({seen[name]} and {value}); give it once")
        if name == "--cfg" and value not in _CFG_CHOICES:
            raise ArgumentError(f"--cfg takes one of {', '.join(_CFG_CHOICES)}, not '{value}'")
        seen[name] = value
    for name, value in seen.items():
        if name != "--debug" and name not in ("--help", "--version"):
            flags.append(f"{name}={value}" if name in _VALUED else name)
    config = Path(seen["--config-dir"]).expanduser() if "--config-dir" in seen else None
    if config is not None:
        _check_config_dir(config)
    return Arguments(hydra_argv=flags + overrides, overrides=overrides, config_dir=config,
                     help="--help" in seen, version="--version" in seen, debug="--debug" in seen)


def _is_flag(token: str) -> bool:
    return _ALIASES.get(token.partition("=")[0], token.partition("=")[0]) in _SWITCHES | _VALUED


def _check_config_dir(path: Path) -> None:
    if not path.is_dir():
        raise ArgumentError(f"--config-dir {path}: no such folder")
    groups = [p for p in path.iterdir() if p.is_dir()]
    if not groups and any(path.glob("*.yaml")):
        hint = (f"pass the folder above it, --config-dir {path.parent}"
                if (config_dir() / path.name).is_dir() else f"put a capsule in {path}/capsule/NAME.yaml")
        raise ArgumentError(f"--config-dir {path} holds YAML files but no group folder (capsule/, "
                            f"preset/, ...): {hint}")


def help_page(app: Any, user_config: Path | None = None) -> str:
    """The page `--help` prints for an `ebm_vae.cli.App`; reads YAML files only."""
    dirs = [config_dir()] + ([user_config.resolve()] if user_config is not None else [])
    defaults = _defaults(config_dir() / f"{app.config_name}.yaml")
    lines = [f"{app.name}: {app.summary}", "", "Usage:"]
    lines += [f"  {app.name} {u}" for u in app.usage]
    if app.choices:
        lines += ["", app.choices_title]
        for group in app.choices:
            lines += _group_lines(group, dirs, defaults.get(group))
    if app.overrides:
        lines += ["", "Common overrides (every key of the config is one; see them with --cfg job):"]
        width = max(len(o) for o, _ in app.overrides)
        lines += [f"  {o:<{width}}  {what}" for o, what in app.overrides]
    lines += ["", "Options (anywhere on the line):",
              "  --config-dir DIR   your own groups: DIR/capsule/NAME.yaml, DIR/preset/NAME.yaml, ...",
              "  -m, --multirun     one run per value of comma-separated overrides (capsule=a,b)",
              "  --cfg job          print the composed config instead of running",
              "  --debug            a traceback instead of a one-line error (or HYDRA_FULL_ERROR=1)",
              "  --hydra-help       Hydra's own flags and settings",
              *app.notes, "", "Powered by Hydra (https://hydra.cc)"]
    return "\n".join(lines)


def _defaults(primary: Path) -> dict[str, str | None]:
    """group -> default option from a primary config's defaults list ('???' = must choose)."""
    try:
        entries = OmegaConf.to_container(OmegaConf.load(primary)).get("defaults", [])
    except Exception:  # the help must not fail on a config it only describes
        return {}
    out: dict[str, str | None] = {}
    for entry in entries:
        if isinstance(entry, dict):
            for key, value in entry.items():
                out[str(key).removeprefix("optional ").removeprefix("override ")] = value
    return out


def _group_lines(group: str, dirs: list[Path], default: str | None) -> list[str]:
    options: dict[str, tuple[str, Path]] = {}
    for d in dirs:  # later dirs win, as in Hydra's search path for a --config-dir
        for path in sorted((d / group).glob("*.yaml")):
            options[path.stem] = (_describe(path, group), path)
    if not options:
        return []
    if default == "???":
        head = f"  {group}  (required)"
    elif default and not default.startswith("$"):
        head = f"  {group}  (default {default})"
    elif group == "preset":
        head = f"  {group}  (picked by the capsule's name)"
    else:
        head = f"  {group}"
    width = max(len(name) for name in options)
    builtin = config_dir().resolve()
    lines = [head]
    for name, (text, path) in options.items():
        where = "" if builtin in path.resolve().parents else f"  [{path}]"
        lines.append(f"      {name:<{width}}  {text}{where}")
    return lines


def _describe(path: Path, group: str) -> str:
    """The first sentence of the file's leading comment; for a capsule without one, its
    variables and units."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"(unreadable: {exc.strerror})"
    comment = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        if "@package" not in stripped:
            comment.append(stripped.lstrip("#").strip())
    if comment:
        return re.split(r"(?<=\.)\s", " ".join(comment), maxsplit=1)[0]
    if group == "capsule":
        try:
            data = OmegaConf.to_container(OmegaConf.load(path))
            units = data.get("units") or [""] * len(data.get("variables", []))
            return ", ".join(f"{v} [{u}]" if u else str(v) for v, u in zip(data["variables"], units, strict=False))
        except Exception:
            return "(not a readable capsule file)"
    return ""
