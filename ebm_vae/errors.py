"""Which exceptions are the user's to fix: the console scripts print those as one line.

A user error is something fixed from the command line or the file system (a setting, a
capsule file, a checkpoint, an index of another data tree, a full disk, an output in use),
never a bug. `ebm_vae.cli` prints its message as one line and exits 1; `--debug` (or
`HYDRA_FULL_ERROR=1`) shows the traceback instead. Everything else is a bug and keeps its
traceback.

This module is the one place that decides. The project's own error classes are named here
by their qualified names, so that deciding needs no import of torch or the readers.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix from the command line; its message says how."""


class ConfigError(UserError, ValueError):
    """A setting (or a combination of settings) that cannot work; the message names the key."""


USER_ERRORS = frozenset({
    "ebm_vae.errors.UserError",  # and its subclasses: ConfigError, locks.LockedError, ...
    "ebm_vae.capsules.CapsuleError",  # a capsule file or definition (names the file and the key)
    "ebm_vae.energy.grid.GridError",  # export.axes / limits / reference / resolution
    "ebm_vae.energy.model.CheckpointError",  # a checkpoint that is not a usable VAE checkpoint
    "ebm_vae.energy.mapfile.EnergyMapError",  # a file that is not a readable energy map
    "ebm_vae.io.OutputError",  # an output that cannot be written (a full disk, permissions)
    # Hydra's own compact errors: an unknown group option or key, a wrong type, an override
    # that does not parse, a missing --config-dir, a _target_ refusing its arguments
    "hydra.errors.CompactHydraException",
    # a config file (a user's capsule or preset) that is not YAML, or uses tags that would
    # construct objects: Hydra's loader refuses both; the message names the file and line
    "yaml.error.YAMLError",
})


def is_user_error(exc: BaseException) -> bool:
    """True for the exceptions listed in `USER_ERRORS` (and their subclasses), and for a
    missing file or folder reported by our own code (FileNotFoundError / NotADirectoryError
    raised with a message and no errno: the operating system's always carry one)."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}
    if names & USER_ERRORS:
        return True
    return isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.errno is None
