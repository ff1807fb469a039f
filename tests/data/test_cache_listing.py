"""The raw-text cache of a many-file source on a warm start: O(directories) stats, not one per file, and
still a new entry for an added, removed or replaced file (issue 21.2; the rule is in docs/data.md "Cache")."""

import os
import time

import pytest

from attnres_train.config.data import DataSourceConfig
from attnres_train.data import loader
from attnres_train.data.sources import resolve_source
from attnres_train.data.tokenizer import ByteTokenizer

N_DIRS, PER_DIR = 10, 100
EOS = 256


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    for d in range(N_DIRS):
        (root / f"d{d:02d}").mkdir(parents=True)
        for i in range(PER_DIR):
            (root / f"d{d:02d}" / f"f{i:03d}.txt").write_text(f"doc {d}/{i} " + "x" * (i % 7))
    return root


def _age_dirs(root):
    """Move every directory's mtime a minute into the past (as for a corpus written long before the run)."""
    t = time.time() - 60
    for d in [root, *root.iterdir()]:
        os.utime(d, (t, t))


def _expected(root):
    """The byte tokenizer's stream of the directory, built by hand: files in path order, each + EOS."""
    out = []
    for p in sorted(str(p) for p in root.rglob("*.txt") if p.is_file()):
        out += list(open(p, "rb").read()) + [EOS]
    return out


def _load(root, cache):
    rs = resolve_source(DataSourceConfig(path=str(root), kind="text"))
    store = loader.tokenize_cached(rs, ByteTokenizer(), str(cache), progress=False)
    tokens = [int(t) for i in range(store.num_docs) for t in store.document(i)]
    return store.name, tokens


@pytest.fixture
def stat_counter(monkeypatch):
    calls = {"n": 0, "on": False}
    real_stat, real_lstat = os.stat, os.lstat

    def stat(*a, **k):
        calls["n"] += calls["on"]
        return real_stat(*a, **k)

    def lstat(*a, **k):
        calls["n"] += calls["on"]
        return real_lstat(*a, **k)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    return calls


def _counted(root, cache, calls, spec=None):
    calls["on"], calls["n"] = True, 0
    try:
        rs = resolve_source(DataSourceConfig(path=spec or str(root), kind="text"))
        store = loader.tokenize_cached(rs, ByteTokenizer(), str(cache), progress=False)
        return store.name, calls["n"]
    finally:
        calls["on"] = False


@pytest.mark.parametrize("glob", [False, True])
def test_warm_start_stats_directories_not_files(tmp_path, stat_counter, glob):
    root, cache = _corpus(tmp_path), tmp_path / "cache"
    (root / "d04" / "sub.txt").mkdir()  # a directory the glob matches: not a file
    _age_dirs(root)
    spec = str(root / "*" / "*.txt") if glob else None
    name_cold, cold = _counted(root, cache, stat_counter, spec)
    name_warm, warm = _counted(root, cache, stat_counter, spec)
    assert name_warm == name_cold
    n_files = N_DIRS * PER_DIR
    assert cold >= n_files  # the counter sees the cold start's one stat per file
    assert warm <= 2 * (N_DIRS + 1) + 12, (warm, cold)  # a stat and an lstat (os.walk) per directory + the entry
    assert _load(root, cache)[1] == _expected(root)


def _warm_then(root, cache, calls):
    """Age the directories, build/refresh the listing, and check the next start takes the fast path."""
    _age_dirs(root)
    _load(root, cache)
    name, n = _counted(root, cache, calls)
    assert n <= 2 * (N_DIRS + 1) + 12
    return name


def test_added_removed_and_replaced_files_make_a_new_entry(tmp_path, stat_counter):
    root, cache = _corpus(tmp_path), tmp_path / "cache"
    seen = {_warm_then(root, cache, stat_counter)}

    (root / "d03" / "f050b.txt").write_text("an added file")
    name, tokens = _load(root, cache)
    assert name not in seen and tokens == _expected(root)
    seen.add(_warm_then(root, cache, stat_counter))

    (root / "d07" / "f011.txt").unlink()
    name, tokens = _load(root, cache)
    assert name not in seen and tokens == _expected(root)
    seen.add(_warm_then(root, cache, stat_counter))

    # replaced by a rename (editors, rsync, atomic writers): same name, same size, new content
    new = tmp_path / "new.txt"
    new.write_text((root / "d05" / "f020.txt").read_text().replace("doc", "DOC"))
    os.replace(new, root / "d05" / "f020.txt")
    name, tokens = _load(root, cache)
    assert name not in seen and tokens == _expected(root)


def test_a_file_rewritten_in_place_is_seen_once_its_directory_is_touched(tmp_path, stat_counter):
    root, cache = _corpus(tmp_path), tmp_path / "cache"
    old_name = _warm_then(root, cache, stat_counter)
    old_tokens = _expected(root)

    with open(root / "d02" / "f004.txt", "w") as f:  # same inode: the directory's mtime does not move
        f.write("rewritten in place, longer than before")
    name, tokens = _load(root, cache)
    assert (name, tokens) == (old_name, old_tokens)  # documented: not noticed on a warm start
    assert tokens != _expected(root)

    os.utime(root / "d02")  # `touch d02`
    name, tokens = _load(root, cache)
    assert name != old_name and tokens == _expected(root)


def test_small_sources_stat_every_file_every_start(tmp_path, stat_counter):
    root, cache = tmp_path / "few", tmp_path / "cache"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.txt").write_text(f"file {i}")
    _age_dirs(root)
    _load(root, cache)
    with open(root / "3.txt", "w") as f:  # in place, directory untouched
        f.write("changed")
    assert _load(root, cache)[1] == _expected(root)
    assert not (cache / "tokenized" / "listings").exists()


def test_no_listing_while_a_directory_was_modified_seconds_ago(tmp_path):
    root, cache = _corpus(tmp_path), tmp_path / "cache"  # just written: mtimes within the settle time
    _load(root, cache)
    assert not list((cache / "tokenized").glob("listings/*.json"))
    _age_dirs(root)
    _load(root, cache)
    assert len(list((cache / "tokenized").glob("listings/*.json"))) == 1
