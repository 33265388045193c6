"""The one wrapper of every `ebm-vae-*` console script: argument order, `--help`, one-line errors.

A console script is a plain function of the composed config, declared once as an `App`:

    from ebm_vae.cli import App

    def build(cfg: DictConfig) -> None: ...        # the work; tests call it directly

    main = App(
        name="ebm-vae-build", config_name="build", task=build,     # conf/build.yaml
        summary="crawl, train and export every capsule in one run",
        usage=("data.root=DIR [paths.root=DIR] [KEY=VALUE ...]",),
        choices=("capsule", "trainer", "model"),                    # the groups --help lists
        overrides=(("data.root=DIR", "the data tree"),),            # one line each in --help
    ).main                                        # pyproject: ebm-vae-build = "ebm_vae.build:main"

What `main` adds around Hydra (the command line and the help page: `ebm_vae/usage.py`):

- Arguments in any order: Hydra's flags (`--config-dir DIR`, `-m`, `--cfg job`, ...) may stand
  anywhere among the KEY=VALUE overrides, `--flag=value` too. An unknown flag, or a word that
  is not KEY=VALUE, is refused with one line saying what to type (exit 2).
- `--help` needs no other argument: it lists what a user chooses (the groups in `choices`, with
  the capsules and presets of a `--config-dir`), the common overrides, and the flags, without
  composing a config (so a missing `capsule=` cannot break it).
- One-line user errors: an exception that `ebm_vae.errors.is_user_error` accepts prints as
  `NAME: error: MESSAGE` on stderr and exits 1; `--debug` or `HYDRA_FULL_ERROR=1` shows the
  traceback instead. The line also goes to the run's log file when the run keeps one: a run
  that fails this way before anything warned leaves no folder under `logs/hydra`.
- Sweeps (`-m`): a run that fails is reported when it fails (the line, or a bug's traceback),
  the other runs go on, and the sweep ends with a count of the failed runs and exit status 1.
- `--config-dir DIR` reaches `capsule_search_path`, so the crawl sees the user's capsules.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, open_dict

from ebm_vae.config import config_dir
from ebm_vae.errors import is_user_error
from ebm_vae.usage import ArgumentError, help_page, parse_arguments

log = logging.getLogger(__name__)

_SWEEPS: list[tuple[str, str]] = []  # (sweep dir, paths.root) of the running -m, from HydraCallbacks


# ----------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class App:
    """One console script; see the module docstring."""

    name: str  # the console script, e.g. "ebm-vae-train"
    config_name: str  # conf/<config_name>.yaml
    task: Callable[[DictConfig], Any]  # the work: a plain function of the composed config
    summary: str  # one line: what it does and what it writes
    usage: tuple[str, ...] = ()  # command lines without the program name
    choices: tuple[str, ...] = ()  # config groups a user chooses, listed by --help
    overrides: tuple[tuple[str, str], ...] = ()  # (override, what it does), listed by --help
    notes: tuple[str, ...] = ()  # more lines at the end of --help
    choices_title: str = "Choose (GROUP=OPTION):"

    def main(self, argv: Sequence[str] | None = None) -> None:
        """The console script: parse, then run the task inside Hydra; exit 1 on an error, 2 on bad usage."""
        import hydra
        from hydra.core.global_hydra import GlobalHydra

        try:
            args = parse_arguments(sys.argv[1:] if argv is None else argv, self.name)
        except ArgumentError as exc:
            _fail(f"{self.name}: error: {exc}", status=2)
        if args.help:
            _print_or_quit(self.help_text(args.config_dir))
            return
        if args.version:
            from ebm_vae import __version__

            print(f"{self.name} (ebm-vae {__version__}, Hydra {hydra.__version__})")
            return
        debug = args.debug or _env_flag("HYDRA_FULL_ERROR")
        session = _Session(self, debug)
        saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
        sys.argv = [sys.argv[0], *args.hydra_argv]  # argv[0] kept: Lightning's DDP relaunches it
        # With HYDRA_FULL_ERROR set, Hydra lets every exception through, so that this wrapper
        # (not Hydra's traceback printer) decides how each is reported.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        _SWEEPS.clear()
        GlobalHydra.instance().clear()  # a main called before in this process (tests, notebooks)
        try:
            hydra.main(version_base="1.3", config_path=str(config_dir()),
                       config_name=self.config_name)(session.job_function())()
        except KeyboardInterrupt:
            _fail(f"{self.name}: interrupted", status=130)
        except Exception as exc:
            if debug or not is_user_error(exc):
                raise
            session.prune_sweeps()
            _fail(f"{self.name}: error: {message_of(exc)}")
        finally:
            sys.argv = saved_argv
            if saved_full_error is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = saved_full_error
        if session.failed:
            session.finish_failed()

    def help_text(self, user_config: Path | None = None) -> str:
        """The page `--help` prints; reads YAML files only (no config is composed)."""
        return help_page(self, user_config)


@dataclass
class _Session:
    """One `main` call: the runs it made and the ones that failed.

    A failed run is reported when it fails and then returns normally to Hydra, so that a
    sweep goes on (and Hydra adds no report of its own); `main` exits 1 at the end.
    """

    app: App
    debug: bool
    runs: int = 0
    failed: list[str] = field(default_factory=list)

    def job_function(self) -> Callable[[DictConfig], Any]:
        def job(cfg: DictConfig) -> Any:
            return self.run_job(cfg)

        # Hydra names the job, and so its log file, after the task function's module
        job.__module__ = f"ebm_vae.{self.app.config_name}"
        return job

    def run_job(self, cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        self.runs += 1
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        warnings = _WarningCounter()
        logging.getLogger().addHandler(warnings)
        try:
            _add_config_dirs(cfg)
            return self.app.task(cfg)
        except Exception as exc:
            user = is_user_error(exc) and not self.debug
            if not (user or multirun):
                _to_log_files(f"{self.app.name}: failed", exc)
                raise  # a bug (or --debug) in a single run: Python prints its traceback
            overrides = " ".join(hydra_cfg.overrides.task)
            self.failed.append(overrides)
            where = f" ({overrides})" if multirun else ""
            line = f"{self.app.name}{where}: error: {message_of(exc)}"
            if not user:
                traceback.print_exception(exc)
            print(line, file=sys.stderr, flush=True)
            run_dir = Path(hydra_cfg.runtime.output_dir)
            if user and warnings.count == 0 and _only_hydra_files(run_dir, hydra_cfg.job.name):
                _prune(run_dir, Path(cfg.paths.root) if "paths" in cfg else Path.cwd())
            else:
                _to_log_files(line, None if user else exc)
            return None  # reported: Hydra goes on with the sweep's other runs
        finally:
            logging.getLogger().removeHandler(warnings)

    def finish_failed(self) -> None:
        if self.runs > 1:
            print(f"{self.app.name}: {len(self.failed)} of {self.runs} runs failed: "
                  f"{'; '.join(self.failed)}", file=sys.stderr)
        self.prune_sweeps()
        sys.exit(1)

    def prune_sweeps(self) -> None:
        """A sweep whose runs all failed at start leaves only Hydra's multirun.yaml: remove it."""
        for sweep_dir, root in _SWEEPS:
            sweep = Path(sweep_dir)
            if sweep.is_dir() and all(p.name == "multirun.yaml" for p in sweep.iterdir()):
                _prune(sweep, Path(root))


