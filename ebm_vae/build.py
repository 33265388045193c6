"""`ebm-vae-build data.root=DIR`: the Physics Crawler in one command (a thin Hydra app around `build`).

    ebm-vae-build data.root=DIR [paths.root=DIR] [--config-dir DIR] [any train/export override]

One run crawls the tree, then for every capsule with usable files: statistics -> method
(`export.method=auto` by default) -> training where the method needs a model -> export, and
writes the catalogue `energy_maps/landscape.json` after each capsule. Each capsule's train
and export configs are composed exactly as `ebm-vae-train` / `ebm-vae-export` compose them
(its preset, then the command line's overrides), so per-capsule settings apply unchanged.

Incremental. Fingerprints per capsule sit in its catalogue entry: `data` (its capsule
definition and the path, size and mtime of every usable file in the manifest), `settings`
(every YAML its configs are composed from, the overrides, the package version), `export`
(the composed export settings) and, for a model, `train` (model settings, steps, time cap,
batch size, seed). A capsule whose `data` and `settings`, map and checkpoint (size and mtime)
all match is not touched: nothing is composed, counted or trained (an unchanged rebuild costs
the crawl). When only `settings` moved, the composed `export` and `train` decide. Otherwise
the statistics are redone when `data` changed, and training picks its mode from the
checkpoint itself: `fresh` (none, another state or other widths, `build.force`), `resume` (same
data, fewer steps than asked: a killed run, or more steps asked), `fine-tune` (the data
changed: the old weights, new statistics, a fresh optimiser) or `up to date` (same data, all
steps done: only the export is redone).

A capsule that fails gets one line in the summary and keeps its previous catalogue entry;
the others go on; the command then ends with one error line (exit status 1). The catalogue is
locked for the whole run (`ebm_vae.locks`): a second build on the same outputs is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ebm_vae import __version__
from ebm_vae.cli import App
from ebm_vae.config import compose, config_dir, to_container
from ebm_vae.data.extractors.base import StateInfo
from ebm_vae.data.readers.base import one_line
from ebm_vae.energy.landscape import (
    FILENAME,
    LandscapeEntry,
    LandscapeError,
    quality_of,
    read_catalogue,
    relative_path,
    resolve_inside,
    write_catalogue,
)
from ebm_vae.errors import ConfigError, UserError

log = logging.getLogger(__name__)

STAGES = ("crawl", "statistics", "method", "training", "export")
# training settings that do not change the network's shapes: a checkpoint with other values
# is resumed or fine-tuned; any other model key that differs means training afresh
TRAINING_ONLY_KEYS = {"_target_", "lr", "weight_decay", "val_k", "kl_warmup_steps"}
# overrides that only `ebm-vae-build` itself takes, never passed to a capsule's configs
BUILD_ONLY_KEYS = {"build", "hydra", "capsule", "ckpt", "ckpt_path", "init_from"}


@dataclass
class CapsuleRow:
    """One line of the closing summary."""

    capsule: str
    status: str  # built, fine-tuned, resumed, re-exported, unchanged, failed, no usable files, kept
    files: int = 0
    samples: int = 0
    method: str = ""
    train_s: float | None = None
    val_bound: float | None = None  # val/iwae of the checkpoint behind the map (nats, normalised units)
    map: str | None = None
    reason: str = ""  # why it failed, or why this method
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class BuildReport:
    rows: list[CapsuleRow]
    stages: dict[str, float]  # seconds per stage, summed over capsules; "total" is the wall time
    landscape: Path

    @property
    def failed(self) -> list[CapsuleRow]:
        return [r for r in self.rows if r.status == "failed"]


def fingerprint(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _override(key: str, value: Any) -> str:
    """`key=value` for Hydra's override grammar; paths with spaces or quotes are quoted."""
    text = str(value)
    if re.fullmatch(r"[\w./@:+-]*", text):
        return f"{key}={text}"
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _accepted_keys(config_name: str) -> set[str]:
    """Top-level keys and groups of `conf/<config_name>.yaml`: which overrides it takes."""
    raw = OmegaConf.to_container(OmegaConf.load(config_dir() / f"{config_name}.yaml"))
    keys = {k for k in raw if k != "defaults"}
    for item in raw.get("defaults", []):
        name = item if isinstance(item, str) else next(iter(item))
        keys.add(name.replace("optional ", "").replace("override ", "").strip("/"))
    return keys - {"_self_"}


