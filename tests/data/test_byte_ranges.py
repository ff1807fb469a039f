"""Byte ranges of one big file (issue 21.3: ``--workers`` on a single file): the ranges of a jsonl or
paragraph-text file partition its documents exactly, wherever the cuts fall, and the planner cuts big files."""

import json

import numpy as np
import pytest

from attnres_train.config.data import DataSourceConfig
from attnres_train.config.errors import UserInputError
from attnres_train.data import parallel_prepare as pp
from attnres_train.data.sources import file_documents, resolve_source


def _paragraphs(rng, n=25):
    out = []
    for i in range(n):
        lines = [
            f"p{i} l{j} " + "word " * int(rng.integers(0, 12)) + "é" * int(rng.integers(0, 3))
            for j in range(int(rng.integers(1, 5)))
        ]
        out.append("\n".join(lines))
    return out


def _paragraph_file(tmp_path, rng):
    paras = _paragraphs(rng)
    seps = ["\n\n", "\n\n\n", "\n  \t\n", "\n\u3000\n", "\n \n\n"]  # blank lines, incl. whitespace-only ones
    body = "\ufeff" + paras[0]
    for p in paras[1:]:
        body += seps[int(rng.integers(0, len(seps)))] + p
    f = tmp_path / "book.txt"
    f.write_bytes(body.encode("utf-8"))  # no trailing newline
    return f, paras


def _read(rs, path, cuts):
    bounds = [0, *cuts, None]
    return [t for a, b in zip(bounds[:-1], bounds[1:]) for t, _ in file_documents(rs, str(path), a, b)]


def _cut_sets(size, rng):
    yield from ([c] for c in range(1, size, 3))  # every place, two ranges
    for _ in range(30):
        yield sorted(int(c) for c in rng.choice(np.arange(1, size), 5, replace=False))


def test_paragraph_ranges_partition_the_documents(tmp_path):
    rng = np.random.default_rng(0)
    f, paras = _paragraph_file(tmp_path, rng)
    rs = resolve_source(DataSourceConfig(path=str(f), kind="text", text_unit="paragraph"))
    assert [t for t, _ in file_documents(rs, str(f))] == paras
    for cuts in _cut_sets(f.stat().st_size, rng):
        assert _read(rs, f, cuts) == paras, cuts


def test_jsonl_ranges_partition_the_documents_and_name_the_byte_offset(tmp_path):
    rng = np.random.default_rng(1)
    texts = [f"rec {i} " + "z" * int(rng.integers(0, 40)) for i in range(40)]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(7, "")  # blank lines are skipped
    f = tmp_path / "big.jsonl"
    f.write_text("\n".join(lines) + "\n")
    rs = resolve_source(DataSourceConfig(path=str(f)))
    for cuts in _cut_sets(f.stat().st_size, rng):
        assert _read(rs, f, cuts) == texts, cuts
    f.write_text("\n".join(lines) + "\n" + "{broken\n")
    size = f.stat().st_size
    with pytest.raises(UserInputError, match=rf"big.jsonl \(line at byte {size - 8}\): not valid JSON"):
        _read(rs, f, [size - 20])


def test_one_big_file_is_cut_into_units_and_prepared_in_parallel(tmp_path, monkeypatch, capsys):
    from attnres_train.cli.prepare import main
    from attnres_train.data.shards import ShardSet

    monkeypatch.setattr(pp, "MIN_UNIT_BYTES", 500)
    texts = [f"record {i} " + "y" * (i % 37) for i in range(300)]
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    units = pp.plan_units([resolve_source(DataSourceConfig(path=str(f)))])
    assert len(units) > 5 and units[0].files[0][1:] == [0, 500] and units[-1].files[0][2] is None
    assert main([str(f), "--out", str(tmp_path / "o"), "--workers", "2", "--max-docs", "250", "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    s = ShardSet(str(tmp_path / "o"))
    want = [t for x in texts[:250] for t in list(x.encode()) + [256]]
    assert [int(t) for b in range(len(s.headers)) for t in s.read(b, 0, int(s.headers[b]["num_tokens"]))] == want
