"""Check the composed config and the run directory before Hydra writes anything; reword Hydra's own errors.

Why: Hydra creates ``run_dir`` before the task runs and reports its own failures in several lines with exit
code 1, while the CLI promises one ``error:`` line, exit code 2 and nothing written. :class:`PreflightCallback`
(``hydra.callbacks`` in configs/config.yaml) validates the config and ``run_dir`` after composition, before
``run_dir`` exists and before torch is imported, then checks that the run fits in memory (:func:`check_fits`);
:func:`hydra_error_message` turns Hydra's / OmegaConf's exceptions into one line. docs/training.md, "Bad input",
lists the messages.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Optional

from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from ..config.errors import ConfigError, UserInputError
from ..config.schema import as_config, validate_config
from ..config.structured import unknown_key_message
from ..train.run_dir import check_run_dir

OVERRIDE_SYNTAX_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


class Refused(BaseException):
    """Raised by the callback. A BaseException: Hydra turns a callback's Exception into a warning and goes on."""


class Checked(BaseException):
    """Raised by the callback when the checks passed under ``attnres-train --check-only``: nothing runs."""


# ``attnres-train --check-only`` (set by cli/train.py): check, remove what the check created, run nothing.
# launch/torchrun.sh runs it once before torchrun starts workers, so bad input ends in one line, not a
# ChildFailedError report from torchrun (docs/training.md, "Bad input").
CHECK_ONLY = False


class PreflightCallback(Callback):
    """Hydra callback: refuse a bad config or an unusable run_dir before Hydra creates the directory."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            preflight(config, config.hydra.run.dir)
        except (ConfigError, UserInputError) as exc:
            raise Refused(str(exc)) from None
        _stop_if_check_only()

    def on_job_start(self, config, **kwargs) -> None:
        # A -m sweep job: its swept values (a model size, a batch) were not in the config the multirun check saw,
        # so the memory check runs here, before the task allocates anything (Hydra has made the job's dir).
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        with open_dict(job):
            job.pop("hydra", None)
        try:
            cfg = validate_config(as_config(job), dp_world_size=int(os.environ.get("WORLD_SIZE", "1") or 1))
            check_fits(cfg)
        except (ConfigError, UserInputError) as exc:
            raise Refused(str(exc)) from None

    def on_multirun_start(self, config, **kwargs) -> None:
        # The swept values are not in this config (Hydra applies them per job), so only the sweep directory is
        # checked here; each job's config is validated in the task, after Hydra made its sub-directory.
        missing = _missing_dirs(config.hydra.sweep.dir)
        try:
            check_run_dir(config.hydra.sweep.dir)
        except (ConfigError, UserInputError) as exc:
            raise Refused(str(exc)) from None
        CREATED_RUN_DIRS[:] = missing
        _stop_if_check_only()


def _stop_if_check_only() -> None:
    if CHECK_ONLY:
        remove_created_run_dir()
        raise Checked()


def preflight(config, run_dir) -> None:
    """The composed config (with its ``hydra`` node) is valid and ``run_dir`` is usable, or an error is raised."""
    if run_dir is None or not str(run_dir).strip():
        raise ConfigError(
            "run_dir", "is empty; give a directory (e.g. run_dir=runs/my_run), or leave it out for runs/<date>_<time>"
        )
    job = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    with open_dict(job):
        job.pop("hydra", None)
    try:
        job = OmegaConf.create(OmegaConf.to_container(job, resolve=True))
    except InterpolationResolutionError:  # e.g. ${hydra:runtime.output_dir}: only set once the job starts
        job = None
    cfg = None
    if job is not None:  # (otherwise the task validates it, as before)
        cfg = validate_config(as_config(job), dp_world_size=int(os.environ.get("WORLD_SIZE", "1") or 1))
    if cfg is not None:
        check_fits(cfg)
    missing = _missing_dirs(run_dir)
    check_run_dir(run_dir)  # (last: it creates run_dir when that is missing)
    CREATED_RUN_DIRS[:] = missing


# The directories the pre-flight created for run_dir, deepest first: bad input found later, in the task (a data
# file, a checkpoint), removes them again (remove_created_run_dir), so a refused run leaves no empty run_dir.
CREATED_RUN_DIRS: list = []


def _missing_dirs(run_dir) -> list:
    path, missing = Path(str(run_dir)).expanduser().absolute(), []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_created_run_dir() -> None:
    """Remove the directories the pre-flight created for run_dir while they are still empty (deepest first)."""
    for d in CREATED_RUN_DIRS:
        try:
            d.rmdir()
        except OSError:  # something was written there (or another rank's run uses it): keep it and above
            break
    CREATED_RUN_DIRS.clear()


def check_fits(cfg) -> None:
    """The run's per-rank memory estimate fits this rank (parallel/memory_fit.py), or a ConfigError naming the
    size fields; above 90 % of the rank's memory one warning line (rank 0)."""
    if cfg.trainer.skip_memory_check:
        return
    # torch loads here, once every other check passed (those answer without it); the run imports it next anyway
    from ..parallel.memory_fit import check_memory_fit, local_ranks

    world, local_rank, local_world = local_ranks()
    warning = check_memory_fit(cfg, world, local_rank, local_world)
    if warning and os.environ.get("RANK", "0") in ("", "0"):
        print(warning, file=sys.stderr, flush=True)


