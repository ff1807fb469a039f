"""``text_unit: file`` read in pieces (issue 21.4): a big file is streamed as documents of whole lines, one
per FILE_PIECE_BYTES of the file, never read as one string; ranges of it partition those documents, so
``attnres-prepare --workers N`` shares one big file with output identical for any N. Gzip files stay one
unit, with a warning (docs/data.md "``attnres-prepare``")."""

import gzip
import json
import os

import numpy as np
import pytest

from attnres_train.cli.prepare import main
from attnres_train.config.data import DataSourceConfig
from attnres_train.data import parallel_prepare as pp
from attnres_train.data import sources
from attnres_train.data.shards import ShardSet
from attnres_train.data.sources import file_documents, iter_documents, resolve_source

EOS = 256  # the byte tokenizer's


def _text(rng, nbytes):
    """Lines of random length (a few longer than a piece), multi-byte characters, a BOM, no final newline."""
    pool = "".join(np.where(rng.random(20_000) < 0.05, "é", "w"))
    out, size = ["\ufeff"], 0
    while size < nbytes:
        n = int(rng.integers(0, 120)) if rng.random() > 0.01 else int(rng.integers(2000, 5000))
        k = int(rng.integers(0, len(pool) - n))
        line = pool[k : k + n]
        out.append(line + ("\n" if rng.random() > 0.05 else "\n\n"))
        size += len(line) + 2
    return "".join(out).rstrip("\n")


