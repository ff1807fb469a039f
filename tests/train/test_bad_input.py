"""Bad input: one clear `error:` line, exit code 2, no traceback, nothing overwritten."""

import hashlib
from pathlib import Path

import pytest

from attnres_train.cli.train import run
from tests import subproc

from .conftest import PY, REPO, tiny_overrides


def _launch(overrides, log_dir, timeout=300):
    return subproc.run([PY, "-m", "attnres_train", *overrides], log_dir / "logs", "train", cwd=REPO, timeout=timeout)


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _assert_clean_failure(proc, *needles):
    subproc.check(proc, 2)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, subproc.failure(proc)
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, subproc.failure(proc)
    for n in needles:
        assert n in err_lines[0], err_lines[0]
    return err_lines[0]


def _with(overrides, **kv):
    keys = {k for k in kv}
    out = [o for o in overrides if o.split("=", 1)[0] not in keys]
    return out + [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run(tiny_overrides(corpus, run_dir, steps=3))
    return run_dir


def _bad_files(tmp: Path) -> dict:
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    latin = tmp / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    jsonl = tmp / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\nnot json at all\n')
    return {"empty": empty, "latin": latin, "jsonl": jsonl}


CASES = {
    "missing_data_file": (
        {"data.sources": "[{path: '/nonexistent/corpus.txt', kind: text}]"},
        "/nonexistent/corpus.txt",
    ),
    "empty_data_file": ({"data.sources": "[{path: '@empty', kind: text}]"}, "empty"),
    "non_utf8_text": ({"data.sources": "[{path: '@latin', kind: text}]"}, "UTF-8"),
    "bad_jsonl_line": ({"data.sources": "[{path: '@jsonl', kind: jsonl}]"}, "bad.jsonl:2"),
    "unknown_tokenizer_path": ({"data.tokenizer": "/nonexistent/tokenizer_dir"}, "/nonexistent/tokenizer_dir"),
    "vocab_smaller_than_token_ids": ({"model.vocab_size": 100}, "model.vocab_size"),
    "negative_batch": ({"trainer.global_batch_size": -4}, "trainer.global_batch_size"),
    "zero_steps": ({"trainer.max_steps": 0}, "trainer.max_steps"),
    "negative_lr": ({"optim.lr": -1.0}, "optim.lr"),
    "zero_micro_batch": ({"trainer.micro_batch_size": 0}, "trainer.micro_batch_size"),
    "unknown_residual_mode": ({"model.residual.mode": "dense"}, "model.residual.mode"),
    "indivisible_batch": ({"trainer.global_batch_size": 5}, "trainer.global_batch_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_case(case, corpus, tmp_path):
    files = _bad_files(tmp_path)
    changes, needle = CASES[case]
    changes = {
        k: (
            v.replace("@empty", str(files["empty"]))
            .replace("@latin", str(files["latin"]))
            .replace("@jsonl", str(files["jsonl"]))
            if isinstance(v, str)
            else v
        )
        for k, v in changes.items()
    }
    run_dir = tmp_path / "run"
    proc = _launch(_with(tiny_overrides(corpus, run_dir), **changes), tmp_path)
    _assert_clean_failure(proc, needle)
    assert not list(run_dir.glob("checkpoints/step_*"))


def test_unwritable_run_dir(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _launch(tiny_overrides(corpus, blocker / "run"), tmp_path)
    _assert_clean_failure(proc, "run_dir")
    assert blocker.read_text() == "not a directory"


def test_incompatible_resume_config_keeps_checkpoint(trained, corpus, tmp_path):
    before = _snapshot(trained)
    proc = _launch(
        _with(tiny_overrides(corpus, trained, steps=6), **{"checkpoint.resume": "auto", "model.hidden_size": 64}),
        tmp_path,
    )
    _assert_clean_failure(proc, "model.hidden_size")
    after = _snapshot(trained)
    assert {k: v for k, v in after.items() if "checkpoints" in k} == {
        k: v for k, v in before.items() if "checkpoints" in k
    }


def test_corrupt_checkpoint_is_named_and_left_alone(trained, corpus, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    ckpt = sorted((copy / "checkpoints").glob("step_*"))[-1]
    victim = max((p for p in ckpt.rglob("*") if p.is_file() and p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _snapshot(copy)
    log_before = (copy / "train.log").read_text() if (copy / "train.log").exists() else ""
    proc = _launch(_with(tiny_overrides(corpus, copy, steps=6), **{"checkpoint.resume": "auto"}), tmp_path)
    _assert_clean_failure(proc, victim.name)
    after = _snapshot(copy)
    # train.log is a log: the failed start appends its lines (ending with the error), nothing earlier changes
    assert (copy / "train.log").read_text().startswith(log_before)
    before.pop("train.log", None)
    assert {k: after.get(k) for k in before} == before  # every other file that existed is byte-identical