def split_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """The build's command-line overrides that apply to each capsule's train and export configs
    (less `paths.*` and `data.root`, which `_Capsules` passes resolved)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    targets = {name: _accepted_keys(name) - BUILD_ONLY_KEYS for name in ("train", "export")}
    out: dict[str, list[str]] = {name: [] for name in targets}
    for parsed in OverridesParser.create().parse_overrides(list(overrides)):
        key = parsed.key_or_group
        top = key.split(".")[0].split("/")[0]
        if top == "paths" or key == "data.root":
            continue
        for name, keys in targets.items():
            if top in keys:
                out[name].append(parsed.input_line)
    return out


class _Capsules:
    """Composes each capsule's train and export configs as the per-stage commands would."""

    def __init__(self, cfg: DictConfig, overrides: Sequence[str]):
        self.cfg = cfg
        self.user = split_overrides(overrides)
        # the build's export defaults (method auto) as a group choice, under a preset's settings
        chosen = any(o.split("=")[0].lstrip("+~") == "export" for o in self.user["export"])
        self.export_group = [] if chosen else ["export=build"]
        self.dirs = list(cfg.capsule_search_path)
        root = Path(cfg.paths.root).expanduser().resolve()
        self.base = [_override("paths.root", root)]  # absolute: the commands work from anywhere
        for key, value in cfg.paths.items():
            path = Path(value).expanduser().resolve()
            if key != "root" and path != root / key:
                self.base.append(_override(f"paths.{key}", path))
        self.base.append(_override("data.root", Path(cfg.data.root).expanduser().resolve()))
        # Everything a capsule's configs are composed from: when it is unchanged, so are they
        # (composing costs ~0.5 s a config; an unchanged rebuild of 27 capsules skips all of it).
        sources = [config_dir(), *(Path(d) for d in self.dirs)]
        yaml = sorted((str(p), hashlib.sha1(p.read_bytes()).hexdigest()) for d in sources for p in d.rglob("*.yaml"))
        self.settings = fingerprint([__version__, yaml, self.base, self.user, self.export_group])

    def train(self, name: str) -> DictConfig:
        return compose("train", [f"capsule={name}", *self.base, *self.user["train"]], self.dirs)

    def export(self, name: str) -> DictConfig:
        return compose("export", [f"capsule={name}", *self.base, *self.export_group, *self.user["export"]],
                       self.dirs)

    def command(self, name: str, trains: bool, method: str) -> str:
        """The per-stage commands that reproduce this capsule's map (absolute paths)."""
        config_dirs = [f"--config-dir {shlex.quote(d)}" for d in self.dirs]

        def line(program: str, *items: str) -> str:
            return " ".join([program, *config_dirs, f"capsule={name}", *(shlex.quote(i) for i in items)])

        steps = [line("ebm-vae-train", *self.base, *self.user["train"])] if trains else []
        export_overrides = [o for o in self.user["export"] if not o.lstrip("+~").startswith("export.method=")]
        steps.append(line("ebm-vae-export", *self.base, _override("export.method", method), *export_overrides))
        return " && ".join(steps)


# -- the stages of one capsule ----------------------------------------------------------