def _expected_pieces(data: bytes, step: int):
    """By hand: split the bytes after each newline, group the lines by (start byte // step), decode."""
    groups, pos = {}, 0
    for line in data.splitlines(keepends=True):
        groups.setdefault(pos // step, []).append(line)
        pos += len(line)
    texts = [b"".join(ls).decode("utf-8") for _, ls in sorted(groups.items())]
    texts[0] = texts[0].removeprefix("\ufeff")
    return texts


def test_a_file_is_documents_of_whole_lines_per_piece_and_ranges_partition_them(tmp_path, monkeypatch):
    step = 1000
    monkeypatch.setattr(sources, "FILE_PIECE_BYTES", step)
    rng = np.random.default_rng(0)
    f = tmp_path / "book.txt"
    f.write_bytes(_text(rng, 30_000).encode("utf-8"))
    data = f.read_bytes()
    expected = _expected_pieces(data, step)
    assert len(expected) > 10 and "".join(expected) == data.decode("utf-8").removeprefix("\ufeff")

    rs = resolve_source(DataSourceConfig(path=str(f), kind="text", text_unit="file"))
    assert [t for t, _ in file_documents(rs, str(f))] == expected
    assert list(iter_documents(rs)) == expected  # the training cache reads the same documents
    for _ in range(40):
        cuts = sorted(int(c) for c in rng.choice(np.arange(1, len(data)), 4, replace=False))
        bounds = [0, *cuts, None]
        got = [t for a, b in zip(bounds[:-1], bounds[1:]) for t, _ in file_documents(rs, str(f), a, b)]
        assert got == expected, cuts


def test_a_small_file_is_still_one_document(tmp_path):
    f = tmp_path / "small.txt"
    f.write_bytes("\ufeffline one\n\nline two\n".encode("utf-8"))
    rs = resolve_source(DataSourceConfig(path=str(f), kind="text", text_unit="file"))
    assert [t for t, _ in file_documents(rs, str(f))] == ["line one\n\nline two\n"]


class _Recorder:
    """A binary file that records the largest chunk any read hands out."""

    def __init__(self, f, seen):
        self.f, self.seen = f, seen

    def _note(self, b):
        self.seen["max"] = max(self.seen["max"], len(b))
        return b

    def read(self, n=-1):
        return self._note(self.f.read(n))

    def readline(self, n=-1):
        return self._note(self.f.readline(n))

    def __iter__(self):
        return self

    def __next__(self):
        return self._note(next(self.f))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_big_file_is_never_read_as_one_string(tmp_path, monkeypatch):
    step = 64 << 10
    monkeypatch.setattr(sources, "FILE_PIECE_BYTES", step)
    f = tmp_path / "big.txt"
    line = "x" * 99 + "\n"
    f.write_text(line * 20_000)  # 2 MB, 31 pieces
    seen = {"max": 0}
    monkeypatch.setattr(sources, "open", lambda p, mode="r": _Recorder(open(p, mode), seen), raising=False)
    rs = resolve_source(DataSourceConfig(path=str(f), kind="text", text_unit="file"))
    sizes = [size for _, size in file_documents(rs, str(f))]
    assert sum(sizes) == os.path.getsize(f) and len(sizes) == -(-os.path.getsize(f) // step)
    assert 0 < seen["max"] <= len(line)  # line by line: no read returned more than one line
    assert max(sizes) <= step + len(line)


def _stream(out):
    s = ShardSet(str(out))
    return [int(t) for b in range(len(s.headers)) for t in s.read(b, 0, int(s.headers[b]["num_tokens"]))]


def test_one_big_file_gives_identical_shards_for_one_and_two_workers(tmp_path, monkeypatch, capsys):
    step = 256 << 10
    monkeypatch.setattr(sources, "FILE_PIECE_BYTES", step)  # forked workers inherit it
    rng = np.random.default_rng(1)
    f = tmp_path / "one.txt"
    f.write_bytes(_text(rng, 3_000_000).encode("utf-8"))
    data = f.read_bytes()
    outs = {}
    for w in (1, 2):
        argv = [f, "--out", tmp_path / f"o{w}", "--workers", w, "--text-unit", "file", "--shard-tokens", 400_000]
        assert main([str(a) for a in argv] + ["--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"with {w} worker(s), 3 unit(s)" in out  # 1 MiB units of whole pieces
        outs[w] = {n: (tmp_path / f"o{w}" / n).read_bytes() for n in sorted(os.listdir(tmp_path / f"o{w}"))}
    assert outs[1] == outs[2] and len(outs[1]) > 3
    expected = [t for d in _expected_pieces(data, step) for t in list(d.encode("utf-8")) + [EOS]]
    assert _stream(tmp_path / "o2") == expected


def test_a_big_gzip_file_is_one_unit_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pp, "MIN_UNIT_BYTES", 300)
    texts = [f"record {i} " + "z" * (i % 37) for i in range(400)]
    with gzip.open(tmp_path / "big.jsonl.gz", "wt") as g:
        g.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": "tail"}) + "\n")
    argv = [tmp_path / "big.jsonl.gz", tmp_path / "small.jsonl", "--out", tmp_path / "o", "--workers", 2]
    assert main([str(a) for a in argv] + ["--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "big.jsonl.gz" in err and "gzip file cannot be cut" in err
    expected = [t for d in [*texts, "tail"] for t in list(d.encode("utf-8")) + [EOS]]
    assert _stream(tmp_path / "o") == expected
    main([str(a) for a in argv[:-2]] + ["--out", str(tmp_path / "o1"), "--no-progress"])
    assert "warning" not in capsys.readouterr().err  # one worker: nothing to share


@pytest.mark.parametrize("unit", ["file", "paragraph"])
def test_text_files_of_either_unit_are_cut_by_the_planner(tmp_path, monkeypatch, unit):
    monkeypatch.setattr(sources, "FILE_PIECE_BYTES", 1000)
    monkeypatch.setattr(pp, "MIN_UNIT_BYTES", 300)
    f = tmp_path / "t.txt"
    f.write_text(("word " * 30 + "\n\n") * 500)
    rs = resolve_source(DataSourceConfig(path=str(f), kind="text", text_unit=unit))
    ranges = [(a, b) for u in pp.plan_units([rs]) for _, a, b in u.files]
    assert len(ranges) > 5 and ranges[0][0] == 0 and ranges[-1][1] is None
    if unit == "file":
        assert all(a % 1000 == 0 for a, _ in ranges)
