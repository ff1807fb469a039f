"""attnres-prepare: success paths (byte tokenizer, trained BPE loadable by AutoTokenizer) and error paths
(one ``error:`` line on stderr, exit status 2, nothing written or overwritten)."""

import os
import sys

import pytest

from attnres_train.cli.prepare import main
from attnres_train.config.data import DataConfig, DataSourceConfig
from attnres_train.config.errors import UserInputError
from attnres_train.data.loader import build_datasets
from attnres_train.data.shards import ShardSet
from attnres_train.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from tests import subproc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _texts(tmp_path, n=30):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(n):
        (d / f"{i:02d}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + 1  # café\n" * 3)
    return d


def _run(argv, capsys):
    code = main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_prepare_byte_tokenizer_and_train_on_the_output(tmp_path, capsys):
    src = _texts(tmp_path)
    out = tmp_path / "shards"
    code, stdout, err = _run([src, "--out", out, "--shard-tokens", "1000"], capsys)
    assert code == 0, err
    assert "kind: memmap" in stdout and str(out) in stdout
    store = ShardSet(str(out))
    assert store.num_docs == 30 and len(store.headers) > 1 and store.tokenizer == "byte"
    tok = load_tokenizer("byte")
    assert tok.decode(store.document(3)[:-1].tolist()) == (src / "03.txt").read_text()
    assert int(store.document(3)[-1]) == tok.eos_id
    cfg = DataConfig(
        sources=[DataSourceConfig(path=str(out), kind="memmap")],
        seq_len=32,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        num_workers=0,
    )
    assert build_datasets(cfg, progress=False).train_sampler(2).next_batch().shape == (2, 33)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging directories left


def test_train_bpe_round_trip_loadable_by_autotokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    src = _texts(tmp_path)
    tok_dir, out = tmp_path / "tok", tmp_path / "shards"
    code, stdout, err = _run([src, "--out", out, "--train-bpe", 300, "--tokenizer-out", tok_dir], capsys)
    assert code == 0, err
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "def function_7(x):\n    return x * 7 + 1  # café\n"
    ids = hf.encode(text, add_special_tokens=False)
    assert hf.decode(ids) == text and len(ids) < len(text.encode())  # merges were learned
    assert hf.eos_token == "<|endoftext|>" and len(hf) <= 300
    store = ShardSet(str(out))
    assert store.vocab_size == len(hf) and store.eos_id == hf.eos_token_id
    assert store.tokenizer == str(tok_dir)  # the final directory, not the staging one
    assert store.document(7)[:-1].tolist() == hf.encode((src / "07.txt").read_text(), add_special_tokens=False)
    ours = load_tokenizer(str(tok_dir))  # the same files through our wrapper
    assert ours.encode(text) == ids and ours.eos_id == hf.eos_token_id


def test_train_bpe_tokenizer_function_refuses_too_small_vocab_and_non_empty_dir(tmp_path):
    with pytest.raises(UserInputError, match="vocab size must be an integer >= 258"):
        train_bpe_tokenizer(["abc"], 100, str(tmp_path / "t"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserInputError, match="not empty"):
        train_bpe_tokenizer(["abc"], 300, str(tmp_path / "full"))


def test_missing_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "shards"
    code, _, err = _run([tmp_path / "nope.jsonl", "--out", out], capsys)
    assert code == 2 and "nope.jsonl" in _one_error_line(err) and "does not exist" in err
    assert not out.exists()


def test_non_empty_out_is_not_overwritten(tmp_path, capsys):
    src = _texts(tmp_path, n=2)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = _run([src, "--out", out], capsys)
    assert code == 2 and "not empty" in _one_error_line(err)
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    code, _, err = _run([src, "--out", out, "--overwrite"], capsys)
    assert code == 0 and "precious.txt" not in os.listdir(out)


def test_bad_input_mid_run_leaves_no_output(tmp_path, capsys):
    src = _texts(tmp_path, n=5)
    (src / "99.txt").write_bytes(b"fine start \xc3\x28 broken")
    out, tok_dir = tmp_path / "shards", tmp_path / "tok"
    code, _, err = _run([src, "--out", out], capsys)
    assert code == 2 and "99.txt: not valid UTF-8 at byte offset 11" in _one_error_line(err)
    code, _, err = _run([src, "--out", out, "--train-bpe", 300, "--tokenizer-out", tok_dir], capsys)
    assert code == 2 and "99.txt" in _one_error_line(err)
    assert not out.exists() and not tok_dir.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_usage_errors_exit_2(tmp_path, capsys):
    src = _texts(tmp_path, n=1)
    code, _, err = _run([src, "--out", tmp_path / "o", "--tokenizer", tmp_path / "no-tok"], capsys)
    assert code == 2 and "tokenizer path" in _one_error_line(err)
    code, _, err = _run([src, "--out", tmp_path / "o", "--train-bpe", 300], capsys)
    assert code == 2 and "--tokenizer-out" in _one_error_line(err)
    with pytest.raises(SystemExit) as exc:
        main([str(src)])  # --out missing: argparse, same one-line format
    assert exc.value.code == 2
    assert "--out" in _one_error_line(capsys.readouterr().err)


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subproc.run(
        [
            sys.executable,
            "-m",
            "attnres_train.cli.prepare",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        tmp_path / "logs",
        "prepare",
        env=env,
        timeout=60,
    )
    subproc.check(r, 2)
    assert r.stdout == "", subproc.failure(r)
    assert _one_error_line(r.stderr).endswith("does not exist")


def test_lone_surrogate_in_json_becomes_replacement_character(tmp_path, capsys):
    """``"\\ud800"`` is valid JSON but not Unicode: it used to crash attnres-prepare with a UnicodeEncodeError."""
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "before \\ud800 after"}\n{"text": "pair \\ud83d\\ude00 ok"}\n', encoding="ascii")
    out = tmp_path / "shards"
    code, _, err = _run([src, "--out", out], capsys)
    assert code == 0, err
    store = ShardSet(str(out))
    tok = load_tokenizer("byte")
    assert store.num_docs == 2
    assert tok.decode(store.document(0)[:-1].tolist()) == "before \ufffd after"
    assert tok.decode(store.document(1)[:-1].tolist()) == "pair \U0001f600 ok"  # a real pair stays one character


def test_single_document_source_names_why_no_validation_is_possible(tmp_path):
    """One big file read as one document cannot give held-out documents; raising val_fraction cannot help."""
    big = tmp_path / "book.txt"
    big.write_text("All work and no play makes Jack a dull boy.\n" * 200)
    cfg = DataConfig(
        sources=[DataSourceConfig(path=str(big), kind="text", text_unit="file")],
        seq_len=32,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        num_workers=0,
    )
    with pytest.raises(UserInputError, match="single document") as info:
        build_datasets(cfg, progress=False)
    assert "text_unit: paragraph" in str(info.value) and "raise data.val_fraction" not in str(info.value)
    cfg.val_fraction = 0.0
    assert build_datasets(cfg, progress=False).train_sampler(2).next_batch().shape == (2, 33)