def _file_identity(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def statistics(manifest, capsule, index_dir: Path, cfg: DictConfig, previous: LandscapeEntry | None,
               data_fp: str):
    """(Stats, whether the pass ran): redone when the data fingerprint moved (or, without a
    catalogue entry, when stats.json counts other files than the manifest's usable ones)."""
    from ebm_vae.data.stats import Stats, run_stats_pass

    path = index_dir / capsule.name / "stats.json"
    if path.is_file():
        stats = Stats.load(path)
        if previous is not None:
            current = previous.fingerprint.get("data") == data_fp
        else:
            counted = {(f["path"], f["size"], f["mtime_ns"]) for f in stats.files}
            current = counted == {(e.path, e.size, e.mtime_ns) for e in manifest.usable(capsule.name)}
        if current:
            return stats, False
    return run_stats_pass(manifest, capsule, index_dir, cfg), True


def choose_method(export_cfg: DictConfig, capsule):
    """The method (`vae` or `histogram`) and why: `export.method=auto` asks the energy methods'
    rule (which counts the histogram, kept in the choice, when it is a candidate)."""
    from ebm_vae.energy.methods.auto import Choice, choose_method

    method = export_cfg.export.method
    if method == "auto":
        return choose_method(export_cfg, capsule)
    if method in ("vae", "histogram"):
        return Choice(method, f"export.method={method}")
    raise ConfigError(f"export.method must be 'vae', 'histogram' or 'auto', got '{method}'")


def training_mode(ckpt: Path, stats, train_cfg: DictConfig, force: bool) -> tuple[str, str]:
    """(mode, why): fresh, resume, fine-tune or up to date; see the module docstring."""
    import torch

    if force or not ckpt.is_file():
        return "fresh", "build.force" if force else "no checkpoint yet"
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        hparams, step = checkpoint["hyper_parameters"], int(checkpoint["global_step"])
    except Exception as exc:
        return "fresh", f"{ckpt} is not loadable ({type(exc).__name__}); training afresh"
    if hparams.get("state") != stats.state:
        return "fresh", "the state's shape or components changed"
    model = to_container(train_cfg.model)
    changed = [k for k, v in model.items() if k not in TRAINING_ONLY_KEYS and v not in ("auto", None)
               and hparams.get(k) != v]
    if changed:
        return "fresh", f"model settings changed: {', '.join(changed)}"
    trained_on = [(f["path"], f["size"], f["mtime_ns"]) for f in hparams.get("stats_meta", {}).get("files", [])]
    if trained_on != [(f["path"], f["size"], f["mtime_ns"]) for f in stats.files]:
        return "fine-tune", "its files changed"
    if step < train_cfg.trainer.max_steps:
        return "resume", f"{step} of {train_cfg.trainer.max_steps} steps done"
    return "up to date", f"{step} steps on the same files"


def _checkpoint_facts(ckpt: Path) -> tuple[int, dict[str, float | None]]:
    """(steps done, {"val/iwae": the best}) of a checkpoint this build did not train."""
    import torch

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    best = checkpoint.get("best_val_iwae")
    return int(checkpoint.get("global_step", 0)), quality_of({"val/iwae": best}) if best is not None else {}


class _Builder:
    def __init__(self, cfg: DictConfig, overrides: Sequence[str]):
        self.cfg = cfg
        self.capsules = _Capsules(cfg, overrides)
        self.root = Path(cfg.paths.root).expanduser().resolve()
        self.maps_dir = Path(cfg.paths.energy_maps).expanduser().resolve()
        self.index_dir = Path(cfg.paths.index).expanduser().resolve()
        self.stages = dict.fromkeys(STAGES, 0.0)

    def timed(self, stage: str, row: CapsuleRow, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            self.stages[stage] += elapsed
            row.seconds[stage] = row.seconds.get(stage, 0.0) + elapsed

    def capsule(self, manifest, capsule, previous: LandscapeEntry | None) -> tuple[CapsuleRow, LandscapeEntry | None]:
        name, force = capsule.name, self.cfg.build.force
        row = CapsuleRow(name, "built")
        usable = manifest.usable(name)
        fp = {"data": fingerprint([asdict(capsule), [(e.path, e.size, e.mtime_ns) for e in usable]]),
              "settings": fingerprint([self.capsules.settings, name])}
        # same files, same YAML and overrides, same outputs: nothing to compose, count or train
        if previous is not None and not force and self._unchanged(previous, fp, ("data", "settings")):
            return _kept(row, previous, "unchanged"), previous
        stats, _ = self.timed("statistics", row, statistics, manifest, capsule, self.index_dir,
                              self.cfg, previous, fp["data"])
        row.files, row.samples = len(stats.files), stats.count
        export_cfg = self.capsules.export(name)
        fp["export"] = fingerprint(_export_settings(export_cfg))
        had_model = previous is not None and previous.checkpoint is not None
        train_cfg = self.capsules.train(name) if had_model or export_cfg.export.method == "vae" else None
        if train_cfg is not None:
            fp["train"] = _train_fingerprint(train_cfg)
        if previous is not None and not force and self._unchanged(previous, fp, ("data", "export", "train")):
            previous.fingerprint = fp  # the same settings, resolved from edited sources
            return _kept(row, previous, "unchanged"), previous

        auto = export_cfg.export.method == "auto"
        choice = self.timed("method", row, choose_method, export_cfg, capsule)
        method, reason = choice.method, choice.reason
        log.info("%s: method %s (%s)", name, method, reason)
        export_cfg.export.method = method
        row.method, row.reason = method, reason
        ckpt, training, quality = None, None, {}
        if method == "vae":
            if train_cfg is None:
                train_cfg = self.capsules.train(name)
                fp["train"] = _train_fingerprint(train_cfg)
            ckpt = Path(train_cfg.paths.checkpoints) / name / "last.ckpt"
            mode, why = training_mode(ckpt, stats, train_cfg, force)
            log.info("%s: training %s (%s)", name, mode, why)
            if mode == "up to date":
                row.status = "re-exported"
                if had_model and previous.outputs.get("checkpoint") == _file_identity(ckpt):
                    quality, training = previous.quality, previous.training
                else:  # trained by ebm-vae-train, or by a build killed before its export
                    steps, quality = _checkpoint_facts(ckpt)
                    training = {"mode": "existing checkpoint", "why": why, "seconds": None, "steps": steps}
            else:
                with open_dict(train_cfg):
                    train_cfg.ckpt_path = "last" if mode == "resume" else None
                    train_cfg.init_from = str(ckpt) if mode == "fine-tune" else None
                metrics = self.timed("training", row, _train, train_cfg)
                row.status = {"fresh": "built", "resume": "resumed", "fine-tune": "fine-tuned"}[mode]
                row.train_s = row.seconds["training"]
                quality = quality_of(metrics)
                training = {"mode": mode, "why": why, "seconds": round(row.train_s, 3),
                            "steps": _checkpoint_facts(ckpt)[0]}
        else:
            fp.pop("train", None)
        out = self.timed("export", row, _export, export_cfg, capsule, choice.histogram, reason if auto else None)
        entry = self._entry(name, out, method, reason, ckpt, quality, training, fp, stats)
        entry.data["skipped_rows"] = sum(e.skipped_rows or 0 for e in usable)  # unparseable lines, ragged rows
        row.map, row.val_bound, row.method = entry.map, entry.quality.get("val/iwae"), entry.method
        row.files, row.samples = entry.data["files"], entry.data["samples"]
        return row, entry

    def _unchanged(self, previous: LandscapeEntry, fp: dict[str, str], keys: Sequence[str]) -> bool:
        """The fingerprints `keys` match, and the map and checkpoint are the files the entry made."""
        try:
            outputs = [resolve_inside(previous.map, self.root, "map")] + (
                [resolve_inside(previous.checkpoint, self.root, "checkpoint")] if previous.checkpoint else [])
        except LandscapeError:
            return False
        recorded = [previous.outputs.get("map")] + ([previous.outputs.get("checkpoint")] if previous.checkpoint else [])
        return (all(previous.fingerprint.get(k) == fp.get(k) for k in keys)
                and [_file_identity(p) for p in outputs] == recorded)

    def _entry(self, name, out: Path, method, reason, ckpt, quality, training, fp, stats) -> LandscapeEntry:
        from ebm_vae.energy.mapfile import EnergyMap

        meta = EnergyMap.load(out).metadata
        files = meta.get("source_files") or stats.files
        if method == "histogram":
            report = meta.get("histogram", {})
            samples = int(report.get("n_total", stats.count))
            quality = {"empty_fraction": report["empty_bins"] / report["bins"]} if report.get("bins") else {}
            quality["n_outside_grid"] = report.get("n_outside_grid")
            val_samples = None  # counting reads every sample: there is no validation split
        else:
            samples = int(meta.get("training_samples") or stats.count)
            val_samples = meta.get("validation_samples")
        state = stats.state
        # maps made before metadata.quantity existed: a histogram counts the marginal; a model's
        # map is the joint energy on a slice, which is the marginal only when it spans the state
        full = len(meta.get("axes", [])) == StateInfo.from_dict(state).dim
        quantity = meta.get("quantity") or ("marginal" if method == "histogram" or full else "slice")
        png = out.with_suffix(".png")
        return LandscapeEntry(
            capsule=name, method=meta.get("method", method), quantity=quantity,
            method_reason=meta.get("method_reason") or reason,
            map=relative_path(out, self.root), plot=relative_path(png, self.root) if png.is_file() else None,
            checkpoint=relative_path(ckpt, self.root) if ckpt is not None else None,
            axes=[{k: a.get(k) for k in ("name", "unit", "limits", "points")} for a in meta.get("axes", [])],
            state=state,
            data={"files": len(files), "bytes": int(sum(f.get("size", 0) for f in files)), "samples": samples,
                  "validation_samples": val_samples, "skipped_files": len(meta.get("skipped_files", []))},
            created=meta.get("created", ""), command=self.capsules.command(name, ckpt is not None, method),
            quality=quality, training=training, fingerprint=fp,
            outputs={"map": _file_identity(out), "checkpoint": _file_identity(ckpt) if ckpt else None},
        )


def _train(train_cfg: DictConfig) -> dict[str, float]:
    from ebm_vae.train import train  # Lightning: imported (and timed) when a capsule trains

    return train(train_cfg)


def _export(export_cfg: DictConfig, capsule, counted, reason: str | None) -> Path:
    """Write the map: the histogram the method choice counted, or the method's map made now;
    `reason` (export.method=auto's) goes into its metadata."""
    from ebm_vae.energy.methods import make_map
    from ebm_vae.energy.methods.common import MapRequest
    from ebm_vae.export import export, map_path
    from ebm_vae.locks import output_lock

    with output_lock(map_path(export_cfg), f"ebm-vae-build: the map of {capsule.name}"), \
            output_lock(export_cfg.paths.index, f"ebm-vae-build: the map of {capsule.name}", shared=True):
        energy_map = counted if counted is not None else make_map(MapRequest(export_cfg, capsule))
        if reason is not None:
            energy_map.metadata["method_reason"] = reason
        return export(export_cfg, energy_map)


def _train_fingerprint(train_cfg: DictConfig) -> str:
    """What the trained model depends on (not how the run shows progress or where it logs)."""
    return fingerprint({"model": to_container(train_cfg.model), "seed": train_cfg.seed,
                        "max_steps": train_cfg.trainer.max_steps, "max_time": train_cfg.trainer.max_time,
                        "batch_size": train_cfg.data.batch_size})


def _export_settings(export_cfg: DictConfig) -> dict[str, Any]:
    settings = to_container(export_cfg.export)
    for cosmetic in ("progress", "device", "chunk_points"):
        settings.pop(cosmetic, None)
    return settings


def _kept(row: CapsuleRow, entry: LandscapeEntry, status: str) -> CapsuleRow:
    row.status, row.method, row.map = status, entry.method, entry.map
    row.files, row.samples = entry.data.get("files", 0), entry.data.get("samples", 0)
    row.val_bound = entry.quality.get("val/iwae")
    row.reason = entry.method_reason or ""
    return row


def _check_outputs(cfg: DictConfig) -> None:
    """Every output the catalogue names must lie under paths.root (it refuses other paths)."""
    root = Path(cfg.paths.root).expanduser().resolve()
    for key in ("energy_maps", "checkpoints", "index"):
        try:
            relative_path(Path(cfg.paths[key]).expanduser(), root)
        except ValueError:
            raise ConfigError(f"paths.{key}={cfg.paths[key]} lies outside paths.root={cfg.paths.root}: "
                             "the landscape catalogue only names files under its root") from None
    if cfg.export.get("out"):
        raise ConfigError("export.out does not apply to ebm-vae-build: every map goes to "
                         "${paths.energy_maps}/<capsule>.npz")


def _previous_catalogue(maps_dir: Path) -> dict[str, LandscapeEntry]:
    if not (maps_dir / FILENAME).is_file():
        return {}
    try:
        return read_catalogue(maps_dir / FILENAME)[1]
    except LandscapeError as exc:
        log.warning("ignoring the previous catalogue (every capsule is rebuilt): %s", exc)
        return {}


def build(cfg: DictConfig, overrides: Sequence[str] = ()) -> BuildReport:
    """Crawl `cfg.data.root` and build every capsule's map; returns the summary.

    `overrides` are the command line's (train and export ones are applied to each capsule's
    configs after its preset, as the per-stage commands apply them).
    """
    from ebm_vae.capsules import visible_capsules
    from ebm_vae.crawl.crawl import crawl
    from ebm_vae.locks import output_lock

    if not cfg.data.root:
        raise ConfigError("data.root is not set: ebm-vae-build data.root=DIR")
    _check_outputs(cfg)
    started = time.perf_counter()
    builder = _Builder(cfg, overrides)
    with output_lock(builder.maps_dir / FILENAME, "ebm-vae-build", wait=False,
                     advice="another ebm-vae-build is writing this landscape: wait for it, or set another paths.root"):
        capsules = dict(sorted(visible_capsules(cfg.capsule_search_path).items()))
        wanted = list(cfg.build.capsules) if cfg.build.capsules is not None else None
        unknown = sorted(set(wanted or ()) - set(capsules))
        if unknown:
            raise ConfigError(f"build.capsules: unknown capsule(s) {unknown}; known: {sorted(capsules)}")
        crawl_cfg = copy.deepcopy(cfg)
        crawl_cfg.crawl.stats = False  # the statistics are this command's next stage, per capsule
        t0 = time.perf_counter()
        manifest = crawl(crawl_cfg)
        builder.stages["crawl"] = time.perf_counter() - t0
        entries = _previous_catalogue(builder.maps_dir)
        rows = []
        for name, capsule in capsules.items():
            if wanted is not None and name not in wanted:
                continue
            if not manifest.usable(name):
                rows.append(_kept(CapsuleRow(name, ""), entries[name], "kept (no usable files now)")
                            if name in entries else CapsuleRow(name, "no usable files"))
                continue
            try:
                row, entry = builder.capsule(manifest, capsule, entries.get(name))
                entries[name] = entry
            except Exception as exc:  # one capsule's failure never stops the others
                log.error("%s: failed: %s", name, one_line(exc))
                row = CapsuleRow(name, "failed", reason=f"{type(exc).__name__}: {one_line(exc)}")
            rows.append(row)
            write_catalogue(builder.maps_dir, builder.root, entries, str(manifest.root))
        for name in sorted(set(entries) - {r.capsule for r in rows}):
            rows.append(_kept(CapsuleRow(name, ""), entries[name], "kept (not built in this run)"))
        landscape = write_catalogue(builder.maps_dir, builder.root, entries, str(manifest.root))
    builder.stages["total"] = time.perf_counter() - started
    return BuildReport(rows, builder.stages, landscape)


def print_summary(report: BuildReport) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"ebm-vae-build: {len(report.rows)} capsules -> {report.landscape}")
    for name in ("capsule", "status", "files", "samples", "method", "train s", "val/iwae", "map"):
        table.add_column(name, justify="right" if name in ("files", "samples", "train s", "val/iwae") else "left")
    for r in report.rows:
        table.add_row(r.capsule, r.status, f"{r.files:,}", f"{r.samples:,}", r.method,
                      "" if r.train_s is None else f"{r.train_s:.1f}",
                      "" if r.val_bound is None else f"{r.val_bound:.3f}", escape(r.map or ""))
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: whole rows rather than 80 wrapped columns
        console = Console(width=200)
    console.print(table)
    for r in report.failed:
        console.print(f"  [red]failed[/red] {escape(r.capsule)}: {escape(r.reason)}", highlight=False, soft_wrap=True)
    stages = ", ".join(f"{s} {report.stages[s]:.1f} s" for s in STAGES)
    other = report.stages["total"] - sum(report.stages[s] for s in STAGES)
    console.print(f"  {report.stages['total']:.1f} s in all: {stages}, other {other:.1f} s "
                  "(configs, imports, catalogue)", highlight=False)


def _build_and_report(cfg: DictConfig) -> None:
    """The console script's task: build, print the summary, fail (exit 1) when a capsule failed."""
    from hydra.core.hydra_config import HydraConfig

    report = build(cfg, list(HydraConfig.get().overrides.task))
    print_summary(report)
    if report.failed:
        names = ", ".join(r.capsule for r in report.failed)
        raise UserError(f"{len(report.failed)} of {len(report.rows)} capsules failed ({names}; the reasons are "
                        "above); the others are built and catalogued")


main = App(
    name="ebm-vae-build", config_name="build", task=_build_and_report,
    summary="the whole pipeline in one run: crawl, then for every capsule with usable files its "
            "statistics, method (auto), training where the method needs a model, its energy map, "
            "and the catalogue energy_maps/landscape.json (incremental: unchanged capsules are not redone)",
    usage=("data.root=DIR [paths.root=DIR] [--config-dir MYCONF] [KEY=VALUE ...]",
           "data.root=DIR trainer.max_steps=2000 export.resolution=256   # any train or export override"),
    choices=("capsule", "preset", "trainer", "model", "experiment"),
    choices_title="Capsules it builds (every one with usable files, built-in and --config-dir), and choices:",
    overrides=(
        ("data.root=DIR", "the data tree (never written to)"),
        ("paths.root=DIR", "where index/, checkpoints/, energy_maps/ and logs/ go (default: the current folder)"),
        ("build.capsules=[a,b]", "only these capsules (default: every capsule with usable files)"),
        ("build.force=true", "retrain from scratch and re-export, even what is up to date"),
        ("export.method=auto|vae|histogram", "how maps are made (default auto: the histogram where "
                                             "counting resolves it, the VAE elsewhere)"),
        ("trainer.max_steps=N", "training steps per capsule (after its preset)"),
    ),
).main


if __name__ == "__main__":
    main()
