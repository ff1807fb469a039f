"""Warm starts of a many-file raw-text source without one stat per file.

Why: the cache key of a raw-text source holds every file's size and mtime, so finding the entry costs a stat
per file, per rank, per start: minutes for 10^6 files on a network filesystem. A listing file next to the
entries maps (source spec, file names, tokenizer, limits) to the entry and records the mtimes of the
directories that hold the files; while those match, the entry is reused after O(directories) stats. What
is and is not noticed that way: docs/data.md "Cache".
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import List, Optional

from .shards import write_json_atomic
from .sources import ResolvedSource

LISTING_MIN_FILES = 256  # sources with at most this many files (or named one by one) stat every file
SETTLE_NS = 5_000_000_000  # a directory modified this recently is not trusted (coarse mtime clocks)


def uses_listing(rs: ResolvedSource) -> bool:
    return len(rs.files) > LISTING_MIN_FILES and not rs.explicit_files


def listing_path(root: str, slug: str, rs: ResolvedSource, key: dict) -> str:
    """The listing file for ``rs`` with the rest of the cache key ``key`` (version, tokenizer, limits)."""
    material = {**key, "source": rs.listing()}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(root, "listings", f"{slug}-{digest}.json")


def dir_mtimes(rs: ResolvedSource) -> Optional[List[list]]:
    """[directory, mtime_ns] of the source's directories, one stat each; None if one has gone."""
    try:
        return [[d, os.stat(d).st_mtime_ns] for d in rs.directories()]
    except OSError:
        return None


def entry_from_listing(path: str, rs: ResolvedSource, root: str) -> Optional[str]:
    """The cache entry a listing file points to, if its directories are unchanged (O(directories) stats)."""
    try:
        with open(path) as f:
            listing = json.load(f)
    except (OSError, ValueError):
        return None
    entry = os.path.join(root, str(listing.get("entry")))
    if listing.get("dirs") != dir_mtimes(rs) or not os.path.isdir(entry):
        return None
    return entry


def write_listing(path: str, entry: str, dirs: Optional[List[list]]) -> None:
    """Record the listing, unless a directory changed too recently for its mtime to be trusted."""
    if dirs is None or any(m > time.time_ns() - SETTLE_NS for _, m in dirs):
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"entry": os.path.basename(entry), "dirs": dirs})
    except OSError:
        pass  # a read-only cache: every start then checks every file, as without a listing