def hydra_error_message(exc: BaseException) -> Optional[str]:
    """One line for a Hydra / OmegaConf / config error, naming the key or option; None for anything else."""
    if isinstance(exc, (ConfigError, UserInputError, Refused)):
        return _one_line(str(exc))
    if isinstance(exc, OverrideParseException):
        first = exc.message.splitlines()[0] if exc.message else "syntax error"
        return _one_line(
            f"cannot parse the override {exc.override!r}: {first}; quote values that contain spaces "
            f"or special characters (key='a b'), lists are key=[a,b]; syntax: {OVERRIDE_SYNTAX_URL}"
        )
    if isinstance(exc, MissingConfigException):
        return _missing_option(exc)
    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) else exc
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        owner = getattr(cause, "object_type", None)
        if dataclasses.is_dataclass(owner):
            key = _full_key(exc, cause.full_key)
            return _one_line(f"{key}: {unknown_key_message(owner, key)}")
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return _one_line(f"{_full_key(exc, cause.full_key)}: {_first(str(cause))}; {_expected(cause)}")
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        return _one_line(f"{key + ': ' if key else ''}{_first(str(cause))}")
    if isinstance(exc, HydraException):
        text = str(exc).split("Config search path")[0]
        if cause is not None and cause is not exc:
            text += f" ({_first(str(cause))})"
        return _one_line(text)
    return None


def _full_key(exc, key: str) -> str:
    """A key inside a list override (``data.sources=[{...}]``) comes without the list's path: prefix it."""
    m = (
        re.match(r"(?:Could not override '|Error merging override )([^'=]+)", str(exc))
        if isinstance(exc, ConfigCompositionException)
        else None
    )
    return f"{m.group(1)}[*].{key}" if m and not str(key).startswith(m.group(1)) else key


def _missing_option(exc) -> str:
    missing = exc.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    if not group:
        return _one_line(f"config {missing!r} not found; {str(exc).split('Config search path')[0]}")
    options = ", ".join(exc.options or []) or "none"
    return _one_line(
        f"{group}={option}: no such option in group {group!r} (configs/{group}/); choose one of: {options}"
    )


def _expected(cause) -> str:
    """'expected int' with the field's default, read from the dataclass that owns the key."""
    owner = getattr(cause, "object_type", None)
    name = str(cause.full_key).rpartition(".")[2]
    if dataclasses.is_dataclass(owner):
        for f in dataclasses.fields(owner):
            if f.name == name:
                tname = getattr(f.type, "__name__", None) or str(f.type)
                default = f.default if f.default is not dataclasses.MISSING else None
                return f"{cause.full_key} takes a value of type {tname} (default: {default!r})"
    return "see docs/training.md for the field's type"


def _first(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