class HydraCallbacks(HydraCallback):
    """Registered in conf/hydra/default.yaml: remembers a sweep's folder for `prune_sweeps`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _SWEEPS.append((str(config.hydra.sweep.dir), str(config.paths.root)))


class _WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def message_of(exc: BaseException) -> str:
    """The exception's message on one line; Hydra's lists of options become `a, b, c`."""
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        text += "\n" + str(cause)  # Hydra's own report adds the OmegaConf cause the same way
    text = text.split("\nConfig search path:")[0]  # Hydra's list of its search path: noise here
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("object_type=")]
    out: list[str] = []
    i = 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if line.endswith(":") and line.lower().startswith("available options"):
            options = []
            while i < len(lines) and re.fullmatch(r"[\w.\-/]+", lines[i]):
                options.append(lines[i])
                i += 1
            line = f"{line} {', '.join(options)}"
        out.append(line)
    joined = ""
    for line in out:
        joined += ("" if not joined else " " if joined[-1] in ".:;," else "; ") + line
    return joined or type(exc).__name__


def _print_or_quit(text: str) -> None:
    """Print; a reader that stopped early (`--help | head`) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def _fail(line: str, status: int = 1) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _add_config_dirs(cfg: DictConfig) -> None:
    """`--config-dir DIR` (and hydra.searchpath) -> cfg.capsule_search_path, for the crawl."""
    if "capsule_search_path" not in cfg:
        return
    from ebm_vae.capsules import hydra_search_path

    with open_dict(cfg):
        cfg.capsule_search_path = list(dict.fromkeys([*cfg.capsule_search_path, *hydra_search_path()]))


def _only_hydra_files(run_dir: Path, job_name: str) -> bool:
    """True when the run folder holds nothing but Hydra's `.hydra/` and the job's log."""
    if not run_dir.is_dir():
        return False
    return all(p.name in (".hydra", f"{job_name}.log") for p in run_dir.iterdir())


def _prune(folder: Path, stop: Path) -> None:
    """Remove `folder`, then its parents that are left empty, up to (not including) `stop`."""
    shutil.rmtree(folder, ignore_errors=True)
    stop = stop.resolve()
    parent = folder.resolve().parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent


def _to_log_files(line: str, exc: BaseException | None) -> None:
    """Write `line` (and a bug's traceback) to the run's log files only: the console has it."""
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, line, None,
                               None if exc is None else (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


