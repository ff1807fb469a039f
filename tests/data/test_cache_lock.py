"""Two ranks building one cache entry from bad input: the one that waited reports the input, and the cache is
left as it was.

Why: CI saw a 2-rank run on a bad JSONL file end with a traceback. Rank 1 failed on the bad line and removed
the cache directories it had made, while rank 0, which had waited on the lock, was creating a staging
directory inside them (FileNotFoundError). The holder here is written with raw ``fcntl`` and plain ``os``
calls, as a failed build does it: lock, remove the lock file and the empty directories, release. The waiter
is the real ``tokenize_cached`` in another process, started only once the kernel lists it as blocked on the
lock (``/proc/locks``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time

import pytest

from attnres_train.config.data import DataSourceConfig
from attnres_train.config.errors import UserInputError
from attnres_train.data import loader
from attnres_train.data.sources import resolve_source
from attnres_train.data.tokenizer import ByteTokenizer

fcntl = pytest.importorskip("fcntl")


def _tokenize(path: str, cache: str, out) -> None:
    rs = resolve_source(DataSourceConfig(path=path, kind="jsonl"))
    try:
        loader.tokenize_cached(rs, ByteTokenizer(), cache, progress=False)
        out.put(("ok", ""))
    except BaseException as e:  # noqa: B902 - whatever it was, the parent reports it
        out.put((type(e).__name__, str(e)))


def _blocked_on(inode: int) -> bool:
    """Whether the kernel lists a process waiting for a lock on this inode (lines with ``->``)."""
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields and int(fields[fields.index("->") + 5].split(":")[2]) == inode:
                return True
    return False


def _lock_name(data, cache, monkeypatch) -> str:
    """The entry's lock file name, found by one failed build with the clean-up switched off."""
    with monkeypatch.context() as m:
        m.setattr(loader, "remove_quietly", lambda paths: None)
        with pytest.raises(UserInputError):
            loader.tokenize_cached(
                resolve_source(DataSourceConfig(path=str(data), kind="jsonl")),
                ByteTokenizer(),
                str(cache),
                progress=False,
            )
    (lock,) = (cache / "tokenized").glob("*.lock")
    shutil.rmtree(cache)
    return lock.name


def test_the_rank_that_waited_on_a_failed_build_reports_the_bad_line_and_leaves_no_cache(tmp_path, monkeypatch):
    if not os.path.exists("/proc/locks"):
        pytest.skip("needs /proc/locks to see the waiter block")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\nnot json at all\n' + '{"text": "fine"}\n' * 5)
    cache = tmp_path / "cache"
    lock = cache / "tokenized" / _lock_name(data, cache, monkeypatch)

    lock.parent.mkdir(parents=True)  # the holder: it made both directories and the lock file
    holder = open(lock, "a")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    waiter = ctx.Process(target=_tokenize, args=(str(data), str(cache), out))
    waiter.start()
    try:
        deadline = time.monotonic() + 120
        while not _blocked_on(os.fstat(holder.fileno()).st_ino):
            assert waiter.is_alive() and time.monotonic() < deadline, "the waiter never blocked on the lock"
            time.sleep(0.05)
        os.unlink(lock)  # the holder's build failed: it removes what it made, then releases
        os.rmdir(lock.parent)
        os.rmdir(cache)
        holder.close()
        kind, msg = out.get(timeout=120)
    finally:
        waiter.join(timeout=60)
        if waiter.is_alive():
            waiter.kill()
    assert kind == "UserInputError" and f"{data}:2" in msg, (kind, msg)
    assert not cache.exists()  # the waiter removed what it had to make again


def test_a_rank_that_waited_on_a_successful_build_uses_it(tmp_path):
    data = tmp_path / "good.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "world"}\n')
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_tokenize, args=(str(data), str(cache), out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [("ok", "")] * 3
    entries = [p.name for p in (cache / "tokenized").iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and not entries[0].startswith(".tmp-")  # one build, no staging left behind
