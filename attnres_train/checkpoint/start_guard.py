"""Never start a run over what might be the only copy of another run's state (``checkpoint.overwrite``).

Why: a run that starts from step 0 in a directory with checkpoints deletes them at its first saves (a
same-step checkpoint is replaced, older ones are pruned by ``keep_last``), and ``resume=auto`` skips
uncommitted checkpoints even when every file and the manifest were written (a kill just before the
``COMMITTED`` marker). So such starts are refused before anything is written, naming the directories and the
flag that allows them. See docs/training.md ("Resume").
"""

from __future__ import annotations

from pathlib import Path

from ..config.errors import UserInputError
from .layout import MARKER, META, scan


def check_fresh_start(root, resume, overwrite: bool) -> None:
    """Refuse (UserInputError) a start that would delete what might be the only copy of a run's state.

    * ``resume=auto`` with no committed checkpoint but an uncommitted one that holds a ``meta.json`` (its files
      were all written and hashed; only the marker is missing): it would start from step 0 and its first save
      would delete them.
    * ``resume=none`` on a directory with committed checkpoints or such uncommitted ones: its saves would
      replace (same step) and prune (``keep_last``) them.
    * a step dir with its marker but no ``meta.json`` (damaged after it was committed), in every mode.

    ``overwrite`` (``checkpoint.overwrite``) allows all three. ``.tmp-*`` directories without a ``meta.json`` are
    unfinished writes no tool can load: they never block a start. Nothing is written or deleted here.
    """
    if overwrite:
        return
    root = Path(root)
    complete, stale = scan(root)
    written = [p for p in stale if (p / META).is_file()]
    damaged = [p for p in stale if (p / MARKER).is_file() and not (p / META).is_file()]
    if damaged:  # committed (the marker is written last), then its meta.json was lost: not loadable, not garbage
        raise UserInputError(
            f"checkpoint {damaged[-1]} has its {MARKER} marker but no {META}: it was damaged after it was saved, "
            "cannot be loaded, and a run here could replace or prune it. Restore the file, move the directory out "
            "of the way, or pass checkpoint.overwrite=true"
        )
    mode = str(resume).strip().lower() if resume is not None else "none"
    if mode == "auto" and not complete and written:
        names = ", ".join(p.name for p in written)
        raise UserInputError(
            f"checkpoint.resume=auto: {root} holds no committed checkpoint, only {len(written)} uncommitted one(s) "
            f"with a complete manifest ({names}; no {MARKER} marker). They might be the only copy of this run's "
            "state, so the run does not start from step 0 over them. Move them out of the way, use another "
            "run_dir, or pass checkpoint.overwrite=true to start fresh (its first save deletes them)"
        )
    if mode in ("", "none") and (complete or written):
        names = ", ".join(p.name for p in ([p for _, p in complete] + written)[-3:])
        raise UserInputError(
            f"checkpoint.resume=none: {root} already holds checkpoints ({names}) that a fresh run would replace "
            "or delete. Continue them with checkpoint.resume=auto, use another run_dir, or pass "
            "checkpoint.overwrite=true to start from step 0 anyway"
        )
