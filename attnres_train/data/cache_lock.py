"""The lock that serialises ranks building one tokenized-cache entry, and the clean-up a failed build may do.

Why a protocol and not just ``flock``: a build that fails on bad input leaves the cache as it was, so it
removes the lock file and the directories it created. A rank waiting on that lock then holds a lock on a file
that no longer exists, and the directories it saw may be gone. The rules, on every rank:

- only the holder of the lock removes anything, and it does so *before* releasing it;
- a waiter that gets the lock checks that its open file is still the one at the path; if not (the holder
  removed it) it starts over: create the directories, open the path again, lock again.

So a waiter never works in a directory a failed holder is removing, and every rank that meets the bad input
reports that input, not a missing directory (found in CI: "cannot create .../tokenized (No such file or
directory)" on the rank that waited).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List

from attnres_train.config.errors import UserInputError

_ATTEMPTS = 1000  # each retry means a holder removed the lock; this many in a row is not a race any more


@contextlib.contextmanager
def cache_build_lock(lock_path: str) -> Iterator[List[str]]:
    """Hold the exclusive lock ``lock_path``, creating its directory. Yields what this attempt created (the lock
    file and missing directories, deepest first): the holder may remove exactly these before it releases."""
    parent = os.path.dirname(os.path.abspath(lock_path))
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, atomic rename still protects readers
        yield missing_dirs(parent)  # the build's staging directory creates them
        return
    for _ in range(_ATTEMPTS):
        created = missing_dirs(parent)
        try:
            os.makedirs(parent, exist_ok=True)
            existed = os.path.exists(lock_path)
            f = open(lock_path, "a")
        except FileNotFoundError:  # a failed holder removed a directory between our steps: start over
            continue
        except OSError as e:  # e.g. no permission: leave what we could create as it was
            remove_quietly(created)
            raise UserInputError(f"data.cache_dir: cannot create {parent!r} ({e.strerror})") from None
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if not _is_current(f.fileno(), lock_path):  # the previous holder removed it: lock the path's new file
                continue  # closing the file releases the lock
            try:
                yield ([] if existed else [lock_path]) + created
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return
    raise RuntimeError(f"could not lock {lock_path!r}: it was removed under us {_ATTEMPTS} times in a row")


def _is_current(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def missing_dirs(path: str) -> List[str]:
    """``path`` and its missing parents, deepest first (what ``os.makedirs(path)`` would create)."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_quietly(paths: List[str]) -> None:
    """Remove these files and (empty) directories in order; stop at the first that is in use."""
    for path in paths:
        try:
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        except OSError:
            return
