"""The on-disk format of one checkpoint directory: names, manifest, completeness, listing and verification.

Why a module of its own: resume, the start guard, export and analysis read checkpoints without saving any;
the manager (manager.py) writes them. A checkpoint is complete iff its ``COMMITTED`` marker (written last)
and ``meta.json`` exist; its manifest (sha256 + size of every file) lets a truncated or altered file fail
with an error naming it before DCP reads a byte. Layout and rules: docs/training.md "Checkpoints".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

from ..config.errors import UserInputError

FORMAT_VERSION = 1
MARKER = "COMMITTED"
META = "meta.json"
CONFIG = "config.yaml"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def build_manifest(directory: Path) -> Dict[str, Dict[str, object]]:
    """``{relative posix path: {"sha256", "size"}}`` for every file under ``directory`` but meta / marker."""
    manifest = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in (META, MARKER):
            manifest[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return manifest


def is_complete(path: Path) -> bool:
    """A checkpoint dir is complete iff its ``COMMITTED`` marker (written last) and meta.json exist."""
    return (path / MARKER).is_file() and (path / META).is_file()


def read_config_text(path) -> str:
    """The resolved config text saved with checkpoint ``path`` (for comparing against a resumed run's)."""
    f = Path(path) / CONFIG
    try:
        return f.read_text(encoding="utf-8")
    except OSError:
        raise UserInputError(f"checkpoint {path} has no readable {CONFIG}") from None


def step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def scan(root: Path) -> Tuple[List[Tuple[int, Path]], List[Path]]:
    """(complete checkpoints sorted by step, stale dirs: ``*.tmp*`` and step dirs without a marker)."""
    complete, stale = [], []
    if not root.is_dir():
        return complete, stale
    for p in root.iterdir():
        if not p.is_dir():
            continue
        m = _STEP_RE.match(p.name)
        if m and is_complete(p):
            complete.append((int(m.group(1)), p))
        elif m or (p.name.startswith("step_") and ".tmp" in p.name):
            stale.append(p)
    complete.sort()
    return complete, sorted(stale)


def _previous_hint(path: Path) -> str:
    """Sentence naming the newest complete checkpoint older than ``path`` (in the same directory), if any."""
    m = _STEP_RE.match(path.name)
    complete, _ = scan(path.parent)
    older = [p for s, p in complete if m is None or s < int(m.group(1))]
    if older:
        return (
            f" The previous checkpoint {older[-1]} is still usable: resume from it with checkpoint.resume={older[-1]}."
        )
    return f" There is no older complete checkpoint in {path.parent}."


def verify_checkpoint(path) -> dict:
    """Check the marker, meta.json and every manifest entry; return meta. Raises UserInputError naming the file."""
    path = Path(path)
    if not is_complete(path):
        raise UserInputError(f"{path} is not a complete checkpoint (no {MARKER} marker or {META})")

    def bad(file: Path, problem: str) -> UserInputError:
        return UserInputError(
            f"checkpoint file {file} {problem}; checkpoint {path} cannot be loaded." + _previous_hint(path)
        )

    meta_file = path / META
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        expected_meta_sha = marker["meta_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise bad(path / MARKER, "is unreadable or malformed") from None
    if sha256_file(meta_file) != expected_meta_sha:
        raise bad(meta_file, "was altered or truncated (sha256 differs from the one recorded in COMMITTED)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    root = path.resolve()
    for rel, info in meta["manifest"].items():
        f = path / rel
        if root not in f.resolve().parents:
            raise bad(f, "lies outside the checkpoint directory")
        if not f.is_file():
            raise bad(f, "is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise bad(f, f"is truncated or altered ({size} bytes, expected {info['size']})")
        if sha256_file(f) != info["sha256"]:
            raise bad(f, "was altered (sha256 differs from the manifest)")
    return meta
