"""attnres-prepare --workers (issue 21.3): the token stream equals the documents in input order for any
number of workers, limits cut at the same document, a SIGKILLed run resumes to the uninterrupted result,
a changed input restarts the plan, and a bad file in a worker is one error line with nothing left behind."""

import json
import os
import signal
import sys

import numpy as np
import pytest

from attnres_train.cli.prepare import main
from attnres_train.data import parallel_prepare as pp
from attnres_train.data.shards import ShardSet
from tests import subproc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS = 256  # the byte tokenizer's


@pytest.fixture(autouse=True)
def small_units(monkeypatch):
    monkeypatch.setattr(pp, "MIN_UNIT_BYTES", 300)  # several units from a few KB (forked workers inherit it)


def _corpus(root, n=24):
    root.mkdir()
    texts = []
    for i in range(n):
        recs = [f"file {i} record {j}: " + "é" * (j % 3) + "x" * (7 * i % 50) for j in range(1 + i % 4)]
        (root / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in recs))
        texts += recs
    return texts


def _expected(texts):
    return [t for d in texts for t in list(d.encode("utf-8")) + [EOS]]


def _stream(out):
    s = ShardSet(str(out))
    return [int(t) for b in range(len(s.headers)) for t in s.read(b, 0, int(s.headers[b]["num_tokens"]))]


def _prepare(*argv, capsys=None):
    code = main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def test_two_workers_give_the_one_worker_stream(tmp_path, capsys):
    texts = _corpus(tmp_path / "c")
    outs = {}
    for w in (1, 2):
        code, out, err = _prepare(
            tmp_path / "c", "--out", tmp_path / f"o{w}", "--workers", w, "--shard-tokens", 200, capsys=capsys
        )
        assert code == 0, err
        assert f"with {w} worker(s)" in out and "MB/s" in out
        outs[w] = sorted(os.listdir(tmp_path / f"o{w}"))
    assert _stream(tmp_path / "o1") == _stream(tmp_path / "o2") == _expected(texts)
    assert outs[1] == outs[2] and len([f for f in outs[1] if f.endswith(".bin")]) > 4  # several units and shards
    for f in outs[1]:  # byte-identical files, whatever the number of workers
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_max_docs_cuts_inside_a_file_at_the_same_document(tmp_path, capsys):
    texts = _corpus(tmp_path / "c")
    code, _, err = _prepare(tmp_path / "c", "--out", tmp_path / "o", "--workers", 2, "--max-docs", 9, capsys=capsys)
    assert code == 0, err
    assert _stream(tmp_path / "o") == _expected(texts[:9])  # file 03 (4 records) is cut after 3


