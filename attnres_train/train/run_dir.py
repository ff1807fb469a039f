"""The one run_dir check: the directory exists and is writable, or can be created; a failed check leaves nothing.

Why a module of its own: the command line's pre-flight callback (``cli/preflight.py``, before Hydra creates
anything) and the trainer (any entry, e.g. the Python API) apply the same rule, and it must stay light (no torch):
the callback runs it before the heavy imports.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..config.errors import ConfigError, UserInputError


def check_run_dir(run_dir) -> None:
    """``run_dir`` exists as a writable directory or can be created; a failed creation leaves nothing behind."""
    value = str(run_dir)
    if not value.strip():
        raise ConfigError("run_dir", "is empty; give a directory (e.g. run_dir=runs/my_run)")
    path = Path(value).expanduser().absolute()
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise UserInputError(
            f"run_dir {value!r} is not writable: {str(probe)!r} exists and is not a directory; choose another run_dir"
        )
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=True)  # exist_ok: the other ranks of a job run this check at the same moment
        fd, name = tempfile.mkstemp(prefix=".write_test-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        for d in missing:  # deepest first: remove only what this check created
            try:
                d.rmdir()
            except OSError:
                pass
        raise UserInputError(
            f"run_dir {value!r} is not writable: cannot create or write {str(exc.filename or path)!r} "
            f"({exc.strerror or exc}); choose a writable directory"
        ) from None
