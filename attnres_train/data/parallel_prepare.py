"""``attnres-prepare --workers N``: the inputs cut into units, each tokenized by one process into its own
finished shards, resumable after a crash, merged by one index at the end.

Why: one Python process tokenizes ~2 MB/s of text with a BPE, so a 1 TB corpus takes days and a crash at
99% used to lose everything. The cut depends only on the inputs (output byte-identical for any N); units with
a manifest are skipped on a rerun of the same plan. Units, limits and resume rules: docs/data.md
"``attnres-prepare``" (Parallel and resumable).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from attnres_train.config.errors import UserInputError

from . import sources
from .packing import tokenize_to_shards
from .shards import ShardSet, write_json_atomic, write_set_index
from .sources import ResolvedSource, effective_limits, file_documents, iter_documents, splittable
from .tokenizer import load_tokenizer

MIN_UNIT_BYTES, MAX_UNIT_BYTES, TARGET_UNITS = 1 << 20, 256 << 20, 64
FILE_KINDS = ("text", "jsonl", "stdlib")


@dataclass
class Unit:
    """Consecutive documents of one input: ``files``, pieces ``[path, start byte, end byte or None]`` (with an
    optional document cap on the last one), or the whole input (``files is None``: parquet / arrow / hub,
    read with the input's limits)."""

    index: int
    input: int
    files: Optional[List[list]]
    last_cap: Optional[int] = None
    nbytes: int = 0  # on-disk bytes (for progress)


def _prefix(rs: ResolvedSource, pieces: List[list], max_docs, max_bytes) -> Tuple[List[list], Optional[int]]:
    """Which pieces of a limited input are read, and how many documents of the last (None = all)."""
    n = nbytes = 0
    for k, (path, a, b) in enumerate(pieces):
        taken = 0
        for _, size in file_documents(rs, path, a, b):
            n, nbytes, taken = n + 1, nbytes + size, taken + 1
            if (max_docs is not None and n >= max_docs) or (max_bytes is not None and nbytes >= max_bytes):
                return pieces[: k + 1], taken
    return pieces, None


def _pieces(rs: ResolvedSource, sizes: Dict[str, int], target: int) -> List[list]:
    """The files of ``rs``, big splittable ones cut into byte ranges of ``target`` bytes (a multiple of the
    piece size for ``text_unit: file``, so no range is without a document)."""
    if rs.kind == "text" and rs.cfg.text_unit == "file":
        piece = sources.FILE_PIECE_BYTES
        target = max(piece, target - target % piece)
    out = []
    for f in rs.files:
        if sizes[f] > target and splittable(rs, f):
            cuts = list(range(0, sizes[f], target))
            out += [[f, a, a + target if a + target < sizes[f] else None] for a in cuts]
        else:
            out.append([f, 0, None])
    return out


def _sizes(resolved: List[ResolvedSource]) -> Dict[str, int]:
    return {f: os.path.getsize(f) for rs in resolved if rs.kind in FILE_KINDS for f in rs.files}


def _target(sizes: Dict[str, int]) -> int:
    return min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, sum(sizes.values()) // TARGET_UNITS))


def unshared_gzip(resolved: List[ResolvedSource]) -> List[Tuple[str, int]]:
    """(path, size) of the gzip files that would have been cut into several units were they not compressed."""
    sizes = _sizes(resolved)
    target = _target(sizes)
    return [
        (f, sizes[f])
        for rs in resolved
        if rs.kind in ("jsonl", "text")
        for f in rs.files
        if f.endswith(".gz") and sizes[f] > target
    ]


def plan_units(resolved: List[ResolvedSource], max_docs=None, max_bytes=None) -> List[Unit]:
    """Cut the inputs into units (see module docstring). Raises if a limited input has no documents."""
    sizes = _sizes(resolved)
    target = _target(sizes)
    units: List[Unit] = []
    for i, rs in enumerate(resolved):
        if rs.kind not in FILE_KINDS:
            units.append(Unit(len(units), i, None))
            continue
        docs, nbytes = effective_limits(rs, max_docs, max_bytes)
        pieces = _pieces(rs, sizes, target)
        if docs is not None or nbytes is not None:
            pieces, cap = _prefix(rs, pieces, docs, nbytes)
        else:
            cap = None
        group: List[list] = []
        for k, piece in enumerate(pieces):
            group.append(piece)
            last = k == len(pieces) - 1
            size = sum((b if b is not None else sizes[f]) - a for f, a, b in group)
            if last or size >= target:
                units.append(Unit(len(units), i, group, cap if last else None, size))
                group = []
    return units


def plan_key(resolved: List[ResolvedSource], units: List[Unit], settings: dict) -> str:
    """Identifies a plan: a rerun resumes only if this matches (inputs' files with sizes/mtimes, settings)."""
    material = {
        "settings": settings,
        "inputs": [rs.fingerprint() for rs in resolved],
        "units": [(u.input, u.files, u.last_cap) for u in units],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unit_documents(rs: ResolvedSource, u: Unit, max_docs=None, max_bytes=None) -> Iterator[Tuple[str, int]]:
    if u.files is None:
        for text in iter_documents(rs, max_docs, max_bytes):
            yield text, len(text.encode("utf-8"))
        return
    for k, (path, a, b) in enumerate(u.files):
        cap = u.last_cap if k == len(u.files) - 1 else None
        for j, doc in enumerate(file_documents(rs, path, a, b)):
            if cap is not None and j >= cap:
                break
            yield doc


_TOKENIZER = {}


def run_unit(job: dict) -> dict:
    """Tokenize one unit into finished shards plus its manifest (runs in a worker process)."""
    spec = job["tokenizer"]
    if spec not in _TOKENIZER:
        _TOKENIZER.clear()
        _TOKENIZER[spec] = load_tokenizer(spec)
    tok = _TOKENIZER[spec]
    tok.name = job["tokenizer_name"]  # the final tokenizer directory, not a staging one
    u, rs, stats = job["unit"], job["source"], {"bytes": 0}

    def texts():
        for text, size in unit_documents(rs, u, job["max_docs"], job["max_bytes"]):
            stats["bytes"] += size
            yield text

    w = tokenize_to_shards(
        texts(),
        tok,
        job["staging"],
        source=job["source_label"],
        shard_tokens=job["shard_tokens"],
        prefix=f"u{u.index:06d}",
        write_index=False,
    )
    manifest = {
        "unit": u.index,
        "input": u.input,
        "shards": w.finished,
        "docs": w.num_docs,
        "tokens": w.num_tokens,
        "bytes": stats["bytes"],
    }
    write_json_atomic(os.path.join(job["staging"], f"u{u.index:06d}.done.json"), manifest)
    return manifest


def resume_state(staging: str, key: str) -> Dict[int, dict]:
    """Manifests of finished units in ``staging`` if it holds the same plan; else start it afresh."""
    plan_path = os.path.join(staging, "plan.json")
    if os.path.isdir(staging):
        try:
            with open(plan_path) as f:
                same = json.load(f).get("key") == key
        except (OSError, ValueError):
            same = False
        if same:
            done = {}
            for name in os.listdir(staging):
                if name.endswith(".done.json"):
                    with open(os.path.join(staging, name)) as f:
                        m = json.load(f)
                    done[int(m["unit"])] = m
            for name in os.listdir(staging):  # leftovers of units (or a BPE training) cut short: redone from scratch
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
                elif name.startswith("u") and int(name[1:7]) not in done:
                    os.remove(os.path.join(staging, name))
            return done
        shutil.rmtree(staging)
    os.makedirs(staging)
    write_json_atomic(plan_path, {"key": key})
    return {}


def execute(jobs: List[dict], workers: int, on_done: Callable[[dict], None]) -> None:
    """Run ``jobs`` (in order for one worker; any order across workers), calling ``on_done`` per manifest."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_done(run_unit(job))
        return

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_one_thread) as pool:
        futures = [pool.submit(run_unit, job) for job in jobs]
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    on_done(f.result())  # re-raises a worker's error (e.g. bad UTF-8) here
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _one_thread() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no Rayon pool per worker


def finish(staging: str, manifests: List[dict], resolved: List[ResolvedSource]) -> dict:
    """Check every input gave documents, write the set index, drop the bookkeeping files."""
    for i, rs in enumerate(resolved):
        if not any(m["docs"] for m in manifests if m["input"] == i):
            raise UserInputError(f"{rs.where}: source {rs.name!r} contains no documents (are all files empty?)")
    names = [n for m in sorted(manifests, key=lambda m: m["unit"]) for n in m["shards"]]
    index = write_set_index(staging, names)
    for name in os.listdir(staging):
        if name.endswith(".done.json") or name == "plan.json":
            os.remove(os.path.join(staging, name))
    return index


def merge_sets(sets: List[str], staging: str) -> dict:
    """Combine finished shard sets (e.g. prepared on several machines) into one, in the given order: their
    shards are hard-linked (copied across filesystems) into ``staging`` as ``mNNN_NAME`` and one index is
    written. The sets must agree on tokenizer, vocab size and EOS id."""
    os.makedirs(staging)
    names, first = [], None
    for k, path in enumerate(sets):
        ss = ShardSet(path)
        meta = (ss.tokenizer, ss.vocab_size, ss.eos_id)
        first = first or (path, meta)
        if meta != first[1]:
            raise UserInputError(
                f"{path}: tokenizer/vocab/eos {meta} differ from {first[0]} {first[1]}; "
                "only sets prepared with the same tokenizer can be merged"
            )
        for e in ss.headers:
            new = f"m{k:03d}_{e['name']}"
            for ext in (".bin", ".idx", ".json"):
                src, dst = os.path.join(ss.dir, e["name"] + ext), os.path.join(staging, new + ext)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            names.append(new)
    return write_set_index(staging, names)