_KILL_AFTER_TWO_UNITS = """
import os, signal, sys
import attnres_train.data.parallel_prepare as pp
pp.MIN_UNIT_BYTES = 300
real, seen = pp.run_unit, []
def run_unit(job):
    m = real(job)
    seen.append(m)
    if len(seen) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
    return m
pp.run_unit = run_unit
from attnres_train.cli.prepare import main
main(sys.argv[1:])
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    texts = _corpus(tmp_path / "c")
    out, args = (
        tmp_path / "o",
        [str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--shard-tokens", "200", "--no-progress"],
    )
    r = subproc.run(
        [sys.executable, "-c", _KILL_AFTER_TWO_UNITS, *args],
        tmp_path,
        "prepare-killed",
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    subproc.check(r, -signal.SIGKILL)
    staging = tmp_path / ".o.partial"
    assert not out.exists() and sorted(f for f in os.listdir(staging) if f.endswith(".done.json")) == [
        "u000000.done.json",
        "u000001.done.json",
    ]
    first = json.loads((staging / "u000000.done.json").read_text())["shards"][0]
    assert ShardSet(str(staging / f"{first}.bin")).num_docs > 0  # a finished shard is a complete file
    (staging / "u000002_00000.bin.tmp").write_bytes(b"\0" * 10)  # as if unit 2 had been cut short mid-shard
    (staging / "u000002_00000.json.tmp-99999").write_text("{")  # a header write of the killed process
    code, stdout, err = _prepare(*args[:-1], "--workers", 2, capsys=capsys)
    assert code == 0, err
    assert "2 of " in stdout and "units resumed" in stdout
    assert _stream(out) == _expected(texts) and not staging.exists()
    assert not [f for f in os.listdir(out) if "tmp" in f]


def test_a_changed_input_restarts_instead_of_resuming(tmp_path, capsys):
    texts = _corpus(tmp_path / "c")
    out, args = tmp_path / "o", [str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--no-progress"]
    r = subproc.run(
        [sys.executable, "-c", _KILL_AFTER_TWO_UNITS, *args],
        tmp_path,
        "prepare-killed",
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=120,
    )
    subproc.check(r, -signal.SIGKILL)
    (tmp_path / "c" / "00.jsonl").write_text(json.dumps({"text": "replaced"}) + "\n")
    code, stdout, err = _prepare(*args[:-1], capsys=capsys)
    assert code == 0 and "resumed" not in stdout, err
    n0 = 1  # file 00 held one record
    assert _stream(out) == _expected(["replaced"] + texts[n0:])


def test_a_bad_file_in_a_worker_is_one_error_line_and_leaves_nothing(tmp_path, capsys):
    _corpus(tmp_path / "c")
    (tmp_path / "c" / "13.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xc3\x28"}\n')
    code, _, err = _prepare(tmp_path / "c", "--out", tmp_path / "o", "--workers", 2, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "13.jsonl:2: not valid UTF-8" in lines[0], err
    assert not (tmp_path / "o").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_units_follow_the_inputs_not_the_worker_count(tmp_path):
    _corpus(tmp_path / "c")
    from attnres_train.config.data import DataSourceConfig
    from attnres_train.data.sources import resolve_source

    rs = resolve_source(DataSourceConfig(path=str(tmp_path / "c")))
    units = pp.plan_units([rs])
    pieces = [p for u in units for p in u.files]
    paths = [p[0] for p in pieces]
    assert list(dict.fromkeys(paths)) == rs.files and len(units) > 4  # every file, in order
    for f in rs.files:  # a file's byte ranges tile it: [0, a) [a, b) ... [z, end of file)
        rngs = [(a, b) for p, a, b in pieces if p == f]
        assert rngs[0][0] == 0 and rngs[-1][1] is None
        assert all(prev[1] == nxt[0] for prev, nxt in zip(rngs[:-1], rngs[1:]))
    assert all(np.diff([u.index for u in units]) == 1)


def test_merge_combines_sets_in_order_and_refuses_other_tokenizers(tmp_path, capsys):
    from attnres_train.data.packing import tokenize_to_shards
    from attnres_train.data.shards import ShardWriter
    from attnres_train.data.tokenizer import ByteTokenizer

    tokenize_to_shards(["alpha", "beta"], ByteTokenizer(), str(tmp_path / "a"), shard_tokens=4)
    tokenize_to_shards(["gamma"], ByteTokenizer(), str(tmp_path / "b"))
    code, out, err = _prepare("--merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "m", capsys=capsys)
    assert code == 0 and "merged 2 shard sets" in out, err
    assert _stream(tmp_path / "m") == _expected(["alpha", "beta", "gamma"])
    assert ShardSet(str(tmp_path / "m")).num_docs == 3
    w = ShardWriter(str(tmp_path / "c"), tokenizer="other", vocab_size=300, eos_id=299)
    w.add(np.array([1, 299]))
    w.close()
    code, _, err = _prepare("--merge", tmp_path / "a", tmp_path / "c", "--out", tmp_path / "m2", capsys=capsys)
    assert code == 2 and "differ from" in err and not (tmp_path / "m2").exists()
    code, _, err = _prepare("--merge", tmp_path / "a", "--out", tmp_path / "m3", "--workers", 2, capsys=capsys)
    assert code == 2 and "--workers has no effect with --merge" in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
