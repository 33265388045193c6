"""The one registry of capsules: built-in YAML in `conf/capsule/` plus users' config dirs.

A capsule file is data, never code: it is parsed with a safe YAML loader (a tag that would
construct an object, `!!python/object/apply:...`, is refused, not run), validated against
`CapsuleConfig` (unknown keys, `_target_` included, fail with the key and the file named), and
nothing in it is instantiated. A log rule is compiled by RE2, which has no backtracking: a
pattern cannot make a read take more than linear time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ebm_vae.config import CapsuleConfig, config_dir


class CapsuleError(ValueError):
    """A capsule definition that cannot be used; the message names the file and the key."""


def _target_key(value: Any, prefix: str = "") -> str | None:
    """The dotted key of the first `_target_` at any depth of a mapping (or list), else None."""
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if key == "_target_":
            return f"{prefix}{key}"
        if (found := _target_key(item, f"{prefix}{key}.")) is not None:
            return found
    return None


def parse_capsule(data: Mapping[str, Any] | Any, source: str = "<config>") -> CapsuleConfig:
    """Validate one capsule definition (a mapping or a DictConfig) into a plain `CapsuleConfig`."""
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, Mapping):
        raise CapsuleError(f"{source}: a capsule must be a mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != "defaults"}
    if (nested := _target_key(data)) is not None:  # params reach hydra's instantiate as kwargs
        raise CapsuleError(f"{source}: invalid capsule key '{nested}': a capsule is data; "
                           "'_target_' (code to instantiate) is not allowed in it")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CapsuleConfig), data)
        capsule = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        raise CapsuleError(f"{source}: invalid capsule key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if capsule.units and capsule.variables and len(capsule.units) != len(capsule.variables):
        raise CapsuleError(
            f"{source}: capsule.units has {len(capsule.units)} entries for "
            f"{len(capsule.variables)} variables"
        )
    _check_variable_keys(capsule, source)
    if not (capsule.match.name or capsule.match.attrs or capsule.match.columns):
        raise CapsuleError(f"{source}: capsule '{capsule.name}' has no match rule (match.name/attrs/columns)")
    from ebm_vae.data.extractors import EXTRACTORS  # the extractor registry validates its params

    if capsule.extractor not in EXTRACTORS:
        raise CapsuleError(
            f"{source}: capsule.extractor '{capsule.extractor}' is unknown; known: {sorted(EXTRACTORS)}"
        )
    return capsule


def _check_variable_keys(capsule: CapsuleConfig, source: str) -> None:
    """`columns` and `bounds` name variables; bounds are [lo, hi] numbers or null, lo < hi."""
    for key in ("columns", "bounds"):
        unknown = [name for name in getattr(capsule, key) if name not in capsule.variables]
        if unknown:
            raise CapsuleError(f"{source}: invalid capsule key '{key}.{unknown[0]}': not one of the "
                               f"capsule's variables {list(capsule.variables)}")
    if capsule.csv.skip_rows < 0:
        raise CapsuleError(f"{source}: invalid capsule key 'csv.skip_rows': must be >= 0")
    _check_log_rule(capsule, source)
    for name, pair in capsule.bounds.items():
        try:
            lo, hi = (None if v is None else float(v) for v in pair)
        except (TypeError, ValueError):
            raise CapsuleError(f"{source}: invalid capsule key 'bounds.{name}': expected [lo, hi] "
                               f"numbers or null, got {pair}") from None
        if lo is None and hi is None or (lo is not None and hi is not None and not lo < hi):
            raise CapsuleError(f"{source}: invalid capsule key 'bounds.{name}': {pair} is not a "
                               "bound (need lo < hi, at most one of them null)")


def _check_log_rule(capsule: CapsuleConfig, source: str) -> None:
    """`log.pattern` compiles in RE2, its groups are named after variables (or `timestamp`);
    without a pattern, `log.timestamp_format` must say where a leading timestamp ends."""
    from ebm_vae.data.readers.log import TIMESTAMP, format_regex, pattern_groups

    log = capsule.log
    if log.pattern is not None:
        try:
            groups = pattern_groups(log.pattern)
        except ValueError as exc:
            raise CapsuleError(f"{source}: invalid capsule key 'log.pattern': {exc}") from None
        unknown = [g for g in groups if g not in capsule.variables and g != TIMESTAMP]
        if unknown:
            raise CapsuleError(f"{source}: invalid capsule key 'log.pattern': group '{unknown[0]}' is not "
                               f"one of the capsule's variables {list(capsule.variables)} (or 'timestamp')")
    elif log.timestamp_format is not None:
        try:
            format_regex(log.timestamp_format)
        except ValueError as exc:
            raise CapsuleError(f"{source}: invalid capsule key 'log.timestamp_format': {exc}") from None


def yaml_reason(exc: Exception) -> str:
    """A YAML error on one line: the problem and where (PyYAML's messages span lines). Also
    for the apps, whose Hydra loads a selected capsule file itself (`capsule=NAME`)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or type(exc).__name__
        if "constructor for the tag" in problem:
            problem += " (YAML tags that construct objects are not allowed: a capsule is data)"
        return f"not valid YAML{where}: {problem}"
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    return f"not valid YAML: {' '.join(str(exc).split())}"


def load_capsule_file(path: str | Path) -> CapsuleConfig:
    path = Path(path)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # YAML syntax errors, tags that would construct objects, unreadable files
        raise CapsuleError(f"{path}: {yaml_reason(exc)}") from None
    capsule = parse_capsule(data, source=str(path))
    if capsule.name != path.stem:
        raise CapsuleError(f"{path}: capsule.name '{capsule.name}' differs from the file name '{path.stem}'")
    return capsule


def capsule_dirs(search_path: Iterable[str | Path] = ()) -> list[Path]:
    """Built-in capsule dir first, then each user config dir's `capsule/` (later ones win)."""
    dirs = [config_dir() / "capsule"]
    for entry in search_path:
        d = Path(entry)
        dirs.append(d / "capsule" if (d / "capsule").is_dir() else d)
    return dirs


def visible_capsules(search_path: Iterable[str | Path] = ()) -> dict[str, CapsuleConfig]:
    """Every capsule the crawl can assign files to: built-in ones and users' (same name replaces)."""
    capsules: dict[str, CapsuleConfig] = {}
    for d in capsule_dirs(search_path):
        for path in sorted(d.glob("*.yaml")):
            capsule = load_capsule_file(path)
            capsules[capsule.name] = capsule
    return capsules


def hydra_search_path() -> list[str]:
    """User config dirs of the running Hydra app (`--config-dir`, `hydra.searchpath`)."""
    from hydra.core.hydra_config import HydraConfig

    builtin = config_dir().resolve()
    dirs = []
    for source in HydraConfig.get().runtime.config_sources:
        if source.schema == "file" and Path(source.path).resolve() != builtin:
            dirs.append(source.path)
    return dirs
